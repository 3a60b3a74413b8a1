"""The adjoint service's partitions document (`GET /runs/{run_id}/partitions`), as the lineage service reads it.

The adjoint service derives, for each captured morphism, which input keys were mapped, filtered or errored, and
for each graph source of the epoch the terminal fate of every key. This module only types that document;
the ledger (`services.lineage.domain.ledger`) decides whether it balances.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.core.errors import UpstreamServiceError, describe_validation_error


class _Document(BaseModel):
    # Fields the adjoint service adds later must not break the lineage service.
    model_config = ConfigDict(extra="ignore", frozen=True)


class KeySample(_Document):
    """A count of keys with up to ten of them, encoded by the adjoint service (`key_encoding`)."""

    count: int = Field(ge=0)
    samples: list[str] = Field(default_factory=list)


class FilterRef(_Document):
    """A filter condition that sent keys to the `filtered` partition, where the model declares it."""

    condition: str
    model: str | None = None
    line: int | None = None


class Morphism(_Document):
    """One model's partition of its driving upstream's keys."""

    model: str
    unique_id: str
    relation: str | None = None
    kind: str | None = None
    upstream: str | None = None
    upstream_unique_id: str | None = None
    upstream_relation: str | None = None
    source_key_fields: list[str] = Field(default_factory=list)
    target_key_fields: list[str] = Field(default_factory=list)
    input: int = Field(ge=0)
    mapped: int = Field(ge=0)
    filtered: int = Field(ge=0)
    errored: int = Field(ge=0)
    output: int | None = Field(default=None, ge=0)
    overlap: KeySample = Field(default_factory=lambda: KeySample(count=0))
    unaccounted: KeySample = Field(default_factory=lambda: KeySample(count=0))
    locations: dict[str, str] = Field(default_factory=dict)
    filters: list[FilterRef] = Field(default_factory=list)
    req: list[str] = Field(default_factory=list)


class Fates(_Document):
    """Where the keys of a graph source ended: every key in exactly one of these."""

    reached_output: int = Field(ge=0)
    filtered: int = Field(ge=0)
    errored: int = Field(ge=0)
    unaccounted: int = Field(default=0, ge=0)


class SourceFates(_Document):
    """End-to-end accounting of one graph source of the epoch."""

    source: str
    unique_id: str
    relation: str | None = None
    key_fields: list[str] = Field(default_factory=list)
    input: int = Field(ge=0)
    fates: Fates
    unaccounted_samples: list[str] = Field(default_factory=list)


class NotCaptured(_Document):
    """A node the adjoint service did not capture, and why."""

    unique_id: str
    reason: str


class Partitions(_Document):
    """The whole partitions document of one run."""

    run_id: str
    epoch: str | None = None
    lineage_mode: str | None = None
    key_encoding: str | None = None
    morphisms: list[Morphism] = Field(default_factory=list)
    sources: list[SourceFates] = Field(default_factory=list)
    not_captured: list[NotCaptured] = Field(default_factory=list)


def parse_partitions(data: Any) -> Partitions:
    """Validate a decoded partitions document.

    Args:
        data: The JSON the adjoint service answered.

    Returns:
        The typed document.

    Raises:
        UpstreamServiceError: The document does not have the contract's shape (the message names the first bad field).
    """
    from pydantic import ValidationError

    try:
        return Partitions.model_validate(data)
    except ValidationError as e:
        msg = f"invalid partitions document: {describe_validation_error(e)}"
        raise UpstreamServiceError(msg) from e

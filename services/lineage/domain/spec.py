"""Offline validation of OpenLineage events: the core schema, each facet against its `_schemaURL`, CDME facets.

The OpenLineage spec files (core + standard facets, each with an absolute `$id`) and CDME's own facet schemas
are registered under their `$id`s, so every `$ref` and `_schemaURL` resolves without the network. A facet
whose `_schemaURL` names a version that is not registered is itself an error: it cannot be checked.

Needs `jsonschema` and `referencing` (the `dev` extra): tests and benchmarks use it, services do not.

Examples:
    >>> validator = EventValidator.from_directory(Path("../shared/openlineage-spec"))
    >>> validator.errors(event)
    []
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.core.settings import PROJECT_ROOT
from services.lineage.domain.events import CDME_FACET_SCHEMAS

DEFAULT_SPEC_DIR = PROJECT_ROOT.parent / "shared" / "openlineage-spec"
_FACET_GROUPS = (("run", "facets"), ("job", "facets"))


class EventValidator:
    """Validates OpenLineage events against locally stored schemas."""

    def __init__(self, documents: list[dict[str, Any]]) -> None:
        from referencing import Registry, Resource

        self._registry: Any = Registry().with_resources(
            [(doc["$id"], Resource.from_contents(doc)) for doc in documents]
        )
        self._ids = {doc["$id"] for doc in documents}
        self._validators: dict[str, Any] = {}
        self._facet_memo: dict[tuple[str, str], list[str]] = {}
        core = next(doc["$id"] for doc in documents if doc["$id"].endswith("/OpenLineage.json"))
        self._core = core

    @classmethod
    def from_directory(cls, spec_dir: Path = DEFAULT_SPEC_DIR, *, cdme: bool = True) -> EventValidator:
        """Load `OpenLineage.json` and `facets/*.json` from `spec_dir`, plus CDME's facet schemas."""
        paths = [spec_dir / "OpenLineage.json", *sorted((spec_dir / "facets").glob("*.json"))]
        if cdme:
            paths += sorted(CDME_FACET_SCHEMAS.glob("*.json"))
        return cls([json.loads(p.read_text(encoding="utf-8")) for p in paths])

    def _validator(self, url: str) -> Any:
        from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

        validator = self._validators.get(url)
        if validator is None:
            validator = Draft202012Validator({"$ref": url}, registry=self._registry)
            self._validators[url] = validator
        return validator

    def _facet_errors(self, where: str, facet: Any) -> list[str]:
        if not isinstance(facet, dict) or not isinstance(facet.get("_schemaURL"), str):
            return [f"{where}: facet without _schemaURL"]
        url = facet["_schemaURL"]
        if url.split("#", 1)[0] not in self._ids:
            return [f"{where}: _schemaURL {url} is not a known schema version"]
        # Events repeat the same facets (parent, dataSource, engine, upstream schemas): check each once.
        key = (url, json.dumps(facet, sort_keys=True, default=str))
        messages = self._facet_memo.get(key)
        if messages is None:
            messages = [e.message for e in self._validator(url).iter_errors(facet)]
            self._facet_memo[key] = messages
        return [f"{where}: {m}" for m in messages]

    def errors(self, event: dict[str, Any]) -> list[str]:
        """Every violation of the event: core schema first, then each facet by its `_schemaURL`.

        Args:
            event: One OpenLineage run event.

        Returns:
            One line per violation (empty: the event is valid).
        """
        # The core schema checks of a facet only what its own schema checks again (the base facet's fields):
        # the event is checked with each facet reduced to those, and each facet in full below.
        core = self._validator(f"{self._core}#/$defs/RunEvent")
        found = [f"event: {e.message}" for e in core.iter_errors(_skeleton(event))]
        for part, key in _FACET_GROUPS:
            for name, value in ((event.get(part) or {}).get(key) or {}).items():
                found += self._facet_errors(f"{part}.{name}", value)
        for side in ("inputs", "outputs"):
            for i, dataset in enumerate(event.get(side) or []):
                for key in ("facets", "inputFacets", "outputFacets"):
                    for name, value in (dataset.get(key) or {}).items():
                        found += self._facet_errors(f"{side}[{i}].{key}.{name}", value)
        return found


_BASE_KEYS = ("_producer", "_schemaURL", "_deleted")


def _reduced(facets: Any) -> Any:
    if not isinstance(facets, dict):
        return facets
    return {
        name: {k: v for k, v in value.items() if k in _BASE_KEYS} if isinstance(value, dict) else value
        for name, value in facets.items()
    }


def _skeleton(event: dict[str, Any]) -> dict[str, Any]:
    """`event` with every facet reduced to the base facet's fields."""
    skeleton = dict(event)
    for part in ("run", "job"):
        if isinstance(event.get(part), dict) and "facets" in event[part]:
            skeleton[part] = {**event[part], "facets": _reduced(event[part]["facets"])}
    for side in ("inputs", "outputs"):
        if isinstance(event.get(side), list):
            skeleton[side] = [
                {
                    k: (_reduced(v) if k in {"facets", "inputFacets", "outputFacets"} else v)
                    for k, v in d.items()
                }
                if isinstance(d, dict)
                else d
                for d in event[side]
            ]
    return skeleton

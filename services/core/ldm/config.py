"""`dbt_project/cdme.yml`: grain hierarchy, type hierarchy, roles, requirements, budgets and defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.core.errors import LdmError, describe_validation_error

LineageMode = Literal["full", "key_derivable", "summary"]


class _Strict(BaseModel):
    # A misspelt key in cdme.yml must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Grain(_Strict):
    """A level of the grain hierarchy; `coarsens` names the finer level it aggregates."""

    name: str
    description: str = ""
    coarsens: str | None = None


class SemanticType(_Strict):
    """A semantic type: a root has a SQL `base`; a subtype names its `parent`."""

    name: str
    base: str | None = None
    parent: str | None = None
    description: str = ""


class Role(_Strict):
    """An access role that models may require."""

    name: str
    description: str = ""


class Budget(_Strict):
    """Cost ceilings the validation service enforces before dbt runs."""

    max_output_rows: int | None = Field(default=None, gt=0)
    max_join_depth: int | None = Field(default=None, gt=0)
    max_intermediate_rows: int | None = Field(default=None, gt=0)


class Budgets(_Strict):
    """A project-wide default budget plus per-model overrides."""

    default: Budget = Field(default_factory=Budget)
    models: dict[str, Budget] = Field(default_factory=dict)

    def for_model(self, name: str) -> Budget:
        """The model's budget: its own limits over the default's."""
        own = self.models.get(name)
        if own is None:
            return self.default
        return self.default.model_copy(update=own.model_dump(exclude_none=True))


class Defaults(_Strict):
    """Project-wide defaults."""

    lineage_mode: LineageMode = "full"
    summary_sample_rate: float = Field(default=0.01, gt=0, le=1)


class ProjectConfig(_Strict):
    """The whole of `cdme.yml`."""

    version: Literal[1] = 1
    grains: list[Grain]
    types: list[SemanticType] = Field(default_factory=list)
    roles: list[Role] = Field(default_factory=list)
    requirements: dict[str, str] = Field(default_factory=dict)
    budgets: Budgets = Field(default_factory=Budgets)
    defaults: Defaults = Field(default_factory=Defaults)

    @model_validator(mode="after")
    def _references_resolve(self) -> ProjectConfig:
        for label, names in (
            ("grains", [g.name for g in self.grains]),
            ("types", [t.name for t in self.types]),
            ("roles", [r.name for r in self.roles]),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                msg = f"{label}: declared twice: {', '.join(duplicates)}"
                raise ValueError(msg)
        grains = {g.name for g in self.grains}
        for i, grain in enumerate(self.grains):
            if grain.coarsens is not None and grain.coarsens not in grains:
                msg = f"grains[{i}].coarsens: unknown grain {grain.coarsens!r}"
                raise ValueError(msg)
        types = {t.name for t in self.types}
        for i, sem in enumerate(self.types):
            if (sem.base is None) == (sem.parent is None):
                msg = f"types[{i}] ({sem.name}): declare exactly one of base (a SQL type) or parent (a type)"
                raise ValueError(msg)
            if sem.parent is not None and sem.parent not in types:
                msg = f"types[{i}].parent: unknown type {sem.parent!r}"
                raise ValueError(msg)
        _check_acyclic({g.name: g.coarsens for g in self.grains}, "grains")
        _check_acyclic({t.name: t.parent for t in self.types}, "types")
        return self

    def grain_chain(self, name: str) -> list[str]:
        """`name` and every finer grain it coarsens, coarsest first (`Monthly, Daily, Atomic`)."""
        parents = {g.name: g.coarsens for g in self.grains}
        chain = [name]
        while (parent := parents.get(chain[-1])) is not None:
            chain.append(parent)
        return chain

    def is_subtype(self, sub: str, sup: str) -> bool:
        """Whether semantic type `sub` equals `sup` or descends from it."""
        parents = {t.name: t.parent for t in self.types}
        current: str | None = sub
        while current is not None:
            if current == sup:
                return True
            current = parents.get(current)
        return False

    def base_type(self, name: str) -> str | None:
        """The SQL base type a semantic type resolves to."""
        by_name = {t.name: t for t in self.types}
        current = by_name.get(name)
        while current is not None and current.base is None and current.parent is not None:
            current = by_name.get(current.parent)
        return current.base if current else None


def _check_acyclic(parents: dict[str, str | None], label: str) -> None:
    for start in parents:
        seen = {start}
        current = parents.get(start)
        while current is not None:
            if current in seen:
                msg = f"{label}: cycle through {current!r}"
                raise ValueError(msg)
            seen.add(current)
            current = parents.get(current)


def parse_project_config(data: Any, source: str = "cdme.yml") -> ProjectConfig:
    """Validate decoded `cdme.yml` content.

    Raises:
        LdmError: A field is unknown, missing or inconsistent; the message names the file and field.
    """
    if not isinstance(data, dict):
        msg = f"{source}: expected a mapping at the top level"
        raise LdmError(msg)
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as e:
        msg = f"{source}: {describe_validation_error(e)}"
        raise LdmError(msg) from e


def load_project_config(path: Path) -> ProjectConfig:
    """Read and validate `cdme.yml`.

    Raises:
        LdmError: The file is missing, is not YAML, or declares something invalid.
    """
    return parse_project_config(read_project_config(path), str(path))


def read_project_config(path: Path) -> Any:
    """The decoded YAML of `cdme.yml`, not yet validated (callers that keep the document as sent).

    Raises:
        LdmError: The file is missing or is not YAML.
    """
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        msg = f"{path}: file not found; every CDME project declares its grains and roles in cdme.yml"
        raise LdmError(msg) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        msg = f"{path}: malformed YAML{where}: {getattr(e, 'problem', None) or e}"
        raise LdmError(msg) from e

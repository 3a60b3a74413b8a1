"""Symbolic paths over the project's declared relationships: `entity.relationship.attribute`.

A relationship is what dbt already declares: a `relationships` test (`to: ref('customers')`, `field: id`)
or a foreign-key constraint. A path starts at an entity, follows one relationship per middle segment (named by
the foreign-key column or by the entity it leads to) and ends at an attribute of the last entity. It is how an
assistant proposes "the customer's name of this order" before writing SQL; every step that does not exist, and
every entity the principal may not see, is a finding.

Examples:
    >>> validate_path(manifest, "orders.customer_id.customer_name").valid
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from services.core.artifacts import Catalog, Manifest
from services.core.ldm import Ldm, entity_name
from services.validation.domain.analysis import project_schemas
from services.validation.domain.findings import Finding

_REF = re.compile(r"""ref\(\s*['"](?:[^'"]+['"]\s*,\s*['"])?(?P<name>[^'"]+)['"]""")
_SOURCE = re.compile(r"""source\(\s*['"](?P<source>[^'"]+)['"]\s*,\s*['"](?P<table>[^'"]+)['"]\s*\)""")


@dataclass(frozen=True)
class Relationship:
    """A declared link from a column of one entity to a column of another."""

    from_entity: str
    from_column: str
    to_entity: str
    to_column: str


class PathStep(BaseModel):
    """One hop of a resolved path."""

    from_entity: str
    via: str = Field(description="The column of `from_entity` the relationship starts at.")
    to_entity: str
    to_column: str


class PathResult(BaseModel):
    """Whether a symbolic path resolves, how, and what is wrong if it does not."""

    path: str
    valid: bool
    steps: list[PathStep] = Field(default_factory=list)
    attribute: str | None = Field(default=None, description="The resolved `entity.column` at the end.")
    findings: list[Finding] = Field(default_factory=list)


def _target(expression: object, names: dict[str, str]) -> str | None:
    text = str(expression or "")
    if (source := _SOURCE.search(text)) is not None:
        return f"{source['source']}.{source['table']}"
    if (ref := _REF.search(text)) is not None:
        return ref["name"] if ref["name"] in names.values() else names.get(ref["name"], ref["name"])
    return None


def declared_relationships(manifest: Manifest) -> list[Relationship]:
    """Every relationship the project declares with `relationships` tests or foreign-key constraints."""
    project = manifest.metadata.project_name
    names = {n.unique_id: entity_name(n, project) for n in manifest.entities()}
    found: list[Relationship] = []
    for node in manifest.nodes.values():
        meta = node.test_metadata
        if node.resource_type != "test" or meta is None or meta.name != "relationships":
            continue
        source_id = node.tested_node
        column = node.column_name or meta.arguments.get("column_name")
        target = _target(meta.arguments.get("to"), names)
        field = meta.arguments.get("field")
        if source_id in names and column and target and isinstance(field, str):
            found.append(Relationship(names[source_id], str(column).lower(), target, field.lower()))
    for node in manifest.nodes.values():
        if node.resource_type != "model":
            continue
        for col in node.columns.values():
            for constraint in col.constraints:
                target = _target(constraint.expression, names) if constraint.type == "foreign_key" else None
                if target is not None:
                    field_match = re.search(r"\(\s*(\w+)\s*\)\s*$", constraint.expression or "")
                    to_column = field_match.group(1).lower() if field_match else col.name.lower()
                    found.append(Relationship(names[node.unique_id], col.name.lower(), target, to_column))
    return found


def validate_path(
    manifest: Manifest,
    path: str,
    *,
    catalog: Catalog | None = None,
    ldm: Ldm | None = None,
    project_dir: Path | None = None,
    principal: str | None = None,
    roles: frozenset[str] | None = None,
) -> PathResult:
    """Resolve `path` over the declared relationships; every broken step is a `path` finding.

    Args:
        manifest: The project's manifest.
        path: `entity.relationship[.relationship...].attribute`; sources are named `source_name.table`.
        catalog: The warehouse's columns, to check the attribute beyond the YAML-documented ones.
        ldm: The LDM, whose access declarations decide what `roles` may see.
        project_dir: The project's directory (seed headers complete the seeds' schemas).
        principal: Who asks, named in access findings.
        roles: The principal's roles; an entity they do not allow is unknown to the path.
    """
    project = manifest.metadata.project_name
    nodes = {entity_name(n, project): n for n in manifest.entities()}
    hidden = (
        {e.name for e in ldm if not e.visible_to(set(roles))}
        if ldm is not None and roles is not None
        else set()
    )
    visible = {name: node for name, node in nodes.items() if name not in hidden}
    relationships = [
        r for r in declared_relationships(manifest) if r.from_entity in visible and r.to_entity in visible
    ]

    def fail(message: str) -> PathResult:
        finding = Finding.of("path", "VIOLATION", current, message)
        return PathResult(path=path, valid=False, steps=steps, findings=[finding])

    segments = [s for s in path.strip().split(".") if s]
    steps: list[PathStep] = []
    current = path
    # Entity names may contain dots (sources, versions): the longest visible prefix is the start.
    start = next((i for i in range(len(segments) - 1, 0, -1) if ".".join(segments[:i]) in visible), None)
    if start is None or len(segments) < 2:
        who = f" to principal `{principal}`" if principal and roles is not None else ""
        first = segments[0] if segments else path
        return fail(f"`{first}` is not an entity known{who}; a path is entity.relationship.attribute")
    current = ".".join(segments[:start])
    for segment in segments[start:-1]:
        hop = next(
            (
                r
                for r in relationships
                if r.from_entity == current and segment.lower() in {r.from_column, r.to_entity}
            ),
            None,
        )
        if hop is None:
            declared = sorted(
                {f"{r.from_column} -> {r.to_entity}" for r in relationships if r.from_entity == current}
            )
            listing = ", ".join(declared) or "none"
            return fail(f"`{current}` has no declared relationship `{segment}` (declared: {listing})")
        steps.append(
            PathStep(
                from_entity=current, via=hop.from_column, to_entity=hop.to_entity, to_column=hop.to_column
            )
        )
        current = hop.to_entity
    attribute = segments[-1].lower()
    # The same schemas validation resolves: what the entity's SQL produces, not only its documented columns.
    schema = project_schemas(manifest, catalog=catalog, ldm=ldm, project_dir=project_dir).get(
        visible[current].unique_id
    )
    columns = set(schema.columns) if schema is not None else set()
    resolved = f"{current}.{attribute}"
    if attribute in columns:
        return PathResult(path=path, valid=True, steps=steps, attribute=resolved)
    if schema is None or not schema.complete:
        message = f"`{current}` has no complete schema to check `{attribute}` against"
        unknown = Finding.of("path", "UNVERIFIABLE", current, message)
        return PathResult(path=path, valid=True, steps=steps, attribute=resolved, findings=[unknown])
    return fail(f"`{current}` has no column `{attribute}` (columns: {', '.join(sorted(columns))})")

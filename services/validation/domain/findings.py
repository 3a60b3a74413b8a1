"""What validation reports: findings of catalogued rules, with a verdict, a location, and coverage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Verdict = Literal["OK", "VIOLATION", "UNVERIFIABLE"]
Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Rule:
    """A catalogued check: its code, the requirement it implements, and the severity of a violation."""

    code: str
    name: str
    req: str
    severity: Severity
    description: str


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "CDME-V000",
            "parse",
            "REQ-VAL-PARSE",
            "warning",
            "The model's compiled SQL parses in the adapter's dialect.",
        ),
        Rule(
            "CDME-V003",
            "declarations",
            "REQ-VAL-DECL",
            "error",
            "Every meta.cdme declaration and cdme.yml entry is valid (grains, kinds, keys, roles, REQ keys).",
        ),
        Rule(
            "CDME-V021",
            "morphism.fold",
            "REQ-VAL-MORPH",
            "error",
            "A fold whose result depends on row order (string_agg, array_agg, first_value, ...) declares it.",
        ),
        Rule(
            "CDME-V040",
            "types",
            "REQ-VAL-TYPES",
            "error",
            "Join and comparison operands have compatible types; semantic types do not mix.",
        ),
        Rule(
            "CDME-V050",
            "grain",
            "REQ-VAL-GRAIN",
            "error",
            "No model mixes grains without aggregating; aggregations climb the grain hierarchy level by level.",
        ),
        Rule(
            "CDME-V060",
            "governance",
            "REQ-VAL-PII",
            "error",
            "Columns classified as personal reach marts only pseudonymized.",
        ),
        Rule(
            "CDME-V070",
            "access",
            "REQ-VAL-ACCESS",
            "error",
            "A principal reads only what its roles allow; anything else does not exist for it.",
        ),
        Rule(
            "CDME-V080",
            "postgres",
            "REQ-VAL-PG",
            "error",
            "Identifiers fit PostgreSQL's 63 bytes and reserved words are quoted.",
        ),
        Rule(
            "CDME-V090",
            "cost",
            "REQ-VAL-COST",
            "error",
            "Each model's estimated output, intermediate size and join depth stay within its budget.",
        ),
        Rule(
            "CDME-V100",
            "path",
            "REQ-VAL-PATH",
            "error",
            "A symbolic path follows relationships the project declares, to an attribute that exists.",
        ),
        Rule(
            "CDME-V030",
            "lookups",
            "REQ-VAL-LOOKUP",
            "error",
            "Every non-driving upstream is a lookup with declared version semantics; a join across epochs "
            "declares its temporal semantics.",
        ),
        Rule(
            "CDME-V001",
            "existence.relation",
            "REQ-VAL-EXIST",
            "error",
            "Every table a model reads is a source, seed, snapshot or model of the project.",
        ),
        Rule(
            "CDME-V002",
            "existence.column",
            "REQ-VAL-EXIST",
            "error",
            "Every column a model uses exists in the relation it is read from.",
        ),
        Rule(
            "CDME-V010",
            "determinism",
            "REQ-VAL-DET",
            "error",
            "No volatile or clock function unless the model declares an external morphism.",
        ),
        Rule(
            "CDME-V020",
            "morphism.iso",
            "REQ-VAL-MORPH",
            "error",
            "A model declared iso has no GROUP BY, DISTINCT, LIMIT or row-dropping inner join.",
        ),
    )
}


class Finding(BaseModel):
    """One result of one rule on one model (or one place in it)."""

    model_config = ConfigDict(frozen=True)

    rule: str = Field(description="Rule name, e.g. `existence.column`.")
    code: str = Field(description="Stable rule code, e.g. `CDME-V002`.")
    req: str = Field(description="The requirement key the rule implements.")
    severity: Severity
    verdict: Verdict
    model: str = Field(description="The entity the finding is about.")
    line: int | None = Field(default=None, description="1-based line in the model's file (or compiled SQL).")
    column: int | None = Field(default=None, description="1-based column on that line.")
    message: str

    @classmethod
    def of(
        cls,
        rule_name: str,
        verdict: Verdict,
        model: str,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
    ) -> Finding:
        """A finding of a catalogued rule; only violations carry the rule's severity, the rest are info."""
        rule = RULES[rule_name]
        severity: Severity = rule.severity if verdict == "VIOLATION" else "info"
        return cls(
            rule=rule.name,
            code=rule.code,
            req=rule.req,
            severity=severity,
            verdict=verdict,
            model=model,
            line=line,
            column=column,
            message=message,
        )


class Coverage(BaseModel):
    """How much of the project validation could check for real."""

    models: int
    models_fully_resolved: int
    column_references: int
    column_references_resolved: int
    unresolved_models: list[str] = Field(
        default_factory=list,
        description="Models with at least one column or relation that could not be checked.",
    )

    @property
    def model_share(self) -> float:
        """Share of models whose every column reference was resolved."""
        return self.models_fully_resolved / self.models if self.models else 1.0

    @property
    def column_share(self) -> float:
        """Share of column references resolved against a known schema."""
        return self.column_references_resolved / self.column_references if self.column_references else 1.0


class PlanStep(BaseModel):
    """How one model handles records, for the adjoint service: lossless or lossy, and where to checkpoint."""

    model: str
    kind: str = Field(description="The declared morphism kind, or the one the SQL shows.")
    declared: bool = Field(description="Whether `kind` was declared in meta.cdme rather than inferred.")
    lossy: bool = Field(description="Whether some input records have no image in the output.")
    reasons: list[str] = Field(default_factory=list, description="What in the SQL drops or folds records.")
    checkpoint_after: bool = Field(
        description="Whether the adjoint service takes a checkpoint envelope here."
    )


class Plan(BaseModel):
    """The execution plan's lineage view: every model classified, plus the graph's inputs and outputs."""

    steps: list[PlanStep] = Field(default_factory=list)
    inputs: list[str] = Field(default_factory=list, description="Graph sources read: checkpointed on input.")
    outputs: list[str] = Field(
        default_factory=list, description="Models nothing reads: checkpointed on output."
    )


class CostEstimate(BaseModel):
    """What a model is estimated to produce, from the warehouse's planner statistics."""

    model: str
    rows: int | None = Field(description="Estimated output rows (None: an input has no statistics).")
    intermediate_rows: int | None = Field(description="Largest row count of any step inside the model.")
    join_depth: int | None = Field(
        description="Joins in the model's query, CTEs included (from the SQL alone)."
    )


class Report(BaseModel):
    """All findings of one validation, with coverage and the execution plan."""

    findings: list[Finding]
    coverage: Coverage
    plan: Plan = Field(default_factory=Plan)
    costs: list[CostEstimate] = Field(
        default_factory=list, description="Filled when cost estimation was asked for."
    )

    @property
    def errors(self) -> list[Finding]:
        """Violations of error severity: these reject a run."""
        return [f for f in self.findings if f.verdict == "VIOLATION" and f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """Violations of warning severity."""
        return [f for f in self.findings if f.verdict == "VIOLATION" and f.severity == "warning"]

"""Adjoint metadata: runs, morphisms, graph sources, and mapped/filtered/errored LIST-partitioned by run.

Each run's rows of `mapped`, `filtered` and `errored` live in their own partition (created by capture, one per
run and table), so re-capturing a run swaps its partitions and forgetting a run is a partition drop.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

# Migrations name their schema: they are frozen history and must not follow later changes to the service's code.
SCHEMA = "cdme_adjoint"

_DDL = f"""
create table {SCHEMA}.runs (
    run_id text primary key,
    epoch date not null,
    lineage_mode text not null check (lineage_mode in ('full', 'key_derivable', 'summary')),
    key_encoding text not null,
    project text,
    captured_at timestamptz not null default now(),
    seconds double precision not null,
    pairs bigint not null,
    sample_rate double precision,
    not_captured jsonb not null default '[]'
);
create table {SCHEMA}.morphisms (
    run_id text not null references {SCHEMA}.runs on delete cascade,
    morphism_id integer not null,
    model text not null,
    unique_id text not null,
    relation text not null,
    kind text not null,
    upstream text not null,
    upstream_unique_id text not null,
    upstream_relation text not null,
    source_key_fields text[] not null,
    target_key_fields text[] not null,
    input bigint not null,
    mapped bigint not null,
    filtered bigint not null,
    errored bigint not null,
    output bigint not null,
    pairs bigint not null,
    overlap_count bigint not null,
    overlap_samples text[] not null,
    unaccounted_count bigint not null,
    unaccounted_samples text[] not null,
    filters jsonb not null,
    req text[] not null,
    access text[] not null,
    upstream_access text[] not null,
    mapped_sql text not null,
    input_sql text not null,
    output_sql text not null,
    envelopes jsonb,
    primary key (run_id, morphism_id)
);
create index morphisms_model_idx on {SCHEMA}.morphisms (run_id, unique_id);
create index morphisms_upstream_idx on {SCHEMA}.morphisms (run_id, upstream_unique_id);
create table {SCHEMA}.sources (
    run_id text not null references {SCHEMA}.runs on delete cascade,
    unique_id text not null,
    name text not null,
    relation text not null,
    key_fields text[] not null,
    input bigint not null,
    reached_output bigint not null,
    filtered bigint not null,
    errored bigint not null,
    unaccounted bigint not null,
    unaccounted_samples text[] not null,
    primary key (run_id, unique_id)
);
create table {SCHEMA}.mapped (
    run_id text not null,
    morphism_id integer not null,
    source_key text not null,
    target_key text not null
) partition by list (run_id);
create index mapped_backward_idx on {SCHEMA}.mapped (morphism_id, target_key, source_key);
create index mapped_forward_idx on {SCHEMA}.mapped (morphism_id, source_key, target_key);
create table {SCHEMA}.filtered (
    run_id text not null,
    morphism_id integer not null,
    source_key text not null,
    condition_index integer not null
) partition by list (run_id);
create index filtered_key_idx on {SCHEMA}.filtered (morphism_id, source_key);
create table {SCHEMA}.errored (
    run_id text not null,
    morphism_id integer not null,
    source_key text not null,
    failure_type text,
    offending_values jsonb,
    source_epoch date,
    morphism_path text[]
) partition by list (run_id);
create index errored_key_idx on {SCHEMA}.errored (morphism_id, source_key);
"""


def upgrade() -> None:
    """Create the run, morphism and source tables and the three partitioned relation tables."""
    for statement in _DDL.split(";"):
        if statement.strip():
            op.execute(statement)


def downgrade() -> None:
    """Drop everything `upgrade` created (partitions go with their parents)."""
    for table in ("errored", "filtered", "mapped", "sources", "morphisms", "runs"):
        op.execute(f"drop table if exists {SCHEMA}.{table} cascade")

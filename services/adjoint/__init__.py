"""The adjoint service: record-level lineage (backward, impact, reconciliation) captured per run."""

"""The lineage service: accounting ledger, run gate, OpenLineage events, outbox delivery, queries."""

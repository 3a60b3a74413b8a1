"""Lineage domain: plain Python (no web framework): ledger, gate, versions, column lineage, events."""

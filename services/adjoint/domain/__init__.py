"""Adjoint domain: capture derivation, storage and queries (no web framework)."""

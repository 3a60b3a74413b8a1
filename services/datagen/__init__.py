"""Synthetic data for the reference trading project (`cdme generate`)."""

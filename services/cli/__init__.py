"""The `cdme` command line."""

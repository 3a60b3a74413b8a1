"""The validation service: the pre-run gate over a dbt project."""

"""The planner service: runs a dbt project through validation, dbt, adjoint capture and lineage finalize."""

"""One module per revision of `cdme_planner`, applied in order by `services.core.migrations.migrate`."""

"""One module per revision of `cdme_validation`, applied in order by `services.core.migrations.migrate`."""

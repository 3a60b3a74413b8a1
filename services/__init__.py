"""CDME: the four services around a dbt project and the library they share."""

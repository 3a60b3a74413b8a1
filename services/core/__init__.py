"""What every CDME service shares: settings, warehouse access, dbt artifacts, the LDM, auth, errors, HTTP."""

__version__ = "0.1.0"

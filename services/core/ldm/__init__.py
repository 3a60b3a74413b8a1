"""The logical data model: `cdme.yml` plus every entity's `meta.cdme`, resolved against the dbt project.

Examples:
    >>> ldm = load_ldm(load_manifest(target / "manifest.json"), load_project_config(project / "cdme.yml"))
    >>> ldm.entity("int_trades_enriched").kind
    'enrich'
"""

from services.core.ldm.config import ProjectConfig, load_project_config, parse_project_config
from services.core.ldm.loader import Ldm, LdmDeclarationError, LdmProblem, entity_name, load_ldm
from services.core.ldm.model import ERROR_SINK_FIELDS, Entity, Lookup, RecordKey

__all__ = [
    "ERROR_SINK_FIELDS",
    "Entity",
    "Ldm",
    "LdmDeclarationError",
    "LdmProblem",
    "Lookup",
    "ProjectConfig",
    "RecordKey",
    "entity_name",
    "load_ldm",
    "load_project_config",
    "parse_project_config",
]

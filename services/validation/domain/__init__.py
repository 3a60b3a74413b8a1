"""Validation's domain: plain Python over typed artifacts, no web framework."""

from services.validation.domain.findings import RULES, Coverage, Finding, Report, Rule
from services.validation.domain.validate import validate_project

__all__ = ["RULES", "Coverage", "Finding", "Report", "Rule", "validate_project"]

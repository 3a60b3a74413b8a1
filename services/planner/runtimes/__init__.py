"""dbt runtimes behind one interface, found through the entry-point group `cdme.dbt_runtimes`.

A runtime compiles and builds the project for a run, into the run's own artifact directory, and says what it
can do. Three ship with CDME: `local` (the dbt CLI as a subprocess, the default), `inprocess` (dbtRunner,
one call at a time) and `cloud` (the dbt Cloud Administrative API v2). A package adds another by declaring

    [project.entry-points."cdme.dbt_runtimes"]
    myruntime = "mypackage.module:MyRuntime"

where `MyRuntime` subclasses `DbtRuntime` and is built from a `RuntimeContext`.
"""

from services.planner.runtimes.base import (
    DbtCall,
    DbtOutcome,
    DbtRuntime,
    LintFinding,
    LintReport,
    RuntimeContext,
    available_runtimes,
    load_runtime,
)

__all__ = [
    "DbtCall",
    "DbtOutcome",
    "DbtRuntime",
    "LintFinding",
    "LintReport",
    "RuntimeContext",
    "available_runtimes",
    "load_runtime",
]

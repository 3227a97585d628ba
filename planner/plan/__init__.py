"""Plans: phased, dependency-ordered steps built from a validated manifest (the public face).

`model` holds the data (Phase, Step, Plan, digest) and `full` the full plan, both re-exported
here. Diff-aware planning is imported from `planner.plan.changes` (with `selection`, the change
rules, and `destroys`, removals), so that a full plan does not load the diff and module graph.
Callers that plan large manifests wrap the calls in `planner.perf.gc_paused`.
"""

from planner.plan import full, model
from planner.plan.full import *  # noqa: F403 (the names of `full.__all__`)
from planner.plan.model import *  # noqa: F403 (the names of `model.__all__`)

__all__ = model.__all__ + full.__all__

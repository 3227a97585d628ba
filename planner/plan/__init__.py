"""Plans: phased, dependency-ordered steps built from a validated manifest (the public face).

`model` holds the data (Phase, Step, Plan, digest) and `full` the full plan, both re-exported
here. Diff-aware planning is imported from `planner.plan.changes` (with `selection`, the change
rules, and `destroys`, removals), so that a full plan does not load the diff and module graph.
Callers that plan large manifests wrap the calls in `planner.perf.gc_paused`.
"""

from planner.plan.full import (
    Analysis,
    FullPlanNeeds,
    analyse,
    analyse_errors,
    auth_provider,
    dependency_infos,
    full_steps,
    nearest_selected,
    plan_full,
    required_services,
    restrict,
    service_chain,
)
from planner.plan.model import (
    GLOBAL_PHASES,
    NIX_PHASES,
    TF_PHASES,
    Change,
    ChangeKind,
    DependencyInfo,
    Phase,
    Plan,
    PlanOptions,
    Step,
    UnknownService,
    canonical_digest,
    finalize,
    generations,
    invalid_plan,
    manifest_digest,
    parse_step_id,
    step_id,
    trusted,
)

__all__ = [
    "GLOBAL_PHASES",
    "NIX_PHASES",
    "TF_PHASES",
    "Analysis",
    "Change",
    "ChangeKind",
    "DependencyInfo",
    "FullPlanNeeds",
    "Phase",
    "Plan",
    "PlanOptions",
    "Step",
    "UnknownService",
    "analyse",
    "analyse_errors",
    "auth_provider",
    "canonical_digest",
    "dependency_infos",
    "finalize",
    "full_steps",
    "generations",
    "invalid_plan",
    "manifest_digest",
    "nearest_selected",
    "parse_step_id",
    "plan_full",
    "required_services",
    "restrict",
    "service_chain",
    "step_id",
    "trusted",
]

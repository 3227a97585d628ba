"""Renderings of a Plan: terminal text, JSON (Markdown and Slack join later)."""

from __future__ import annotations

import json

from planner.plan import DependencyInfo, Plan

NO_DEPLOYMENT = "No deployment needed"


def summary(plan: Plan) -> str:
    """One line: how much work the plan is."""
    if not plan.ok:
        return f"Invalid manifest: {len(plan.errors)} error(s)"
    if not plan.steps:
        return f"{NO_DEPLOYMENT}: {plan.note}" if plan.note else NO_DEPLOYMENT
    services = len(plan.services())
    return (
        f"{services} service{'s' if services != 1 else ''} change, "
        f"{len(plan.steps)} steps in {len(plan.waves)} waves"
    )


def render_text(plan: Plan) -> str:
    """The plan for a terminal: summary, then each wave with its steps and reasons."""
    lines = [summary(plan)]
    for finding in plan.errors:
        lines.append(f"  error: {finding.render()}")
    by_id = plan.by_id()
    for number, wave in enumerate(plan.waves, 1):
        lines.append(f"wave {number}:")
        for sid in wave:
            step = by_id[sid]
            needs = f"  (after {', '.join(step.needs)})" if step.needs else ""
            lines.append(f"  {sid}{needs}")
            for reason in step.reasons:
                lines.append(f"      because {reason}")
    if plan.dependencies:
        lines.append("dependencies:")
        lines.extend(f"  {dependency_line(dep)}" for dep in plan.dependencies)
    for finding in plan.warnings:
        lines.append(f"warning: {finding.render()}")
    return "\n".join(lines)


def dependency_line(dep: DependencyInfo) -> str:
    """`a → b (inferred from interface.db.host)` or `a → b (depends_on)`."""
    origin = f"inferred from {dep.field}" if dep.inferred else "depends_on"
    if not dep.orders:
        origin += "; set up by tf:auth-core"
    return f"{dep.service} → {dep.target} ({origin})"


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2)

"""Counted words every surface uses: `1 host`, `3 services, 7 steps`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.plan import Plan


def plural(count: int, word: str) -> str:
    """`1 step`, `2 steps`."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def plan_size(plan: Plan) -> str:
    """`3 services, 7 steps`: what a plan touches."""
    return f"{plural(len(plan.services()), 'service')}, {plural(len(plan.steps), 'step')}"

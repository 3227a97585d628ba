"""Errors of the planner itself, as opposed to findings about a manifest."""

from __future__ import annotations


class PlanningError(Exception):
    """The bot itself could not plan (Git failure, unknown revision, evaluation timeout).

    Problems in the manifest are not planning errors: they become findings on the Plan.
    """

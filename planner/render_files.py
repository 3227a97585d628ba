"""`nixmox plan --explain-files` as terminal text and JSON (Markdown: `render.md_changed_files`)."""

from __future__ import annotations

import json

from planner.plan import Plan
from planner.render import short_rev

NO_FILES = "no changed files"


def explain_text(plan: Plan) -> str:
    """Each changed file, then the steps it selected and why, or why none."""
    lines = [f"changed files, base {short_rev(plan.base)} → head {short_rev(plan.head)}:"]
    for note in plan.files:
        lines.append(f"  {note.path}")
        if note.steps:
            lines.append(f"      steps: {', '.join(note.steps)}")
            lines.extend(f"      because {reason}" for reason in note.reasons)
        else:
            lines.append(f"      {note.note}")
    if not plan.files:
        lines.append(f"  ({NO_FILES})")
    lines.extend(f"warning: {finding.render()}" for finding in plan.warnings)
    return "\n".join(lines)


def explain_json(plan: Plan) -> str:
    """`{"base", "head", "files": [{"path", "steps", "reasons", "note"}], "warnings"}`."""
    body = {
        "base": plan.base,
        "head": plan.head,
        "files": [note.model_dump(mode="json") for note in plan.files],
        "warnings": [finding.render() for finding in plan.warnings],
    }
    return json.dumps(body, indent=2)

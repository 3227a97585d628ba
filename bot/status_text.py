"""Words shared by every status view (the CLI's tables, Slack's `/nixmox status`).

A neutral home so that `bot/` never imports the CLI; the deployment core's shared status views
replace these later.
"""

from __future__ import annotations

from state.deployments import DeploymentRecord

SHORT_REV = 12
STATUS_TITLE = "NixMox Service Status"


def short(rev: str | None) -> str:
    """A commit id's first 12 characters; a manifest digest keeps its `sha256:` prefix."""
    if not rev:
        return "-"
    prefix = "sha256:" if rev.startswith("sha256:") else ""
    return prefix + rev[len(prefix) : len(prefix) + SHORT_REV]


def step_counts(record: DeploymentRecord) -> str:
    """`3 succeeded, 1 failed`: a deployment's steps counted by state."""
    counts: dict[str, int] = {}
    for step in record.steps:
        counts[step.state.value] = counts.get(step.state.value, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no steps"

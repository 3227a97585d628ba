"""The per-host summary of an approval message (`NIXMOX_PREVIEW=true`): what the head's built
systems change on each host, shown under the plan while the approval waits."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from planner.escape import slack_text
from planner.plan import Plan
from planner.preview import HostPreview
from planner.words import plural

if TYPE_CHECKING:
    from bot.context import BotContext

log = logging.getLogger(__name__)

TITLE = "*What changes on the hosts*"
PREVIEW_FAILED = "_Could not preview the hosts: {error}_"


def host_line(name: str, preview: HostPreview) -> str:
    """`• *vaultwarden*: 1 package changed, 2 units restart, reboot needed`."""
    head = f"• *{slack_text(name)}*: "
    if preview.error is not None:
        first = preview.error.strip().splitlines()[-1] if preview.error.strip() else "failed"
        return head + "preview failed: " + slack_text(first[:200])
    if preview.unchanged:
        return head + "unchanged (no switch)"
    restarting = len(preview.units.restart) + len(preview.units.stop)
    parts = [f"{plural(len(preview.packages), 'package')} changed"]
    parts.append(f"{plural(restarting, 'unit')} restart{'s' if restarting == 1 else ''}")
    if preview.reboot:
        parts.append(":warning: reboot needed")
    return head + ", ".join(parts)


def host_summary(previews: Mapping[str, HostPreview]) -> str:
    """The section text: a title, then one line per host."""
    return "\n".join([TITLE, *(host_line(name, previews[name]) for name in sorted(previews))])


async def preview_for_approval(
    ctx: BotContext, plan: Plan, revision: str | None, repo_dir: Path, *, complete: bool
) -> tuple[Plan, str | None] | None:
    """The plan completed from the builds at `revision` (`[preview] hosts = "all"` adds the
    hosts whose systems change, when `complete`), and the summary of its hosts (None:
    previews are off). A failed preview leaves the plan as it was."""
    from runners.preview import preview_revision

    if not ctx.settings.preview.enabled or not revision:
        return None
    try:
        completed, previews = await preview_revision(
            plan, repo_dir, ctx.settings.manifest_path, ctx.runner_config, ctx.settings.preview
        )
    except Exception as exc:
        log.warning("Slack: the host previews failed", exc_info=True)
        return plan, PREVIEW_FAILED.format(error=slack_text(str(exc) or type(exc).__name__))
    return (completed if complete else plan), (host_summary(previews) if previews else None)

"""Host previews of a pull request's head (`NIXMOX_PREVIEW=true` or `[preview] enabled`).

The plan comment is posted at once with a progress line; the previews then build the head's
systems (`runners.preview`) and the comment is edited when they finish. One preview runs per
pull request: a newer push cancels the preview of the older head.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from bot.preview_tasks import Previewed
from planner.escape import md_text
from planner.plan import NIX_PHASES, Plan
from runners.config import PreviewHosts

if TYPE_CHECKING:
    from bot.context import BotContext

log = logging.getLogger(__name__)

COMPLETED_KEPT = 64
PROGRESS = "_⏳ Building {what} to show what changes on the hosts…_"
FAILED = "_Could not preview the hosts: {error}_"


def wants_preview(ctx: BotContext, plan: Plan) -> bool:
    """Previews are on, and the plan can be deployed (and switches a host, unless `all`)."""
    config = ctx.settings.preview
    if not config.enabled or not plan.ok or plan.head is None or ctx.git is None:
        return False
    switches = any(step.phase in NIX_PHASES for step in plan.steps)
    return switches or config.hosts is PreviewHosts.ALL


def progress_line(ctx: BotContext, plan: Plan) -> str:
    """`_⏳ Building 2 hosts to show what changes on the hosts…_`."""
    if ctx.settings.preview.hosts is PreviewHosts.ALL:
        return PROGRESS.format(what="every host")
    hosts = {step.service for step in plan.steps if step.phase in NIX_PHASES and step.service}
    return PROGRESS.format(what=f"{len(hosts)} host{'s' * (len(hosts) != 1)}")


def failed_line(error: BaseException) -> str:
    return FAILED.format(error=md_text(str(error) or type(error).__name__))


def newer_head(ctx: BotContext, number: int, head: str) -> bool:
    """A plan job for `head` of PR `number` starts: an older head's preview stops, or does not
    start if it has not yet (True if one was running)."""
    ctx.previews.newest[number] = head
    return cancel_preview(ctx, number)


def cancel_preview(ctx: BotContext, number: int) -> bool:
    """Stop the running preview of PR `number` (True if one ran)."""
    task = ctx.previews.running.pop(number, None)
    if task is None or task.done():
        return False
    log.info("PR #%d: a newer push cancels the running preview", number)
    task.cancel()
    return True


async def run_preview(ctx: BotContext, number: int, plan: Plan) -> Previewed | None:
    """The head's previews (and the plan completed from them); None when a newer push
    cancelled them. Failures raise."""
    from runners.preview import preview_revision

    assert ctx.git is not None
    newest = ctx.previews.newest.get(number)
    if newest is not None and newest != plan.head:
        return None  # a job for a newer head started while this one was commenting
    running = ctx.previews.running
    cancel_preview(ctx, number)
    task = asyncio.ensure_future(
        preview_revision(
            plan, ctx.git.path, ctx.settings.manifest_path, ctx.runner_config, ctx.settings.preview
        )
    )
    running[number] = task
    try:
        await asyncio.wait([task])
    finally:
        if not task.done():  # the job itself was stopped
            task.cancel()
        if running.get(number) is task:
            del running[number]
    if task.cancelled():
        return None
    completed, previews = task.result()
    _remember(ctx, plan, completed)
    return completed, previews


def _remember(ctx: BotContext, plan: Plan, completed: Plan) -> None:
    kept = ctx.previews.completed
    kept[(plan.base, plan.head)] = completed
    kept.move_to_end((plan.base, plan.head))
    while len(kept) > COMPLETED_KEPT:
        kept.popitem(last=False)


def previewed_plan(ctx: BotContext, plan: Plan) -> Plan:
    """The plan as its finished preview completed it (the plan itself when none did)."""
    completed = ctx.previews.completed.get((plan.base, plan.head))
    return completed if completed is not None and plan.ok else plan

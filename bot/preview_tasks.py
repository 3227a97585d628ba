"""The host previews one process runs for pull requests (see `bot.github.previews`)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from planner.plan import Plan
from planner.preview import HostPreview

Previewed = tuple[Plan, dict[str, HostPreview]]


@dataclass
class PreviewState:
    """The previews of one process (`BotContext.previews`)."""

    # PR number -> the preview task of its newest head
    running: dict[int, asyncio.Task[Previewed]] = field(default_factory=dict)
    # PR number -> the newest head a plan job was for
    newest: dict[int, str] = field(default_factory=dict)
    # (base, head) -> the plan completed from its builds (`[preview] hosts = "all"` adds the
    # hosts whose systems change), so `/nixmox apply` checks and deploys what the comment shows
    completed: OrderedDict[tuple[str | None, str | None], Plan] = field(default_factory=OrderedDict)

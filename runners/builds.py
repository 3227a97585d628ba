"""Builds of hosts' systems: started when a deployment starts, in parallel, awaited per step.

A build runs the `[runners.nixos] build` template (by default `nix build --no-link --json
...toplevel`; the path is read from the JSON, since Nix 2.8 has no `--print-out-paths`). The
`BuildScheduler` of a deployment starts every host's build at once, at most `build_parallel`
running together; each nix step awaits its own. The `BuildCache` keeps a revision's built
paths on disk, so a deployment of a head that was previewed builds nothing again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from planner.plan import Plan
from runners.base import Context
from state.events import StepResult

NO_PATH = "the build printed no store path"


@dataclass
class BuildResult:
    """One host's build: the system's store path, or the failure's output."""

    ok: bool
    path: str | None = None
    output: str = ""
    commands: list[str] = field(default_factory=list)
    cached: bool = False


class BuildFailed(StepResult):
    """A nix step whose build failed: nothing on the host was changed, nothing to roll back."""


@runtime_checkable
class Prebuilding(Protocol):
    """A runner that starts its builds when a deployment starts (and stops them at its end)."""

    def start_builds(self, plan: Plan, ctx: Context) -> None: ...

    async def finish_builds(self, ctx: Context) -> None: ...


def output_path(stdout: str) -> str | None:
    """The out path of `nix build --json` (its first result), else the last line printed."""
    text = stdout.strip()
    if not text:
        return None
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError, AttributeError):
        results: Any = json.loads(text)
        first = results[0] if isinstance(results, list) else results
        return str(first["outputs"]["out"])
    line = text.splitlines()[-1].strip()
    return line if line.startswith("/") else None


Build = Callable[[str], Awaitable[BuildResult]]


class BuildScheduler:
    """The builds of one deployment: all started at once, `parallel` running together."""

    def __init__(self, build: Build, parallel: int) -> None:
        self.build = build
        self.limit = asyncio.Semaphore(parallel)
        self.tasks: dict[str, asyncio.Task[BuildResult]] = {}
        self.started: list[str] = []  # order in which builds really began (tests, benchmarks)

    def start(self, services: Iterable[str]) -> None:
        for service in services:
            if service not in self.tasks:
                self.tasks[service] = asyncio.create_task(self._run(service))

    async def _run(self, service: str) -> BuildResult:
        async with self.limit:
            self.started.append(service)
            return await self.build(service)

    async def result(self, service: str) -> BuildResult:
        """The service's build (started now if it was not started with the others)."""
        self.start([service])
        return await asyncio.shield(self.tasks[service])

    async def cancel(self) -> None:
        """Stop the builds no step waits for any more."""
        pending = [task for task in self.tasks.values() if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def finish_deployment_builds(
    schedulers: dict[str, BuildScheduler], deployment_id: str
) -> None:
    """Stop and forget one deployment's builds (its steps are done)."""
    scheduler = schedulers.pop(deployment_id, None)
    if scheduler is not None:
        await scheduler.cancel()


class BuildCache:
    """Built system paths by (revision, service, build command), in one small file each."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def _file(self, revision: str, service: str, template: str) -> Path | None:
        if self.directory is None or not _cacheable(revision):
            return None
        key = hashlib.sha256(f"{revision}\0{service}\0{template}".encode()).hexdigest()
        return self.directory / f"{key}.json"

    def get(self, revision: str | None, service: str, template: str) -> str | None:
        """A path built before for this revision that is still in the store."""
        path = self._file(revision or "", service, template)
        if path is None or not path.is_file():
            return None
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            built = str(json.loads(path.read_text())["path"])
            if Path(built).exists():
                return built
        return None

    def put(self, revision: str | None, service: str, template: str, built: str) -> None:
        path = self._file(revision or "", service, template)
        if path is None:
            return
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            body = {"revision": revision, "service": service, "path": built}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            tmp.replace(path)


def _cacheable(revision: str) -> bool:
    """Only Git commits name their files exactly (a manifest digest does not cover the flake)."""
    return len(revision) in (40, 64) and all(char in "0123456789abcdef" for char in revision)

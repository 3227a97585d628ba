"""How a deployment runs, where its files come from and who asked: typed, built once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from planner.source import DEFAULT_MANIFEST_PATH
from runners.config import RunnerConfig
from runners.registry import RunnerKind, RunnerSet, build_runners
from state.events import Trigger

DEFAULT_LOCK_LEASE = timedelta(seconds=60)
DEFAULT_WORK_ROOT = Path(".nixmox") / "work"
DEFAULT_PARALLEL = 4


class ExecutionSettings(Protocol):
    """The settings `ExecutionOptions.from_settings` reads (the bot's `Settings` has them)."""

    @property
    def runner(self) -> str: ...

    @property
    def parallel(self) -> int: ...

    @property
    def auto_rollback(self) -> bool: ...

    @property
    def lock_lease(self) -> timedelta: ...

    @property
    def workdir(self) -> Path: ...


@dataclass(frozen=True)
class ExecutionOptions:
    """Which runners, how wide, whether to roll back, how long locks last and are waited for."""

    runner_kind: RunnerKind = RunnerKind.REAL
    runner_config: RunnerConfig | None = None
    runners: RunnerSet | None = None  # a prebuilt set (shared transports); overrides the two above
    parallel: int = DEFAULT_PARALLEL
    auto_rollback: bool = True
    lock_lease: timedelta = DEFAULT_LOCK_LEASE
    lock_wait: float = 0.0
    work_root: Path = DEFAULT_WORK_ROOT

    @classmethod
    def from_settings(
        cls, settings: ExecutionSettings, runner_config: RunnerConfig | None = None
    ) -> ExecutionOptions:
        """The options every front end of one configuration uses (read once, passed down)."""
        return cls(
            runner_kind=RunnerKind(settings.runner),
            runner_config=runner_config,
            parallel=settings.parallel,
            auto_rollback=settings.auto_rollback,
            lock_lease=settings.lock_lease,
            work_root=settings.workdir / "work",
        )

    def waiting(self, lock_wait: float) -> ExecutionOptions:
        """The same options, waiting up to `lock_wait` seconds for locked services."""
        return dataclasses.replace(self, lock_wait=lock_wait)

    def without_auto_rollback(self) -> ExecutionOptions:
        """The same options, never rolling back (a rollback that fails is not undone again)."""
        return dataclasses.replace(self, auto_rollback=False)

    def runner_set(self) -> RunnerSet:
        """The prebuilt runner set, or a new one of the configured kind."""
        return self.runners or build_runners(self.runner_kind, self.runner_config)


@dataclass(frozen=True)
class GitSource:
    """Deploy a Git revision of a repository (default: the plan's head), exported fresh."""

    repo_dir: Path
    revision: str | None = None
    manifest_path: str = DEFAULT_MANIFEST_PATH


@dataclass(frozen=True)
class DirectorySource:
    """Deploy a plain directory (no Git), snapshotted so later edits do not leak in."""

    directory: Path
    manifest_path: str = DEFAULT_MANIFEST_PATH


Source = GitSource | DirectorySource


@dataclass(frozen=True)
class Requester:
    """Who and what started a deployment (recorded with it)."""

    trigger: Trigger | str = Trigger.CLI
    requested_by: str | None = None
    approved_by: str | None = None

    @property
    def actor(self) -> str:
        """The audit log's actor: the person, else the trigger."""
        return self.requested_by or str(self.trigger)

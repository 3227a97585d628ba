"""Running a deployment: lock, record, execute, release; the part every kind shares.

`start_deployment` exports the planned revision into a fresh work directory (so it deploys
exactly what was planned and approved, never a live working copy), takes the locks of the
services the plan touches, keeps them renewed while it runs, runs the executor with the store
recording every event (awaited, with bounded retries on database errors: the store is the
record, not a notifier), writes the final states from the execution's result, releases the
locks and returns the recorded deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployments.errors import DeployError, DeploymentRefused
from deployments.locks import LeaseGuard, holder_name, keep_renewing, lock_names, stop_renewing
from deployments.options import DirectorySource, ExecutionOptions, GitSource, Requester, Source
from deployments.recording import (
    Recovered,
    durable_recorder,
    mark_stopped,
    record_lost,
    record_result,
    recover,
    retrying,
    seed_simulation,
)
from planner.models import Manifest
from planner.plan import Plan
from planner.source import export_tree, load_manifest
from runners.base import Context
from runners.executor import Executor
from runners.outcome import ExecutionResult
from runners.registry import RunnerSet
from state.deployments import DeploymentRecord
from state.events import DeploymentKind, Subscriber
from state.locks import LockBusy
from state.store import Store

# directories never copied when a plain directory (not a Git revision) is deployed
SNAPSHOT_IGNORE = (".git", ".nixmox", ".venv", "__pycache__", "node_modules", ".terraform")
INVALID_PLAN = "the plan carries {count} error(s): nothing can be deployed"
CANNOT_PREPARE = "cannot prepare the files to deploy: {error}"

Prepare = Callable[[Path], Awaitable[tuple[Manifest, str | None]]]
"""Fills the work directory; returns the manifest deployed and the revision it is at."""
Execute = Callable[[Executor, Context], Awaitable[ExecutionResult]]
"""Runs the executor over the deployment's context."""


@dataclass(frozen=True)
class Work:
    """One deployment to run: its plan, kind and scope, how its files come, how it executes."""

    plan: Plan
    kind: DeploymentKind
    scope: str | None
    prepare: Prepare
    execute: Execute


@dataclass(frozen=True)
class Listeners:
    """Who hears about a deployment: event subscribers, and the report of recovered ones."""

    subscribers: Sequence[Subscriber] = ()
    on_recovered: Recovered | None = None


async def start_deployment(
    store: Store,
    plan: Plan,
    source: Source,
    *,
    requester: Requester | None = None,
    options: ExecutionOptions | None = None,
    kind: DeploymentKind = DeploymentKind.DEPLOY,
    scope: str | None = None,
    manifest: Manifest | None = None,
    subscribers: Sequence[Subscriber] = (),
    on_recovered: Recovered | None = None,
) -> DeploymentRecord | None:
    """Run a plan and return its recorded deployment (None: the plan has nothing to do).

    Raises DeploymentRefused (a lock is held by another deployment, named in the message) and
    DeployError (invalid plan, files that cannot be prepared); a failing step is not an
    exception: the record says `failed` / `rolled_back`. `scope` names the one service a
    restricted plan deploys, so the store does not take the revision as deployed for all.
    """
    if not plan.ok:
        raise DeployError(INVALID_PLAN.format(count=len(plan.errors)))
    if not plan.steps:
        return None
    work = Work(plan, kind, scope, preparer(source, plan, manifest), execute_plan(plan))
    listeners = Listeners(subscribers, on_recovered)
    return await run_locked(store, work, requester or Requester(), options, listeners)


def preparer(source: Source, plan: Plan, manifest: Manifest | None) -> Prepare:
    """How the work directory of a deployment from `source` is filled."""

    async def prepare(tree: Path) -> tuple[Manifest, str | None]:
        revision = await fill_tree(source, plan, tree)
        if manifest is not None:
            return manifest, revision
        found = await asyncio.to_thread(load_manifest, tree / source.manifest_path, tree)
        return found, revision

    return prepare


async def fill_tree(source: Source, plan: Plan, tree: Path) -> str | None:
    """Export the revision (or snapshot the directory) into `tree`; the revision deployed."""
    if isinstance(source, GitSource):
        revision = source.revision or plan.head
        if revision is None:
            raise DeployError("the plan names no revision to deploy")
        await asyncio.to_thread(export_tree, source.repo_dir, revision, tree)
        return revision
    assert isinstance(source, DirectorySource)
    await asyncio.to_thread(snapshot_directory, source.directory, tree)
    return None


def execute_plan(plan: Plan) -> Execute:
    """The executor running `plan` as planned."""

    async def execute(executor: Executor, ctx: Context) -> ExecutionResult:
        return await executor.execute(plan, ctx)

    return execute


async def run_locked(
    store: Store,
    work: Work,
    requester: Requester,
    options: ExecutionOptions | None,
    listeners: Listeners,
) -> DeploymentRecord:
    """Lock, record, run and release (see the module docstring)."""
    await recover(store, listeners.on_recovered)
    run = LockedRun(store, work, requester, options or ExecutionOptions(), listeners)
    await run.acquire()
    return await run.run()


@dataclass
class LockedRun:
    """One deployment between taking its locks and releasing them."""

    store: Store
    work: Work
    requester: Requester
    options: ExecutionOptions
    listeners: Listeners
    guard: LeaseGuard = field(default_factory=LeaseGuard)
    runners: RunnerSet | None = None
    created: bool = False

    def __post_init__(self) -> None:
        self.deployment_id = self.store.deployments.new_id()
        self.holder = holder_name(self.deployment_id)
        self.services = lock_names(self.work.plan)
        self.tree = self.options.work_root / self.deployment_id

    async def acquire(self) -> None:
        """Take the locks (waiting up to the lock wait); refused: audited, nothing recorded."""
        reason = f"{self.work.kind} requested by {self.requester.actor}"
        try:
            await self.store.locks.acquire(
                self.services,
                self.holder,
                lease=self.options.lock_lease,
                wait=self.options.lock_wait,
                reason=reason,
            )
        except LockBusy as busy:
            detail = {
                "services": self.services,
                "holder": busy.holder,
                "plan": self.work.plan.digest,
            }
            await self.store.audit.record(self.requester.actor, "deployment refused", detail)
            raise DeploymentRefused(busy) from None

    async def run(self) -> DeploymentRecord:
        """Record and execute while the locks are renewed; always release and clean up."""
        renewer = asyncio.create_task(
            keep_renewing(
                self.store, self.holder, self.options.lock_lease, self.services, self.guard.lose
            )
        )
        try:
            await self.record_and_execute()
        except BaseException as exc:
            if self.created:
                await mark_stopped(self.store, self.deployment_id, exc)
            raise
        finally:
            await stop_renewing(renewer)
            await self.clean_up()
        record = await self.store.deployments.get(self.deployment_id)
        assert record is not None
        return record

    async def record_and_execute(self) -> None:
        manifest, revision = await self.prepare()
        await self.create_record(manifest)
        executor = await self.executor()
        ctx = Context(self.deployment_id, manifest, self.work.plan, self.tree, revision)
        result = await self.guard.run(lambda: self.work.execute(executor, ctx))
        if result is not None:
            await retrying(lambda: record_result(self.store, result), "the final states")
        if self.guard.lost is not None:
            await record_lost(self.store, self.deployment_id, self.guard.lost)

    async def prepare(self) -> tuple[Manifest, str | None]:
        try:
            return await self.work.prepare(self.tree)
        except Exception as exc:
            raise DeployError(CANNOT_PREPARE.format(error=exc)) from exc

    async def create_record(self, manifest: Manifest) -> None:
        plan, who = self.work.plan, self.requester
        await self.store.deployments.create(
            kind=self.work.kind,
            trigger=who.trigger,
            plan=plan,
            requested_by=who.requested_by,
            approved_by=who.approved_by,
            holder=self.holder,
            scope=self.work.scope,
            lease=self.options.lock_lease,
            deployment_id=self.deployment_id,
            manifest=manifest,
        )
        self.created = True
        await self.store.audit.record(
            who.actor,
            f"{self.work.kind} started",
            {"deployment": self.deployment_id, "plan": plan.digest, "head": plan.head},
        )

    async def executor(self) -> Executor:
        self.runners = self.options.runner_set()
        await seed_simulation(self.store, self.runners)
        return Executor(
            self.runners,
            parallel=self.options.parallel,
            auto_rollback=self.options.auto_rollback,
            subscribers=self.listeners.subscribers,
            recorder=durable_recorder(self.store),
        )

    async def clean_up(self) -> None:
        """Release the locks, close runners we built, remove the work directory."""
        with contextlib.suppress(Exception):
            await self.store.locks.release(self.holder)
        if self.runners is not None and self.options.runners is None:
            with contextlib.suppress(Exception):
                await self.runners.close()
        await asyncio.to_thread(shutil.rmtree, self.tree, True)


def snapshot_directory(source: Path, dest: Path) -> Path:
    """Copy a plain directory (no Git) so edits during the deployment do not leak into it."""
    if not source.is_dir():
        raise DeployError(f"{source} is not a directory")
    work = dest.resolve()
    ignore = shutil.ignore_patterns(*SNAPSHOT_IGNORE)

    def skip(directory: str, names: list[str]) -> set[str]:
        skipped = set(ignore(directory, names))
        # never copy the work root into itself when it lives inside the source
        skipped |= {name for name in names if (Path(directory) / name).resolve() == work}
        return skipped

    shutil.copytree(source, dest, symlinks=True, ignore=skip, dirs_exist_ok=True)
    return dest

"""Deployments end to end, for the CLI, the GitHub bot and the Slack bot alike.

`run_deployment` exports the planned revision into a fresh work directory (so it deploys
exactly what was planned and approved, never a live working copy), takes the locks of the
services the plan touches, keeps them renewed while it runs, runs the executor with the store
recording every event (awaited, with bounded retries on database errors: the store is the
record, not a notifier), writes the final states from the execution's result, releases the
locks and returns the recorded deployment.
`plan_for_deploy` plans from the last successfully deployed revision, and `prepare_rollback` /
`run_rollback` roll services back (a deployment of kind `rollback`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from planner.models import Manifest
from planner.plan import NIX_PHASES, Phase, Plan, PlanOptions, Step, step_id
from planner.revisions import plan_revisions
from planner.source import (
    DEFAULT_MANIFEST_PATH,
    EvalCache,
    EvalLimits,
    UnknownRevision,
    export_tree,
    load_manifest,
    load_manifest_at,
    resolve_revision,
)
from runners.base import (
    Context,
    DeploymentFinished,
    DeploymentKind,
    DeploymentState,
    Event,
    StepFinished,
    StepState,
    Subscriber,
    Trigger,
)
from runners.config import RunnerConfig
from runners.executor import ExecutionResult, Executor
from runners.registry import RunnerKind, RunnerSet, build_runners
from state.deployments import DeploymentRecord
from state.locks import LockBusy, LockLost
from state.store import Store

log = logging.getLogger(__name__)

DEFAULT_LOCK_LEASE = timedelta(seconds=60)
DEFAULT_WORK_ROOT = Path(".nixmox") / "work"
# a store write is retried this many times, waiting RECORD_BACKOFF * 2**n seconds in between
# (about 6 s in all: a SQLite busy spell or a PostgreSQL failover), before the deployment fails
RECORD_RETRIES = 6
RECORD_BACKOFF = 0.1
# directories never copied when a plain directory (not a Git revision) is deployed
SNAPSHOT_IGNORE = (".git", ".nixmox", ".venv", "__pycache__", "node_modules", ".terraform")

REFUSED = "deployment refused: {error}. Wait for it to finish (--lock-wait SECONDS) or, if it is stale, `nixmox unlock {service}`"
INVALID_PLAN = "the plan carries {count} error(s): nothing can be deployed"
NO_SOURCE = "give either repo_dir (a Git repository) or workdir (a directory) to deploy from"
CRASHED = "the deployment stopped: {error}"
# a renewal found a lock gone or taken (its lease ran out while the renewals were starved)
LOST_LOCK = "lost the lock on {what}; stopped"
LOST_TO_NOBODY = "its expired lease (nobody holds it now)"
NO_DEPLOYMENTS = "no deployment recorded yet: nothing to roll back"
NO_PREVIOUS = (
    "deployment {id} recorded no previous system for {services}: nothing to roll back to "
    "(roll back to a revision with --to REF)"
)
NO_SYSTEMS = (
    "deployment {id} recorded no system for {services} (roll back to a revision with --to REF)"
)
# `--to DEPLOYMENT` refuses as a whole rather than restoring only part of what it installed
NOT_INSTALLED = (
    "deployment {id} did not leave a working system for {services} (its nix or verify step "
    "{states}): refusing to re-activate it. Roll back the other services one at a time "
    "(`nixmox rollback SERVICE --to {id}`) or to a revision with --to REF"
)
# how far back `rollback [SERVICE]` looks for a deployment that changed a system
UNDO_SEARCH = 50
# a service whose steps ended so in a deployment did not keep the system that deployment built
NOT_KEPT = frozenset({StepState.FAILED, StepState.ROLLED_BACK, StepState.SKIPPED})
NOT_IN_DEPLOYMENT = "deployment {id} did not touch {service}"
NO_MANIFEST = "deployment {id} has no recorded manifest: roll back with --to REF"
NEEDS_REPO = "{to!r} is not a deployment id; rolling back to a revision needs a Git repository"


class DeployError(Exception):
    """A deployment could not start; nothing ran and nothing was recorded."""


class DeploymentRefused(DeployError):
    """A service the plan touches is locked by another holder."""

    def __init__(self, busy: LockBusy) -> None:
        self.busy = busy
        super().__init__(REFUSED.format(error=busy, service=busy.service))


class RollbackError(DeployError):
    """Nothing to roll back to."""


def holder_name(deployment_id: str) -> str:
    """Who holds a deployment's locks: the deployment, on this host, in this process."""
    return f"deployment {deployment_id} ({socket.gethostname()}:{os.getpid()})"


def holder_label(holder: str | None) -> str:
    """How a lock holder is named in a note: `deployment X` without the host and pid."""
    if holder is None:
        return LOST_TO_NOBODY
    return holder.split(" (", 1)[0] if holder.startswith("deployment ") else holder


def lost_lock_note(lost: LockLost) -> str:
    """The note of a deployment stopped because it lost locks, grouped by who has them now."""
    by_holder: dict[str, list[str]] = {}
    for service, holder in sorted(lost.lost.items()):
        by_holder.setdefault(holder_label(holder), []).append(service)
    parts = [f"{', '.join(services)} to {holder}" for holder, services in by_holder.items()]
    return LOST_LOCK.format(what="; on ".join(parts))


def lock_names(plan: Plan) -> list[str]:
    """The services a plan touches, plus its global terraform roots (one at a time too)."""
    globals_ = [step.id for step in plan.steps if step.service is None]
    return sorted({*plan.services(), *globals_})


# --- planning ----------------------------------------------------------------------------------


async def deployed_base(
    store: Store, repo_dir: Path | str, service: str | None = None
) -> str | None:
    """The revision to plan from: what runs now (per service with `--service`), if Git knows it.

    None (plan everything) when nothing was deployed from this repository yet, e.g. only from
    a manifest file, or from a revision this repository does not have.
    """
    candidates: list[str | None] = []
    if service is not None:
        record = (await store.services.all()).get(service)
        candidates.append(record.revision if record is not None else None)
    candidates.append(await store.deployments.last_deployed_revision())
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            return await asyncio.to_thread(resolve_revision, repo_dir, candidate)
        except UnknownRevision:
            continue
    return None


async def plan_for_deploy(
    store: Store,
    repo_dir: Path | str,
    ref: str,
    *,
    service: str | None = None,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    options: PlanOptions | None = None,
    cache: EvalCache | None = None,
    limits: EvalLimits | None = None,
) -> Plan:
    """The plan from the last successfully deployed revision to `ref`.

    Deploying the revision that is already deployed has nothing to do (an empty plan).
    """
    base = await deployed_base(store, repo_dir, service)
    return await asyncio.to_thread(
        plan_revisions,
        repo_dir,
        base,
        ref,
        manifest_path=manifest_path,
        service=service,
        options=options,
        cache=cache,
        limits=limits,
    )


# --- running -----------------------------------------------------------------------------------


Recovered = Callable[[list[DeploymentRecord]], Awaitable[None]]


@dataclass
class Execution:
    """How to run: which runners, how wide, who hears about it, how long locks last."""

    runner_kind: RunnerKind | str = RunnerKind.REAL
    runner_config: RunnerConfig | None = None
    runners: RunnerSet | None = None  # a prebuilt set (shared transports); overrides the two above
    parallel: int = 4
    auto_rollback: bool = True
    subscribers: Sequence[Subscriber] = ()
    lock_lease: timedelta = DEFAULT_LOCK_LEASE
    lock_wait: float = 0.0
    work_root: Path = DEFAULT_WORK_ROOT
    # told about the deployments the start-of-deployment recovery marked interrupted
    on_recovered: Recovered | None = None

    def runner_set(self) -> RunnerSet:
        return self.runners or build_runners(self.runner_kind, self.runner_config)


@dataclass
class Who:
    """Who and what started a deployment (recorded with it)."""

    trigger: Trigger | str = Trigger.CLI
    requested_by: str | None = None
    approved_by: str | None = None


async def run_deployment(
    store: Store,
    plan: Plan,
    *,
    manifest: Manifest | None = None,
    repo_dir: Path | str | None = None,
    revision: str | None = None,
    workdir: Path | str | None = None,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    kind: DeploymentKind = DeploymentKind.DEPLOY,
    trigger: Trigger | str = Trigger.CLI,
    requested_by: str | None = None,
    approved_by: str | None = None,
    scope: str | None = None,
    runner_kind: RunnerKind | str = RunnerKind.REAL,
    runner_config: RunnerConfig | None = None,
    runners: RunnerSet | None = None,
    parallel: int = 4,
    auto_rollback: bool = True,
    subscribers: Sequence[Subscriber] = (),
    lock_lease: timedelta = DEFAULT_LOCK_LEASE,
    lock_wait: float = 0.0,
    work_root: Path | str = DEFAULT_WORK_ROOT,
    on_recovered: Recovered | None = None,
) -> DeploymentRecord | None:
    """Run a plan and return its recorded deployment (None: the plan has nothing to do).

    The files come from `repo_dir` at `revision` (default: the plan's head), exported into a
    fresh work directory, or from a plain `workdir`, snapshotted the same way. Raises
    DeploymentRefused (a lock is held by another deployment, named in the message) and
    DeployError (invalid plan, no source); a failing step is not an exception: the record
    says `failed` / `rolled_back`.
    """
    if not plan.ok:
        raise DeployError(INVALID_PLAN.format(count=len(plan.errors)))
    if not plan.steps:
        return None
    if repo_dir is None and workdir is None:
        raise DeployError(NO_SOURCE)
    execution = Execution(
        runner_kind,
        runner_config,
        runners,
        parallel,
        auto_rollback,
        subscribers,
        lock_lease,
        lock_wait,
        Path(work_root),
        on_recovered,
    )
    who = Who(trigger, requested_by, approved_by)
    revision = revision or (plan.head if repo_dir is not None else None)

    async def prepare(tree: Path) -> tuple[Manifest, str | None]:
        if repo_dir is not None:
            assert revision is not None
            await asyncio.to_thread(export_tree, repo_dir, revision, tree)
        else:
            await asyncio.to_thread(snapshot_directory, Path(workdir or "."), tree)
        found = manifest or await asyncio.to_thread(load_manifest, tree / manifest_path, tree)
        return found, revision

    async def execute(executor: Executor, ctx: Context) -> ExecutionResult:
        return await executor.execute(plan, ctx)

    return await _run(
        store,
        plan,
        kind=kind,
        scope=scope,
        who=who,
        execution=execution,
        prepare=prepare,
        execute=execute,
    )


async def preview_deployment(
    plan: Plan,
    *,
    manifest: Manifest,
    workdir: Path | str = ".",
    revision: str | None = None,
    runner_kind: RunnerKind | str = RunnerKind.REAL,
    runner_config: RunnerConfig | None = None,
) -> list[tuple[str, list[str]]]:
    """Dry run: each step (wave order) with the exact command lines it would run."""
    runners = build_runners(runner_kind, runner_config)
    try:
        ctx = Context("dry-run", manifest, plan, Path(workdir), revision, dry_run=True)
        return Executor(runners).dry_run(plan, ctx)
    finally:
        await runners.close()


async def _run(
    store: Store,
    plan: Plan,
    *,
    kind: DeploymentKind,
    scope: str | None,
    who: Who,
    execution: Execution,
    prepare: Callable[[Path], Awaitable[tuple[Manifest, str | None]]],
    execute: Callable[[Executor, Context], Awaitable[ExecutionResult]],
) -> DeploymentRecord:
    """Lock, record, run and release: the part every kind of deployment shares."""
    await _recover(store, execution.on_recovered)
    deployment_id = store.deployments.new_id()
    holder = holder_name(deployment_id)
    services = lock_names(plan)
    reason = f"{kind} requested by {who.requested_by or who.trigger}"
    try:
        await store.locks.acquire(
            services,
            holder,
            lease=execution.lock_lease,
            wait=execution.lock_wait,
            reason=reason,
        )
    except LockBusy as busy:
        await store.audit.record(
            who.requested_by or str(who.trigger),
            "deployment refused",
            {"services": services, "holder": busy.holder, "plan": plan.digest},
        )
        raise DeploymentRefused(busy) from None
    guard = LeaseGuard()
    renewer = asyncio.create_task(
        _keep_renewing(store, holder, execution.lock_lease, services, guard.lose)
    )
    tree = Path(execution.work_root) / deployment_id
    runners: RunnerSet | None = None
    created = False
    try:
        try:
            manifest, revision = await prepare(tree)
        except Exception as exc:
            raise DeployError(f"cannot prepare the files to deploy: {exc}") from exc
        await store.deployments.create(
            kind=kind,
            trigger=who.trigger,
            plan=plan,
            requested_by=who.requested_by,
            approved_by=who.approved_by,
            holder=holder,
            scope=scope,
            lease=execution.lock_lease,
            deployment_id=deployment_id,
            manifest=manifest,
        )
        created = True
        await store.audit.record(
            who.requested_by or str(who.trigger),
            f"{kind} started",
            {"deployment": deployment_id, "plan": plan.digest, "head": plan.head},
        )
        runners = execution.runner_set()
        await _seed_simulation(store, runners)
        executor = Executor(
            runners,
            parallel=execution.parallel,
            auto_rollback=execution.auto_rollback,
            subscribers=execution.subscribers,
            recorder=durable_recorder(store),
        )
        ctx = Context(deployment_id, manifest, plan, tree, revision)
        result = await guard.run(execute(executor, ctx))
        if result is not None:
            await _retrying(lambda: record_result(store, result), "the final states")
        if guard.lost is not None:
            await _record_lost(store, deployment_id, guard.lost)
    except BaseException as exc:
        if created:
            await _mark_stopped(store, deployment_id, exc)
        raise
    finally:
        renewer.cancel()
        await asyncio.gather(renewer, return_exceptions=True)
        with contextlib.suppress(Exception):
            await store.locks.release(holder)
        if runners is not None and execution.runners is None:
            with contextlib.suppress(Exception):
                await runners.close()
        await asyncio.to_thread(shutil.rmtree, tree, True)
    record = await store.deployments.get(deployment_id)
    assert record is not None
    return record


async def _recover(store: Store, on_recovered: Recovered | None) -> None:
    """Interrupt what dead processes left running; tell `on_recovered` (e.g. the bot's report)."""
    recovered = await store.deployments.recover_interrupted()
    if not recovered or on_recovered is None:
        return
    try:
        await on_recovered(recovered)
    except Exception:
        log.exception("reporting %d interrupted deployment(s) failed", len(recovered))


async def _retrying(write: Callable[[], Awaitable[None]], what: object) -> None:
    """One store write, retried with backoff on database errors; the last error is raised."""
    for attempt in range(RECORD_RETRIES + 1):
        try:
            await write()
            return
        except DBAPIError as exc:
            if attempt == RECORD_RETRIES:
                raise
            log.warning("recording %s failed (%s); retrying", what, exc.__class__.__name__)
            await asyncio.sleep(RECORD_BACKOFF * 2**attempt)


def durable_recorder(store: Store) -> Subscriber:
    """The executor's recorder: each event written to the store, retried on database errors."""

    async def record(event: Event) -> None:
        await _retrying(lambda: store.deployments.record_event(event), event)

    return record


async def record_result(store: Store, result: ExecutionResult) -> None:
    """Write the final step and deployment states of an execution (idempotent: only what the
    recorded events did not already leave so, then the deployment's end)."""
    record = await store.deployments.get(result.deployment_id)
    recorded = {step.id: step.state for step in record.steps} if record is not None else {}
    for sid, outcome in result.steps.items():
        if outcome.state in (StepState.PENDING, StepState.RUNNING):
            continue
        if recorded.get(sid) is outcome.state:
            continue
        await store.deployments.record_event(
            StepFinished(
                result.deployment_id,
                outcome.step,
                outcome.state,
                outcome.result,
                outcome.reason,
                at=outcome.finished_at or result.finished_at,
            )
        )
    if record is None or record.state is not result.state or record.finished_at is None:
        await store.deployments.record_event(
            DeploymentFinished(result.deployment_id, result.state, at=result.finished_at)
        )


async def _seed_simulation(store: Store, runners: RunnerSet) -> None:
    """Simulated hosts start from the systems the store says they run (across processes)."""
    hosts = getattr(runners.rollback, "hosts", None)
    if runners.kind is not RunnerKind.SIMULATE or hosts is None:
        return
    for name, record in (await store.services.all()).items():
        if record.system_path:
            hosts.running.setdefault(name, record.system_path)


class LeaseGuard:
    """Runs the execution so that losing a lock cancels it (the executor interrupts its steps)."""

    def __init__(self) -> None:
        self.lost: LockLost | None = None
        self.work: asyncio.Future[ExecutionResult] | None = None

    def lose(self, lost: LockLost) -> None:
        """Called by the renewal task: remember what was lost and stop the execution."""
        self.lost = lost
        if self.work is not None:
            self.work.cancel()

    async def run(self, work: Awaitable[ExecutionResult]) -> ExecutionResult | None:
        """The execution's result; None when it was stopped (or never started) for a lost lock."""
        if self.lost is not None:
            # lost before the execution began: nothing ran on the hosts, do not start now
            with contextlib.suppress(AttributeError):
                work.close()  # type: ignore[attr-defined]
            return None
        self.work = asyncio.ensure_future(work)
        try:
            return await self.work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            # our own cancellation (Ctrl-C, shutdown) goes on up; only the guard's is absorbed
            if self.lost is None or (current is not None and current.cancelling()):
                raise
            return None
        finally:
            self.work = None


async def _record_lost(store: Store, deployment_id: str, lost: LockLost) -> None:
    """End a deployment that lost a lock `interrupted`, saying to whom."""
    note = lost_lock_note(lost)
    log.warning("deployment %s: %s", deployment_id, note)
    await _retrying(
        lambda: store.deployments.set_state(deployment_id, DeploymentState.INTERRUPTED, note=note),
        "the lost lock",
    )
    with contextlib.suppress(Exception):
        await store.audit.record(
            f"deployment {deployment_id}",
            "lock lost",
            {"deployment": deployment_id, "lost": lost.lost},
        )


async def _keep_renewing(
    store: Store,
    holder: str,
    lease: timedelta,
    services: Sequence[str],
    on_lost: Callable[[LockLost], None],
) -> None:
    """Renew the leases well before they run out; a failed renewal is retried next time.

    A lock found gone or taken by another holder is lost for good: `on_lost` stops the run.
    """
    interval = max(lease.total_seconds() / 3, 0.05)
    while True:
        await asyncio.sleep(interval)
        try:
            await store.locks.renew(holder, lease, services)
        except LockLost as lost:
            log.error("deployment holder %s: %s", holder, lost)
            on_lost(lost)
            return
        except Exception:
            log.exception("renewing the locks of %s failed", holder)


async def _mark_stopped(store: Store, deployment_id: str, exc: BaseException) -> None:
    """A deployment that ended by an exception (or Ctrl-C) is not left `running`."""
    record = await store.deployments.get(deployment_id)
    if record is None or record.state not in (DeploymentState.QUEUED, DeploymentState.RUNNING):
        return
    cancelled = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
    state = DeploymentState.INTERRUPTED if cancelled else DeploymentState.FAILED
    note = "interrupted by the operator" if cancelled else CRASHED.format(error=exc)
    with contextlib.suppress(Exception):
        await store.deployments.set_state(deployment_id, state, note=note)


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


# --- rollback ----------------------------------------------------------------------------------


@dataclass
class RollbackPlan:
    """What a rollback will do: activate recorded systems, or deploy an older revision."""

    plan: Plan
    manifest: Manifest
    targets: dict[str, str] = field(default_factory=dict)  # service -> system path
    revision: str | None = None  # the revision the services end up at
    repo_dir: Path | None = None  # set when the rollback deploys a revision
    scope: str | None = None
    source_deployment: str | None = None
    description: str = ""

    @property
    def by_revision(self) -> bool:
        return self.repo_dir is not None


def _nix_steps(record: DeploymentRecord, services: Iterable[str]) -> dict[str, list[str | None]]:
    wanted = set(services)
    nix = {str(phase) for phase in NIX_PHASES}
    found: dict[str, list[str | None]] = {}
    for step in record.steps:
        if step.service in wanted and step.phase in nix:
            found.setdefault(step.service, [None, None])
            previous, new = found[step.service]
            found[step.service] = [previous or step.previous_system, step.new_system or new]
    return found


def rollback_steps(
    manifest: Manifest, targets: dict[str, str], base: str | None, head: str | None
) -> Plan:
    """The plan of activating recorded systems: per service, activate, then verify."""
    ctx = Context("rollback", manifest, Plan(base=base, head=head), Path("."))
    # the executor owns the shape of a rollback plan; planning it needs no real runner
    return Executor(build_runners(RunnerKind.SIMULATE)).rollback_plan(targets, ctx, targets)


async def prepare_rollback(
    store: Store,
    *,
    service: str | None = None,
    to: str | None = None,
    repo_dir: Path | str | None = None,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    limits: EvalLimits | None = None,
) -> RollbackPlan:
    """Work out a rollback.

    - no `to`: each service of the last deployment (or `service`) back to the system it ran
      before that deployment;
    - `to` a deployment id: the systems that deployment installed;
    - `to` anything else: a Git ref, deployed (from `repo_dir`) as a rollback.
    """
    if to is not None:
        record = await store.deployments.get(to)
        if record is not None:
            return _to_deployment(record, service)
        if repo_dir is None:
            raise RollbackError(NEEDS_REPO.format(to=to))
        return await _to_revision(store, Path(repo_dir), to, service, manifest_path, limits)
    found = [r for r in await store.deployments.history(service, limit=UNDO_SEARCH) if _finished(r)]
    if not found:
        raise RollbackError(NO_DEPLOYMENTS)
    # a deployment that only re-verified a service changed nothing there: undo the newest
    # one that recorded the system it replaced
    changed = next((r for r in found if _replaced_systems(r, service)), found[0])
    return _undo(changed, service)


def _replaced_systems(record: DeploymentRecord, service: str | None) -> bool:
    """Whether `record` recorded, for `service` (or any of its services), a replaced system."""
    services = record.services if service is None else [service]
    return any(pair[0] for pair in _nix_steps(record, services).values())


def _finished(record: DeploymentRecord) -> bool:
    return record.state not in (DeploymentState.QUEUED, DeploymentState.RUNNING)


def _recorded_manifest(record: DeploymentRecord) -> Manifest:
    manifest = record.manifest
    if manifest is None:
        raise RollbackError(NO_MANIFEST.format(id=record.id))
    return manifest


def _services_of(record: DeploymentRecord, service: str | None) -> list[str]:
    if service is None:
        return record.services
    if service not in record.services:
        raise RollbackError(NOT_IN_DEPLOYMENT.format(id=record.id, service=service))
    return [service]


def _undo(record: DeploymentRecord, service: str | None) -> RollbackPlan:
    """Back to the systems the services ran before `record`."""
    manifest = _recorded_manifest(record)
    services = _services_of(record, service)
    systems = _nix_steps(record, services)
    targets = {name: pair[0] for name, pair in systems.items() if pair[0]}
    if not targets:
        raise RollbackError(NO_PREVIOUS.format(id=record.id, services=", ".join(services)))
    plan = rollback_steps(manifest, targets, record.head, record.base)
    return RollbackPlan(
        plan=plan,
        manifest=manifest,
        targets=targets,
        revision=record.base,
        scope=service if service is not None else record.scope,
        source_deployment=record.id,
        description=f"undo deployment {record.id}: {', '.join(sorted(targets))} back to "
        "the systems they ran before it",
    )


def _not_kept(record: DeploymentRecord, services: Iterable[str]) -> dict[str, StepState]:
    """Services whose nix or verify step in `record` did not succeed, with that step's state
    (an auto-rolled-back system is broken: it must not be re-activated)."""
    wanted = set(services)
    phases = {str(phase) for phase in (*NIX_PHASES, Phase.VERIFY)}
    broken: dict[str, StepState] = {}
    for step in record.steps:
        if step.service in wanted and step.phase in phases and step.state in NOT_KEPT:
            broken.setdefault(step.service, step.state)
    return broken


def _to_deployment(record: DeploymentRecord, service: str | None) -> RollbackPlan:
    """Back to the systems `record` installed."""
    manifest = _recorded_manifest(record)
    services = _services_of(record, service)
    broken = _not_kept(record, services)
    if broken:
        states = ", ".join(sorted({str(state).replace("_", " ") for state in broken.values()}))
        raise RollbackError(
            NOT_INSTALLED.format(id=record.id, services=", ".join(sorted(broken)), states=states)
        )
    systems = _nix_steps(record, services)
    targets = {name: pair[1] for name, pair in systems.items() if pair[1]}
    if not targets:
        raise RollbackError(NO_SYSTEMS.format(id=record.id, services=", ".join(services)))
    plan = rollback_steps(manifest, targets, None, record.head)
    return RollbackPlan(
        plan=plan,
        manifest=manifest,
        targets=targets,
        revision=record.head,
        scope=service if service is not None else record.scope,
        source_deployment=record.id,
        description=f"{', '.join(sorted(targets))} back to the systems of deployment {record.id}",
    )


async def _to_revision(
    store: Store,
    repo_dir: Path,
    ref: str,
    service: str | None,
    manifest_path: str,
    limits: EvalLimits | None,
) -> RollbackPlan:
    """Deploy an older revision, as a rollback."""
    plan = await plan_for_deploy(
        store, repo_dir, ref, service=service, manifest_path=manifest_path, limits=limits
    )
    head = plan.head or await asyncio.to_thread(resolve_revision, repo_dir, ref)
    manifest = await asyncio.to_thread(
        load_manifest_at, repo_dir, head, manifest_path, limits=limits
    )
    return RollbackPlan(
        plan=plan,
        manifest=manifest,
        revision=head,
        repo_dir=repo_dir,
        scope=service,
        description=f"deploy revision {ref} ({head[:12]})",
    )


async def run_rollback(
    store: Store,
    rollback: RollbackPlan,
    *,
    trigger: Trigger | str = Trigger.CLI,
    requested_by: str | None = None,
    approved_by: str | None = None,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    runner_kind: RunnerKind | str = RunnerKind.REAL,
    runner_config: RunnerConfig | None = None,
    runners: RunnerSet | None = None,
    parallel: int = 4,
    subscribers: Sequence[Subscriber] = (),
    lock_lease: timedelta = DEFAULT_LOCK_LEASE,
    lock_wait: float = 0.0,
    work_root: Path | str = DEFAULT_WORK_ROOT,
    on_recovered: Recovered | None = None,
) -> DeploymentRecord | None:
    """Run a prepared rollback; recorded as a deployment of kind `rollback`."""
    common = {
        "trigger": trigger,
        "requested_by": requested_by,
        "approved_by": approved_by,
        "runner_kind": runner_kind,
        "runner_config": runner_config,
        "runners": runners,
        "parallel": parallel,
        "subscribers": subscribers,
        "lock_lease": lock_lease,
        "lock_wait": lock_wait,
        "work_root": work_root,
        "on_recovered": on_recovered,
    }
    if rollback.by_revision:
        return await run_deployment(
            store,
            rollback.plan,
            manifest=rollback.manifest,
            repo_dir=rollback.repo_dir,
            revision=rollback.revision,
            manifest_path=manifest_path,
            kind=DeploymentKind.ROLLBACK,
            scope=rollback.scope,
            **common,  # type: ignore[arg-type]
        )
    execution = Execution(
        runner_kind,
        runner_config,
        runners,
        parallel,
        False,  # a rollback that fails is not rolled back again
        subscribers,
        lock_lease,
        lock_wait,
        Path(work_root),
        on_recovered,
    )

    async def prepare(tree: Path) -> tuple[Manifest, str | None]:
        tree.mkdir(parents=True, exist_ok=True)  # activating recorded systems needs no files
        return rollback.manifest, rollback.revision

    async def execute(executor: Executor, ctx: Context) -> ExecutionResult:
        ctx.plan = rollback.plan
        return await executor.rollback_services(sorted(rollback.targets), ctx, rollback.targets)

    return await _run(
        store,
        rollback.plan,
        kind=DeploymentKind.ROLLBACK,
        scope=rollback.scope,
        who=Who(trigger, requested_by, approved_by),
        execution=execution,
        prepare=prepare,
        execute=execute,
    )


# --- live health -------------------------------------------------------------------------------


async def check_health(
    store: Store,
    manifest: Manifest,
    services: Iterable[str],
    *,
    runner_kind: RunnerKind | str = RunnerKind.REAL,
    runner_config: RunnerConfig | None = None,
    parallel: int = 4,
) -> dict[str, tuple[bool, str]]:
    """Run each service's health checks now; record and return (healthy, last output line)."""
    runners = build_runners(runner_kind, runner_config)
    limit = asyncio.Semaphore(max(parallel, 1))
    ctx = Context("status", manifest, Plan(), Path("."))

    async def one(service: str) -> tuple[str, tuple[bool, str]]:
        step = Step(id=step_id(Phase.VERIFY, service), phase=Phase.VERIFY, service=service)
        async with limit:
            try:
                result = await runners.verify.run(step, ctx)
                ok, output = result.ok, runners.redactor.text(result.output)
            except Exception as exc:
                ok, output = False, f"health check failed to run: {exc}"
        await store.services.set_health(service, "healthy" if ok else "unhealthy")
        lines = [line for line in output.strip().splitlines() if line.strip()]
        return service, (ok, lines[-1] if lines else "")

    try:
        return dict(await asyncio.gather(*(one(service) for service in sorted(services))))
    finally:
        await runners.close()

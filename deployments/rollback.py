"""Rolling back: work out what a rollback does, then run it (a deployment of kind `rollback`).

- no `to`: each service of the last deployment (or one) back to the system it ran before it;
- `to` a deployment id: the systems that deployment installed;
- `to` anything else: a Git ref, deployed (from a repository) as a rollback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deployments.base import plan_for_deploy
from deployments.errors import RollbackError
from deployments.options import ExecutionOptions, GitSource, Requester
from deployments.recording import Recovered
from deployments.run import Execute, Listeners, Prepare, Work, run_locked, start_deployment
from planner.models import Manifest
from planner.plan import NIX_PHASES, Phase, Plan
from planner.source import DEFAULT_MANIFEST_PATH, EvalLimits, load_manifest_at, resolve_revision
from runners.base import Context
from runners.executor import Executor
from runners.outcome import ExecutionResult
from runners.registry import RunnerKind, build_runners
from state.deployments import DeploymentRecord
from state.events import DeploymentKind, DeploymentState, StepState, Subscriber
from state.store import Store

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
    description = (
        f"undo deployment {record.id}: {', '.join(sorted(targets))} back to "
        "the systems they ran before it"
    )
    return _rollback_plan(record, service, manifest, targets, record.head, record.base, description)


def _rollback_plan(
    record: DeploymentRecord,
    service: str | None,
    manifest: Manifest,
    targets: dict[str, str],
    base: str | None,
    head: str | None,
    description: str,
) -> RollbackPlan:
    """The rollback of `record` (or of its `service`) to `targets`, ending at revision `head`."""
    return RollbackPlan(
        plan=rollback_steps(manifest, targets, base, head),
        manifest=manifest,
        targets=targets,
        revision=head,
        scope=service if service is not None else record.scope,
        source_deployment=record.id,
        description=description,
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
    description = f"{', '.join(sorted(targets))} back to the systems of deployment {record.id}"
    return _rollback_plan(record, service, manifest, targets, None, record.head, description)


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
    head = plan.head
    if head is None:
        head = await asyncio.to_thread(resolve_revision, repo_dir, ref)
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


async def start_rollback(
    store: Store,
    rollback: RollbackPlan,
    *,
    requester: Requester | None = None,
    options: ExecutionOptions | None = None,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    subscribers: Sequence[Subscriber] = (),
    on_recovered: Recovered | None = None,
) -> DeploymentRecord | None:
    """Run a prepared rollback; recorded as a deployment of kind `rollback`."""
    if rollback.repo_dir is not None:
        return await start_deployment(
            store,
            rollback.plan,
            GitSource(rollback.repo_dir, rollback.revision, manifest_path),
            requester=requester,
            options=options,
            kind=DeploymentKind.ROLLBACK,
            scope=rollback.scope,
            manifest=rollback.manifest,
            subscribers=subscribers,
            on_recovered=on_recovered,
        )
    work = Work(
        rollback.plan,
        DeploymentKind.ROLLBACK,
        rollback.scope,
        activation_files(rollback),
        activate_systems(rollback),
    )
    # a rollback that fails is not rolled back again
    quiet = (options or ExecutionOptions()).without_auto_rollback()
    listeners = Listeners(subscribers, on_recovered)
    return await run_locked(store, work, requester or Requester(), quiet, listeners)


def activation_files(rollback: RollbackPlan) -> Prepare:
    """Activating recorded systems needs no files: an empty work directory."""

    async def prepare(tree: Path) -> tuple[Manifest, str | None]:
        tree.mkdir(parents=True, exist_ok=True)
        return rollback.manifest, rollback.revision

    return prepare


def activate_systems(rollback: RollbackPlan) -> Execute:
    """The executor activating the recorded systems of the rollback's services."""

    async def execute(executor: Executor, ctx: Context) -> ExecutionResult:
        ctx.plan = rollback.plan
        return await executor.rollback_services(sorted(rollback.targets), ctx, rollback.targets)

    return execute

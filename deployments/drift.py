"""Drift: what runs, or what the default branch holds, is not what the bot last deployed.

Three kinds, all report-only:

- `system`: a host's current system (the nixos runner's `record` command) is not the one the
  last successful deployment recorded; someone rebuilt or rolled back by hand.
- `pending`: the default branch holds changes not deployed; the planner gives the plan's size.
- `terraform`: `terraform plan -detailed-exitcode` of a global root exits 2 (resources would
  change); a redacted summary of which.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from deployments.base import plan_for_deploy
from planner.models import Manifest
from planner.plan import GLOBAL_PHASES, Phase, Plan, UnknownService
from planner.source import DEFAULT_MANIFEST_PATH, EvalLimits, export_tree, resolve_revision
from runners.base import Context
from runners.config import RunnerConfig
from runners.nixos import HostError, NixosRunner, RecordError
from runners.redact import Redactor
from runners.terraform import TerraformRunner, Workspace
from state.events import DeploymentKind
from state.health import DriftRecord
from state.store import Store

IN_SYNC = "in sync"
DRIFTED = "drifted"
TF_PLAN = "{tf} plan -input=false -no-color -lock=false -detailed-exitcode"
TF_CHANGE = re.compile(r"^\s*#\s+(\S+.*?)\s+(will be|must be)\s+(.+)$")
TF_DRIFTED_RC = 2
SUMMARY_LINES = 20
AFTER_ROLLBACK = (
    "pending is expected after the rollback {id}: the default branch is ahead of what runs, "
    "and nothing redeploys by itself (deploy it again when it is fixed)"
)
UNREADABLE = "unknown: {error}"
NO_ROOT = "not in the deployed revision"


class DriftKind(StrEnum):
    SYSTEM = "system"
    PENDING = "pending"
    TERRAFORM = "terraform"


@dataclass(frozen=True)
class SystemDrift:
    service: str
    expected: str
    actual: str

    def to_json(self) -> dict[str, str]:
        return {"kind": DriftKind.SYSTEM.value, "expected": self.expected, "actual": self.actual}


@dataclass(frozen=True)
class Pending:
    revision: str
    steps: int
    deployed: str | None

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "steps": self.steps}


@dataclass(frozen=True)
class TerraformState:
    """One global root: `in sync`, `drifted` (with what would change) or `error: ...`."""

    status: str
    changes: tuple[str, ...] = ()

    @property
    def drifted(self) -> bool:
        return self.status == DRIFTED


@dataclass
class DriftReport:
    services: dict[str, list[SystemDrift]] = field(default_factory=dict)
    pending: Pending | None = None
    terraform: dict[str, TerraformState] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return (
            any(self.services.values())
            or self.pending is not None
            or any(state.drifted for state in self.terraform.values())
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "services": {
                name: [item.to_json() for item in found]
                for name, found in sorted(self.services.items())
            },
            "pending": self.pending.to_json() if self.pending is not None else None,
            "terraform": {root: state.status for root, state in sorted(self.terraform.items())},
        }

    def findings(self) -> list[DriftRecord]:
        """The drifts as store records (subject, kind): what `serve` compares between runs."""
        from state.events import utcnow

        now = utcnow()
        found = [
            DriftRecord(item.service, DriftKind.SYSTEM, item.expected, item.actual, None, now, now)
            for items in self.services.values()
            for item in items
        ]
        if self.pending is not None:
            found.append(
                DriftRecord(
                    DriftKind.PENDING,
                    DriftKind.PENDING,
                    self.pending.deployed,
                    self.pending.revision,
                    f"{self.pending.steps} step(s)",
                    now,
                    now,
                )
            )
        for root, state in self.terraform.items():
            if state.drifted:
                detail = "\n".join(state.changes)
                found.append(
                    DriftRecord(root, DriftKind.TERRAFORM, None, DRIFTED, detail, now, now)
                )
        return found


# --- system ------------------------------------------------------------------------------------


async def system_drift(
    store: Store, manifest: Manifest, nixos: NixosRunner, redactor: Redactor
) -> dict[str, list[SystemDrift]]:
    """Each deployed service whose host runs another system than the one recorded."""
    recorded = {
        name: record.system_path
        for name, record in (await store.services.all()).items()
        if record.system_path and name in manifest.enabled()
    }
    ctx = Context("drift", manifest, Plan(), Path("."))

    async def one(service: str, expected: str) -> tuple[str, SystemDrift | None]:
        try:
            actual = await nixos.record(service, ctx)
        except (HostError, RecordError) as exc:
            actual = UNREADABLE.format(error=redactor.text(str(exc)))
        return service, None if actual == expected else SystemDrift(service, expected, actual)

    results = await asyncio.gather(*(one(name, path) for name, path in sorted(recorded.items())))
    return {name: [found] for name, found in results if found is not None}


# --- pending -----------------------------------------------------------------------------------


async def pending_drift(
    store: Store,
    repo_dir: Path,
    head: str,
    *,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    limits: EvalLimits | None = None,
) -> Pending | None:
    """The default branch's head, when deploying it has steps to run: for the homelab as last
    deployed, and for each service a scoped deployment or rollback left at another revision."""
    revision = await asyncio.to_thread(resolve_revision, repo_dir, head)
    deployed = await store.deployments.last_deployed_revision()
    behind = sorted(
        name
        for name, record in (await store.services.all()).items()
        if record.revision is not None and record.revision != revision
    )
    if deployed == revision and not behind:
        return None
    scopes: list[str | None] = [None] if deployed != revision else list(behind)
    steps: set[str] = set()
    for scope in scopes:
        try:
            plan = await plan_for_deploy(
                store, repo_dir, revision, service=scope, manifest_path=manifest_path, limits=limits
            )
        except UnknownService:
            continue  # the service is gone from the default branch: the whole plan covers it
        if not plan.ok:
            return Pending(revision, 0, deployed)  # not deployable as it is: still not deployed
        steps.update(step.id for step in plan.steps)
    return Pending(revision, len(steps), deployed) if steps else None


async def rollback_note(store: Store) -> str | None:
    """Said when the newest deployment is a rollback: pending is then expected."""
    last = await store.deployments.last()
    if last is not None and last.kind is DeploymentKind.ROLLBACK:
        return AFTER_ROLLBACK.format(id=last.id)
    return None


# --- terraform ---------------------------------------------------------------------------------


def changes_of(output: str, redactor: Redactor) -> tuple[str, ...]:
    """`# terraform_data.x will be updated in-place` lines: which resources would change."""
    found = []
    for line in output.splitlines():
        match = TF_CHANGE.match(line)
        if match:
            found.append(redactor.text(f"{match.group(1)} {match.group(2)} {match.group(3)}"))
    return tuple(found[:SUMMARY_LINES])


async def root_drift(
    runner: TerraformRunner, phase: Phase, tree: Path, manifest: Manifest
) -> TerraformState:
    """`plan -detailed-exitcode` of one global root, in the bot's state and data directory."""
    root = runner.config.roots.get(phase.value)
    assert root
    directory = (tree / root).resolve()
    if not directory.is_dir():
        return TerraformState(NO_ROOT)
    if shutil.which(runner.config.binary) is None:
        return TerraformState(f"error: {runner.config.binary} is not installed")
    ws = Workspace(phase, None, root, directory, runner.config.global_workspace)
    ctx = Context("drift", manifest, Plan(), tree)
    redactor = runner.redactor.with_values(runner.step_secrets([ws], ctx))
    planned, result = await runner.drift_plan(ws, TF_PLAN)
    if planned and result.rc == TF_DRIFTED_RC:
        return TerraformState(DRIFTED, changes_of(result.stdout, redactor))
    if not result.ok:
        last = [text for text in result.combined().splitlines() if text.strip()]
        detail = redactor.text(last[-1].strip() if last else f"exit status {result.rc}")
        return TerraformState(f"error: {detail}")
    return TerraformState(IN_SYNC)


async def terraform_drift(
    store: Store, repo_dir: Path, manifest: Manifest, config: RunnerConfig, redactor: Redactor
) -> dict[str, TerraformState]:
    """Each configured global root at the last deployed revision."""
    revision = await store.deployments.last_deployed_revision()
    phases = sorted(
        (phase for phase in GLOBAL_PHASES if config.terraform.roots.get(phase.value)), key=str
    )
    if revision is None or not phases:
        return {}
    runner = TerraformRunner(config.terraform, redactor=redactor)
    with tempfile.TemporaryDirectory(prefix="nixmox-drift-") as scratch:
        tree = Path(scratch) / "tree"
        try:
            await asyncio.to_thread(export_tree, repo_dir, revision, tree)
        except Exception as exc:
            error = f"error: cannot export {revision[:12]}: {exc}"
            return {phase.value: TerraformState(error) for phase in phases}
        return {phase.value: await root_drift(runner, phase, tree, manifest) for phase in phases}


# --- everything --------------------------------------------------------------------------------


async def detect_drift(
    store: Store,
    manifest: Manifest | None,
    config: RunnerConfig,
    nixos: NixosRunner,
    redactor: Redactor,
    *,
    repo_dir: Path | None = None,
    head: str = "HEAD",
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    kinds: Iterable[DriftKind] = tuple(DriftKind),
) -> DriftReport:
    """Every kind of drift asked for (pending and terraform need the repository)."""
    wanted = set(kinds)
    report = DriftReport()
    if manifest is not None and DriftKind.SYSTEM in wanted:
        report.services = await system_drift(store, manifest, nixos, redactor)
    if repo_dir is not None and DriftKind.PENDING in wanted:
        report.pending = await pending_drift(store, repo_dir, head, manifest_path=manifest_path)
        note = await rollback_note(store) if report.pending is not None else None
        if note:
            report.notes.append(note)
    if repo_dir is not None and manifest is not None and DriftKind.TERRAFORM in wanted:
        report.terraform = await terraform_drift(store, repo_dir, manifest, config, redactor)
    return report

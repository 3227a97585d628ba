"""Deploy orchestration: exported revisions, locks, leases, recording, rollbacks, live health."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import git
import pytest

from deployments import (
    DeployError,
    DeploymentRefused,
    DirectorySource,
    ExecutionOptions,
    GitSource,
    Requester,
    RollbackError,
    check_health,
    holder_name,
    lock_names,
    plan_for_deploy,
    prepare_rollback,
    preview_deployment,
    start_deployment,
    start_rollback,
)
from planner.plan import Phase, Step
from runners.base import Context
from runners.config import RunnerConfig, SimulateConfig
from runners.registry import RunnerKind, RunnerSet
from state.events import (
    DeploymentKind,
    DeploymentState,
    Event,
    StepResult,
    StepState,
    Trigger,
    utcnow,
)
from state.locks import LockBusy
from state.schema import locks
from state.store import Store
from tests.fixtures_manifests import MANIFEST_PATH, REPO_ROOT, SMALL_MANIFEST

SMALL = SMALL_MANIFEST.read_text()
FAST = RunnerConfig(simulate=SimulateConfig(scale=0.005))


def simulated_in(
    tmp_path: Path, config: RunnerConfig = FAST, work: str = "work"
) -> ExecutionOptions:
    """Simulated runners, exporting revisions under `tmp_path / work`."""
    return ExecutionOptions(
        runner_kind=RunnerKind.SIMULATE, runner_config=config, work_root=tmp_path / work
    )


def main_source(repo: git.Repo) -> GitSource:
    """The test repository's revisions, manifest at MANIFEST_PATH."""
    return GitSource(Path(str(repo.working_tree_dir)), manifest_path=MANIFEST_PATH)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/state.db"
    return request.getfixturevalue("postgres_database")


def commit(repo: git.Repo, old: str, new: str, message: str) -> str:
    path = Path(repo.working_tree_dir) / MANIFEST_PATH
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    repo.index.add([MANIFEST_PATH])
    return repo.index.commit(message).hexsha


@dataclass
class Recorder:
    """A runner for every phase that records what it saw in the work directory."""

    seconds: float = 0.0
    seen: list[tuple[str, Path, str]] = field(default_factory=list)
    release: asyncio.Event | None = None

    async def run(self, step: Step, ctx: Context) -> StepResult:
        manifest = ctx.workdir / MANIFEST_PATH
        text = manifest.read_text() if manifest.exists() else ""
        self.seen.append((step.id, ctx.workdir, text))
        if self.release is not None:
            await self.release.wait()
        await asyncio.sleep(self.seconds)
        if step.phase in (Phase.NIX_CORE, Phase.NIX_SERVICE_CONFIG):
            return StepResult(True, "switched", f"/nix/store/old-{step.service}", "/nix/store/new")
        return StepResult(True, f"ran {step.id}")

    async def rollback(self, service: str, ctx: Context) -> StepResult:
        return StepResult(True, "rolled back", None, ctx.previous_systems.get(service))


def recording_set(recorder: Recorder) -> RunnerSet:
    return RunnerSet(RunnerKind.SIMULATE, dict.fromkeys(Phase, recorder), recorder)


async def test_deploys_the_exported_revision_not_the_working_copy(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    first = repo.head.commit.hexsha
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    # after planning, main moves on and the working copy gets uncommitted edits
    commit(repo, "ports = [ 3000 ]", "ports = [ 3001 ]", "second")
    live = Path(repo.working_tree_dir) / MANIFEST_PATH
    live.write_text(live.read_text() + "\n# live edit, never deployed\n")
    recorder = Recorder()
    record = await start_deployment(
        store,
        plan,
        main_source(repo),
        options=ExecutionOptions(runners=recording_set(recorder), work_root=tmp_path / "work"),
    )
    assert record is not None and record.state is DeploymentState.SUCCEEDED
    assert record.head == first
    assert {text for _, _, text in recorder.seen} == {SMALL}
    workdirs = {workdir for _, workdir, _ in recorder.seen}
    assert workdirs == {tmp_path / "work" / record.id}
    assert not (tmp_path / "work" / record.id).exists()  # the export is removed afterwards
    assert record.manifest is not None and set(record.manifest.enabled()) == {"gitea", "postgresql"}


async def test_a_plain_directory_is_snapshotted(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "nixos").mkdir(parents=True)
    (source / MANIFEST_PATH).write_text(SMALL)
    (source / ".git").mkdir()  # never copied
    from planner.plan import plan_full
    from planner.source import load_manifest

    manifest = load_manifest(source / MANIFEST_PATH)
    recorder = Recorder()
    record = await start_deployment(
        store,
        plan_full(manifest),
        DirectorySource(Path(source)),
        options=ExecutionOptions(
            runners=recording_set(recorder), work_root=source / ".nixmox" / "work"
        ),
        manifest=manifest,
    )
    assert record is not None and record.state is DeploymentState.SUCCEEDED
    assert {text for _, _, text in recorder.seen} == {SMALL}
    assert all(workdir != source for _, workdir, _ in recorder.seen)


async def test_second_deploy_of_the_same_revision_has_nothing_to_do(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    assert plan.base is None and len(plan.steps) == 5
    record = await start_deployment(
        store,
        plan,
        main_source(repo),
        options=simulated_in(tmp_path),
    )
    assert record is not None and record.state is DeploymentState.SUCCEEDED
    again = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    assert again.steps == []
    assert await start_deployment(store, again, GitSource(Path(repo.working_tree_dir))) is None
    # a change plans only what it needs, from the deployed revision
    second = commit(repo, "ports = [ 3000 ]", "ports = [ 3001 ]", "gitea port")
    change = await plan_for_deploy(
        store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH
    )
    assert change.base == plan.head and change.head == second
    assert change.services() == ["gitea"]


async def test_a_failed_deployment_is_planned_again(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    config = RunnerConfig(simulate=SimulateConfig(scale=0.005, fail=["tf:infra"]))
    record = await start_deployment(
        store,
        plan,
        main_source(repo),
        options=simulated_in(tmp_path, config),
    )
    assert record is not None and record.state is DeploymentState.FAILED
    assert record.step("verify:gitea").state is StepState.SKIPPED  # type: ignore[union-attr]  # a missing step fails the test
    again = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    assert again.digest == plan.digest


async def test_a_locked_service_refuses_the_deployment_naming_the_holder(
    any_store_url: str, repo: git.Repo, tmp_path: Path
) -> None:
    store = await Store.open(any_store_url)
    try:
        plan = await plan_for_deploy(
            store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH
        )
        await store.locks.lock("gitea", "alice", "database migration")
        with pytest.raises(DeploymentRefused) as refused:
            await start_deployment(store, plan, GitSource(Path(repo.working_tree_dir)))
        assert "gitea is locked by alice (database migration)" in str(refused.value)
        assert "nixmox unlock gitea" in str(refused.value)
        assert await store.deployments.history() == []  # nothing ran, nothing recorded
        # postgresql and tf:infra were not left locked by the refused attempt
        assert [lock.service for lock in await store.locks.all()] == ["gitea"]
        [entry] = await store.audit.entries()
        assert entry.action == "deployment refused" and entry.detail["holder"] == "alice"
    finally:
        await store.close()


async def test_a_second_deployment_is_refused_then_waits(
    any_store_url: str, repo: git.Repo, tmp_path: Path
) -> None:
    store = await Store.open(any_store_url)
    try:
        plan = await plan_for_deploy(
            store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH
        )
        recorder = Recorder(release=asyncio.Event())
        source = main_source(repo)
        work_root = tmp_path / "work"
        first = asyncio.create_task(
            start_deployment(
                store,
                plan,
                source,
                options=ExecutionOptions(runners=recording_set(recorder), work_root=work_root),
            )
        )
        while not recorder.seen:  # the first deployment holds its locks and runs
            await asyncio.sleep(0.02)
        [running] = await store.deployments.history()
        with pytest.raises(DeploymentRefused) as refused:
            await start_deployment(
                store,
                plan,
                source,
                options=ExecutionOptions(runners=recording_set(Recorder()), work_root=work_root),
            )
        assert refused.value.busy.holder == holder_name(running.id)
        assert f"locked by deployment {running.id}" in str(refused.value)
        # with --lock-wait, the second one waits for the first and then runs
        waiting = ExecutionOptions(
            runners=recording_set(Recorder()), lock_wait=30, work_root=work_root
        )
        second = asyncio.create_task(start_deployment(store, plan, source, options=waiting))
        await asyncio.sleep(0.5)
        assert not second.done()
        recorder.release.set()  # type: ignore[union-attr]  # made with release=asyncio.Event() above
        done_first, done_second = await asyncio.gather(first, second)
        assert done_first is not None and done_second is not None
        assert done_first.state is done_second.state is DeploymentState.SUCCEEDED
        assert done_second.started_at >= done_first.finished_at  # type: ignore[operator]  # both ran: both times are set
        assert await store.locks.all() == []
    finally:
        await store.close()


async def test_locks_are_renewed_while_running_and_released_after(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    lease = timedelta(seconds=0.3)
    task = asyncio.create_task(
        start_deployment(
            store,
            plan,
            main_source(repo),
            options=ExecutionOptions(
                runners=recording_set(Recorder(seconds=0.25)),  # 5 steps: well past the lease
                lock_lease=lease,
                work_root=tmp_path / "work",
            ),
        )
    )
    await asyncio.sleep(0.9)
    assert not task.done()
    # three leases have gone by: without renewal another holder would get gitea now
    with pytest.raises(LockBusy, match="locked by deployment"):
        await store.locks.acquire(["gitea"], "intruder", lease=lease)
    assert await store.deployments.recover_interrupted() == []
    record = await task
    assert record is not None and record.state is DeploymentState.SUCCEEDED
    assert lock_names(plan) == ["gitea", "postgresql", "tf:infra"]
    assert await store.locks.all() == []


async def test_cancelled_deployment_is_recorded_interrupted(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    recorder = Recorder(release=asyncio.Event())
    task = asyncio.create_task(
        start_deployment(
            store,
            plan,
            main_source(repo),
            options=ExecutionOptions(runners=recording_set(recorder), work_root=tmp_path / "work"),
        )
    )
    while not recorder.seen:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [record] = await store.deployments.history()
    assert record.state is DeploymentState.INTERRUPTED
    assert record.step("tf:infra").state is StepState.INTERRUPTED  # type: ignore[union-attr]  # a missing step fails the test
    assert await store.locks.all() == []
    assert not (tmp_path / "work" / record.id).exists()


async def steal_lock(store: Store, service: str, thief: str) -> None:
    """Let `service`'s lease run out (a starved renewer) and have `thief` take it."""
    while True:
        async with store.engine.begin() as conn:
            past = utcnow() - timedelta(seconds=5)
            await conn.execute(
                locks.update().where(locks.c.service == service).values(expires_at=past)
            )
        try:
            await store.locks.acquire([service], thief, lease=timedelta(seconds=60))
            return
        except LockBusy:  # the renewer came in between: expire it again
            await asyncio.sleep(0.01)


async def test_a_deployment_that_loses_a_lock_stops_interrupted(
    any_store_url: str, repo: git.Repo, tmp_path: Path
) -> None:
    store = await Store.open(any_store_url)
    try:
        plan = await plan_for_deploy(
            store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH
        )
        recorder = Recorder(release=asyncio.Event())  # the first step runs until released
        task = asyncio.create_task(
            start_deployment(
                store,
                plan,
                main_source(repo),
                options=ExecutionOptions(
                    runners=recording_set(recorder),
                    lock_lease=timedelta(seconds=0.6),
                    work_root=tmp_path / "work",
                ),
            )
        )
        while not recorder.seen:
            await asyncio.sleep(0.02)
        thief = holder_name("other-deployment")
        await steal_lock(store, "gitea", thief)
        record = await asyncio.wait_for(task, 10)
        assert record is not None and record.state is DeploymentState.INTERRUPTED
        assert record.note == "lost the lock on gitea to deployment other-deployment; stopped"
        assert {step.state for step in record.steps} == {StepState.INTERRUPTED}
        assert not recorder.release.is_set()  # it stopped on its own, nothing released the step
        # the thief keeps its lock; the deployment's other locks are freed
        assert [(lock.service, lock.holder) for lock in await store.locks.all()] == [
            ("gitea", thief)
        ]
        [lost] = await store.audit.entries(action="lock lost")
        assert lost.detail["lost"] == {"gitea": thief}
    finally:
        await store.close()


async def test_unknown_revision_is_a_deploy_error_and_frees_the_locks(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    with pytest.raises(DeployError, match="cannot prepare the files to deploy"):
        await start_deployment(
            store,
            plan,
            GitSource(Path(repo.working_tree_dir), "0" * 40),
            options=ExecutionOptions(
                runners=recording_set(Recorder()), work_root=tmp_path / "work"
            ),
        )
    assert await store.deployments.history() == []
    assert await store.locks.all() == []


async def test_invalid_and_empty_plans(store: Store, repo: git.Repo) -> None:
    from planner.findings import error
    from planner.plan import Plan, invalid_plan

    broken = invalid_plan([error("type", "bad", field="services.x.ip")])
    with pytest.raises(DeployError, match="1 error"):
        await start_deployment(store, broken, GitSource(Path(repo.working_tree_dir)))
    assert await start_deployment(store, Plan(), GitSource(Path(repo.working_tree_dir))) is None


async def deploy_twice(store: Store, repo: git.Repo, tmp_path: Path) -> tuple[str, str]:
    """Deploy main, then a gitea change; returns the two deployment ids."""
    ids = []
    for change in (None, ("ports = [ 3000 ]", "ports = [ 3001 ]")):
        if change:
            commit(repo, *change, "gitea port")
        plan = await plan_for_deploy(
            store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH
        )
        record = await start_deployment(
            store,
            plan,
            main_source(repo),
            options=simulated_in(tmp_path),
        )
        assert record is not None and record.state is DeploymentState.SUCCEEDED
        ids.append(record.id)
    return ids[0], ids[1]


async def test_rollback_undoes_the_last_deployment(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    first, second = await deploy_twice(store, repo, tmp_path)
    before = await store.deployments.get(second)
    assert before is not None
    nix = before.step("nix:service-config:gitea")
    assert nix is not None and nix.previous_system and nix.new_system
    # the simulated hosts of a new process start from what the store says they run
    first_record = await store.deployments.get(first)
    assert first_record is not None
    assert nix.previous_system == first_record.step("nix:service-config:gitea").new_system  # type: ignore[union-attr]  # a missing step fails the test

    prepared = await prepare_rollback(store)
    assert prepared.targets == {"gitea": nix.previous_system}
    assert prepared.source_deployment == second
    assert [s.id for s in prepared.plan.steps] == ["nix:service-config:gitea", "verify:gitea"]
    record = await start_rollback(
        store,
        prepared,
        requester=Requester(requested_by="alice"),
        options=simulated_in(tmp_path),
    )
    assert record is not None
    assert (record.kind, record.state) == (DeploymentKind.ROLLBACK, DeploymentState.SUCCEEDED)
    assert record.requested_by == "alice"
    assert record.head == before.base  # back at the revision deployed before
    gitea = (await store.services.all())["gitea"]
    assert gitea.system_path == nix.previous_system
    assert gitea.revision == before.base
    assert gitea.last_deployment_id == record.id
    # a full undo moves the deployed revision back too: deploying main again has work to do
    assert await store.deployments.last_deployed_revision() == before.base
    redo = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    assert redo.services() == ["gitea"]


async def test_rollback_to_a_deployment_and_per_service(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    first, _second = await deploy_twice(store, repo, tmp_path)
    first_record = await store.deployments.get(first)
    assert first_record is not None
    prepared = await prepare_rollback(store, to=first, service="gitea")
    installed = first_record.step("nix:service-config:gitea").new_system  # type: ignore[union-attr]  # a missing step fails the test
    assert prepared.targets == {"gitea": installed}
    assert prepared.scope == "gitea"
    everything = await prepare_rollback(store, to=first)
    assert set(everything.targets) == {"gitea", "postgresql"}
    with pytest.raises(RollbackError, match="did not touch caddy"):
        await prepare_rollback(store, to=first, service="caddy")
    with pytest.raises(RollbackError, match="needs a Git repository"):
        await prepare_rollback(store, to="no-such-deployment")
    record = await start_rollback(
        store,
        prepared,
        options=simulated_in(tmp_path, work="w"),
    )
    assert record is not None and record.state is DeploymentState.SUCCEEDED
    assert (await store.services.all())["gitea"].system_path == installed
    # a per-service rollback does not move the revision the whole homelab is at
    assert await store.deployments.last_deployed_revision() == repo.head.commit.hexsha


async def test_rollback_to_a_revision_deploys_it(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    first, _ = await deploy_twice(store, repo, tmp_path)
    prepared = await prepare_rollback(
        store, to="main~1", repo_dir=repo.working_tree_dir, manifest_path=MANIFEST_PATH
    )
    assert prepared.by_revision and prepared.plan.services() == ["gitea"]
    record = await start_rollback(
        store,
        prepared,
        manifest_path=MANIFEST_PATH,
        options=simulated_in(tmp_path),
    )
    assert record is not None and record.kind is DeploymentKind.ROLLBACK
    assert record.state is DeploymentState.SUCCEEDED
    first_record = await store.deployments.get(first)
    assert first_record is not None
    assert await store.deployments.last_deployed_revision() == first_record.head


async def test_nothing_to_roll_back(store: Store) -> None:
    with pytest.raises(RollbackError, match="no deployment recorded"):
        await prepare_rollback(store)


async def test_dry_run_lists_exact_commands_and_changes_nothing(
    store: Store, repo: git.Repo
) -> None:
    from planner.source import load_manifest_at

    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    manifest = load_manifest_at(repo.working_tree_dir, "main", MANIFEST_PATH)
    preview = await preview_deployment(plan, manifest=manifest, options=ExecutionOptions())
    commands = dict(preview)
    assert list(commands) == [s for wave in plan.waves for s in wave]
    assert any(
        "nixos-rebuild switch" in line and "root@10.20.0.3" in line
        for line in commands["nix:service-config:gitea"]
    )
    assert await store.deployments.history() == []


async def test_check_health_records_live_results(store: Store) -> None:
    from planner.source import load_manifest

    manifest = load_manifest(SMALL_MANIFEST)
    simulated = ExecutionOptions(runner_kind=RunnerKind.SIMULATE, runner_config=FAST)
    results = await check_health(store, manifest, ["gitea", "postgresql"], options=simulated)
    assert {name: ok for name, (ok, _) in results.items()} == {"gitea": True, "postgresql": True}
    services = await store.services.all()
    assert services["gitea"].last_health == "healthy" and services["gitea"].health_at


async def test_subscribers_receive_events_and_a_failing_one_changes_nothing(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    seen: list[Event] = []

    async def listen(event: Event) -> None:
        seen.append(event)

    async def broken(event: Event) -> None:
        raise RuntimeError("slack is down")

    record = await start_deployment(
        store,
        plan,
        main_source(repo),
        requester=Requester(trigger=Trigger.SLACK, requested_by="U_ALICE", approved_by="U_BOB"),
        options=simulated_in(tmp_path),
        subscribers=[broken, listen],
    )
    assert record is not None and record.state is DeploymentState.SUCCEEDED
    assert (record.trigger, record.requested_by, record.approved_by) == (
        "slack",
        "U_ALICE",
        "U_BOB",
    )
    assert seen[0].deployment_id == record.id
    assert type(seen[-1]).__name__ == "DeploymentFinished"


async def test_planning_after_a_file_deploy_or_per_service(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    from planner.plan import plan_full
    from planner.source import load_manifest

    manifest = load_manifest(SMALL_MANIFEST)
    from_file = await start_deployment(
        store,
        plan_full(manifest),
        DirectorySource(Path(REPO_ROOT / "manifests")),
        options=simulated_in(tmp_path),
        manifest=manifest,
    )
    assert from_file is not None and from_file.head.startswith("sha256:")  # type: ignore[union-attr]  # a directory deployment records its hash as head
    # the repository does not know that revision: plan everything
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    assert plan.base is None and len(plan.steps) == 5
    await start_deployment(
        store,
        plan,
        main_source(repo),
        options=simulated_in(tmp_path),
    )
    head = commit(repo, "ports = [ 3000 ]", "ports = [ 3001 ]", "gitea port")
    only = await plan_for_deploy(
        store, repo.working_tree_dir, "main", service="gitea", manifest_path=MANIFEST_PATH
    )
    assert (only.base, only.head) == (plan.head, head)
    assert only.services() == ["gitea"]
    record = await start_deployment(
        store,
        only,
        main_source(repo),
        options=simulated_in(tmp_path),
        scope="gitea",
    )
    assert record is not None and record.scope == "gitea"
    # gitea runs the new revision; the homelab as a whole is still at the old one
    assert (await store.services.all())["gitea"].revision == head
    assert await store.deployments.last_deployed_revision() == plan.head
    assert (
        await plan_for_deploy(
            store, repo.working_tree_dir, "main", service="gitea", manifest_path=MANIFEST_PATH
        )
    ).steps == []

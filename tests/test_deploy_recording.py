"""The store is the record of a deployment, not a notifier: every transition is written
(awaited, retried on database errors) before the deployment goes on, the final states are
written from the execution's result, and a notifier that drops events changes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import git
import pytest
from sqlalchemy.exc import OperationalError

from deployments import ExecutionOptions, GitSource, plan_for_deploy, recording, start_deployment
from deployments.recording import record_result
from planner.plan import plan_full
from planner.source import load_manifest
from runners.base import Context
from runners.config import RunnerConfig, SimulateConfig
from runners.executor import Executor
from runners.outcome import RecordingFailed
from runners.registry import RunnerKind, build_runners
from state.deployments import DeploymentRecord
from state.events import (
    DeploymentFinished,
    DeploymentStarted,
    DeploymentState,
    Event,
    StepFinished,
    StepState,
)
from state.store import Store
from tests.fixtures_manifests import MANIFEST_PATH, SMALL_MANIFEST

FAST = RunnerConfig(simulate=SimulateConfig(scale=0.001))


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retry store writes without the production backoff (the count is unchanged)."""
    monkeypatch.setattr(recording, "RECORD_BACKOFF", 0.001)


def database_down() -> OperationalError:
    return OperationalError("UPDATE deployments ...", {}, Exception("database is locked"))


class FlakyWrites:
    """`store.deployments.record_event`, failing as a busy or failing-over database does."""

    def __init__(self, write: Callable[[Event], Awaitable[None]], fail: Callable[[Event], bool]):
        self.write = write
        self.fail = fail
        self.calls: list[type[Event]] = []
        self.failures = 0

    async def __call__(self, event: Event) -> None:
        self.calls.append(type(event))
        if self.fail(event):
            self.failures += 1
            raise database_down()
        await self.write(event)


def first_calls(count: int) -> Callable[[Event], bool]:
    """Fail the first `count` writes, then every write of a StepFinished or
    DeploymentFinished once (its retry succeeds)."""
    seen: dict[int, int] = {}
    calls = [0]

    def fail(event: Event) -> bool:
        calls[0] += 1
        if calls[0] <= count:
            return True
        if isinstance(event, StepFinished | DeploymentFinished):
            seen[id(event)] = seen.get(id(event), 0) + 1
            return seen[id(event)] == 1
        return False

    return fail


async def deploy_main(
    store: Store, repo: git.Repo, tmp_path: Path, **options: Any
) -> DeploymentRecord | None:
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    return await start_deployment(
        store,
        plan,
        GitSource(Path(repo.working_tree_dir), manifest_path=MANIFEST_PATH),
        options=ExecutionOptions(
            runner_kind=RunnerKind.SIMULATE, runner_config=FAST, work_root=tmp_path / "work"
        ),
        **options,
    )


async def test_transient_write_failures_still_end_in_the_right_states(
    store: Store, repo: git.Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = FlakyWrites(store.deployments.record_event, first_calls(3))
    monkeypatch.setattr(store.deployments, "record_event", flaky)

    record = await deploy_main(store, repo, tmp_path)

    assert flaky.failures > 3
    assert record is not None
    assert record.state is DeploymentState.SUCCEEDED
    stored = await store.deployments.get(record.id)
    assert stored is not None and stored.state is DeploymentState.SUCCEEDED
    assert stored.finished_at is not None and stored.lease_until is None
    assert {step.state for step in stored.steps} == {StepState.SUCCEEDED}
    head = repo.heads.main.commit.hexsha
    assert await store.deployments.last_deployed_revision() == head
    assert {s.revision for s in (await store.services.all()).values()} == {head}
    # nothing is redeployed by the next push
    again = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    assert again.steps == []


async def test_a_store_that_stays_down_fails_the_deployment_loudly(
    store: Store, repo: git.Repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flaky = FlakyWrites(
        store.deployments.record_event, lambda event: isinstance(event, StepFinished)
    )
    monkeypatch.setattr(store.deployments, "record_event", flaky)

    with pytest.raises(RecordingFailed, match="could not record StepFinished"):
        await deploy_main(store, repo, tmp_path)

    assert flaky.failures == recording.RECORD_RETRIES + 1  # bounded retries, then it stops
    [record] = await store.deployments.history()
    assert record.state is DeploymentState.FAILED  # not left `running`
    assert record.note is not None and "could not record StepFinished" in record.note
    assert await store.deployments.last_deployed_revision() is None
    assert await store.locks.all() == []


async def test_notifiers_that_drop_events_do_not_change_the_record(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    heard: list[Event] = []

    async def broken(event: Event) -> None:
        raise RuntimeError("Slack is down")

    async def drops_step_ends(event: Event) -> None:
        if isinstance(event, StepFinished | DeploymentFinished):
            raise ConnectionError("GitHub is down")
        heard.append(event)

    record = await deploy_main(store, repo, tmp_path, subscribers=[broken, drops_step_ends])

    assert heard  # the notifiers were called
    assert record is not None
    stored = await store.deployments.get(record.id)
    assert stored is not None and stored.state is DeploymentState.SUCCEEDED
    assert {step.state for step in stored.steps} == {StepState.SUCCEEDED}
    assert await store.deployments.last_deployed_revision() == repo.heads.main.commit.hexsha


async def test_the_final_states_are_written_from_the_result_idempotently(
    store: Store, tmp_path: Path
) -> None:
    manifest = load_manifest(SMALL_MANIFEST)
    plan = plan_full(manifest)
    deployment_id = await store.deployments.create(kind="deploy", trigger="cli", plan=plan)
    config = RunnerConfig(simulate=SimulateConfig(scale=0.001, fail=["verify:gitea"]))
    runners = build_runners(RunnerKind.SIMULATE, config)
    # no recorder: as if every event had been lost on the way to the store
    result = await Executor(runners, auto_rollback=False).execute(
        plan, Context(deployment_id, manifest, plan, tmp_path)
    )
    before = await store.deployments.get(deployment_id)
    assert before is not None and before.state is DeploymentState.QUEUED

    await record_result(store, result)
    await record_result(store, result)  # again: the same record

    after = await store.deployments.get(deployment_id)
    assert after is not None and after.state is result.state is DeploymentState.FAILED
    assert {step.id: step.state for step in after.steps} == result.states()
    assert after.step("verify:gitea").state is StepState.FAILED  # type: ignore[union-attr]  # a missing step fails the test
    assert after.step("verify:postgresql").state is StepState.SUCCEEDED  # type: ignore[union-attr]  # a missing step fails the test
    assert await store.deployments.last_deployed_revision() is None


async def test_what_the_start_of_a_deployment_recovers_is_told_to_the_hook(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    manifest = load_manifest(SMALL_MANIFEST)
    plan = plan_full(manifest)
    dead = await store.deployments.create(
        kind="deploy", trigger="cli", plan=plan, lease=timedelta(milliseconds=1)
    )
    await store.deployments.record_event(DeploymentStarted(dead, plan))
    await asyncio.sleep(0.01)  # nobody renews its lease
    told: list[list[str]] = []

    async def on_recovered(records: list[DeploymentRecord]) -> None:
        told.append([record.id for record in records])
        raise RuntimeError("Slack is down")  # a failing report never stops the deployment

    record = await deploy_main(store, repo, tmp_path, on_recovered=on_recovered)

    assert told == [[dead]]
    assert record is not None
    assert record.state is DeploymentState.SUCCEEDED
    stale = await store.deployments.get(dead)
    assert stale is not None and stale.state is DeploymentState.INTERRUPTED

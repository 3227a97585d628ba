"""The state store against both backends: real SQLite files and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from planner.plan import Phase, Plan, Step, finalize
from state import events
from state.approvals import ApprovalState
from state.base import StoreError
from state.events import DeploymentKind, DeploymentState, StepResult, StepState, Trigger, utcnow
from state.locks import LockBusy, LockLost
from state.queue import JobState
from state.schema import deliveries
from state.store import SCHEMA_REVISION, Store

LEASE = timedelta(seconds=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL of each backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/state/state.db"
    return request.getfixturevalue("postgres_database")


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    yield opened
    await opened.close()


def small_plan(head: str = "rev-b", base: str | None = "rev-a") -> Plan:
    """tf:infra -> nix:core:postgresql -> verify:postgresql -> nix:service-config:gitea -> verify."""
    links = [
        ("tf:infra", Phase.TF_INFRA, None),
        ("nix:core:postgresql", Phase.NIX_CORE, "postgresql"),
        ("verify:postgresql", Phase.VERIFY, "postgresql"),
        ("nix:service-config:gitea", Phase.NIX_SERVICE_CONFIG, "gitea"),
        ("verify:gitea", Phase.VERIFY, "gitea"),
    ]
    steps: dict[str, Step] = {}
    needs: list[str] = []
    for sid, phase, service in links:  # each step needs the one before
        steps[sid] = Step(id=sid, phase=phase, service=service, needs=needs)
        needs = [sid]
    return finalize(steps, base=base, head=head)


async def run_all(store: Store, deployment_id: str, plan: Plan, fail: str | None = None) -> None:
    """Feed the store the events of a deployment in which every step (but `fail`) succeeds."""
    await store.deployments.record_event(events.DeploymentStarted(deployment_id, plan))
    state = DeploymentState.SUCCEEDED
    for step in plan.steps:
        await store.deployments.record_event(events.StepStarted(deployment_id, step))
        if step.phase is Phase.VERIFY:  # streamed output wins over the result's
            await store.deployments.record_event(
                events.StepOutput(deployment_id, step.id, f"running {step.id}")
            )
        ok = step.id != fail
        nix = step.phase in (Phase.NIX_CORE, Phase.NIX_SERVICE_CONFIG)
        result = StepResult(
            ok=ok,
            output=f"output of {step.id}",
            previous_system=f"/nix/store/old-{step.service}" if nix else None,
            new_system=f"/nix/store/new-{step.service}" if nix and ok else None,
        )
        final = StepState.SUCCEEDED if ok else StepState.FAILED
        if not ok:
            state = DeploymentState.FAILED
        await store.deployments.record_event(
            events.StepFinished(deployment_id, step, final, result)
        )
    await store.deployments.record_event(events.DeploymentFinished(deployment_id, state))


async def test_schema_is_created_and_versioned(store_url: str, tmp_path: Path) -> None:
    store = await Store.open(store_url)
    assert await store.schema_revision() == SCHEMA_REVISION
    await store.close()
    # opening again keeps the data and the version (no second row, no error)
    again = await Store.open(store_url)
    assert await again.schema_revision() == SCHEMA_REVISION
    await again.close()
    if store_url.startswith("sqlite"):
        assert (tmp_path / "state" / "state.db").is_file()


async def test_a_newer_schema_is_refused(store: Store, store_url: str) -> None:
    async with store.engine.begin() as conn:  # a revision this code does not know
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(StoreError, match="newer than this nixmox"):
        await Store.open(store_url)


async def test_unsupported_url_is_a_clear_error() -> None:
    with pytest.raises(StoreError, match="unsupported database 'mysql'"):
        await Store.open("mysql://root@127.0.0.1/x")


async def test_deployment_lifecycle_records_steps_and_services(store: Store) -> None:
    plan = small_plan()
    dep = await store.deployments.create(
        kind=DeploymentKind.DEPLOY,
        trigger=Trigger.SLACK,
        plan=plan,
        requested_by="alice",
        approved_by="bob",
    )
    created = await store.deployments.get(dep)
    assert created is not None
    assert created.state is DeploymentState.QUEUED
    assert [s.id for s in created.steps] == [s.id for s in plan.steps]
    assert {s.state for s in created.steps} == {StepState.PENDING}
    assert (created.base, created.head, created.digest) == ("rev-a", "rev-b", plan.digest)
    assert created.plan == plan

    await run_all(store, dep, plan)
    done = await store.deployments.get(dep)
    assert done is not None
    assert done.state is DeploymentState.SUCCEEDED
    assert (done.requested_by, done.approved_by, done.trigger) == ("alice", "bob", "slack")
    assert done.started_at is not None and done.finished_at is not None
    nix = done.step("nix:service-config:gitea")
    assert nix is not None
    assert nix.state is StepState.SUCCEEDED
    assert nix.attempt == 1
    assert nix.output == "output of nix:service-config:gitea"
    verify = done.step("verify:gitea")
    assert verify is not None and verify.output == "running verify:gitea\n"
    assert (nix.previous_system, nix.new_system) == ("/nix/store/old-gitea", "/nix/store/new-gitea")
    assert nix.started_at is not None and nix.finished_at >= nix.started_at

    services = await store.services.all()
    assert set(services) == {"postgresql", "gitea"}
    gitea = services["gitea"]
    assert (gitea.revision, gitea.system_path, gitea.previous_system) == (
        "rev-b",
        "/nix/store/new-gitea",
        "/nix/store/old-gitea",
    )
    assert gitea.last_deployment_id == dep
    assert gitea.last_health == "healthy"
    assert await store.deployments.last_deployed_revision() == "rev-b"
    assert done.to_json() == {
        "id": dep,
        "kind": "deploy",
        "state": "succeeded",
        "steps": [
            {
                "id": s.id,
                "state": "succeeded",
                "started_at": s.started_at.isoformat(),
                "finished_at": s.finished_at.isoformat(),
            }
            for s in done.steps
        ],
    }


async def test_failed_service_keeps_its_revision(store: Store) -> None:
    first = small_plan(head="rev-a", base=None)
    one = await store.deployments.create(kind="deploy", trigger="cli", plan=first)
    await run_all(store, one, first)
    second = small_plan(head="rev-b")
    two = await store.deployments.create(kind="deploy", trigger="cli", plan=second)
    await run_all(store, two, second, fail="verify:gitea")
    services = await store.services.all()
    # postgresql finished everything: it runs rev-b; gitea failed: still recorded at rev-a
    assert services["postgresql"].revision == "rev-b"
    assert services["gitea"].revision == "rev-a"
    assert services["gitea"].last_deployment_id == two
    assert services["gitea"].last_health == "unhealthy"
    # the failed deployment does not count as deployed
    assert await store.deployments.last_deployed_revision() == "rev-a"


async def test_rollback_finished_records_the_system_it_went_back_to(store: Store) -> None:
    plan = small_plan()
    dep = await store.deployments.create(kind="deploy", trigger="cli", plan=plan)
    await run_all(store, dep, plan, fail="verify:gitea")
    await store.deployments.record_event(events.RollbackFinished(dep, "gitea", True))
    assert (await store.services.all())["gitea"].system_path == "/nix/store/old-gitea"


async def test_rollback_output_goes_to_the_failed_step(store: Store) -> None:
    plan = small_plan()
    verify = plan.by_id()["verify:gitea"]
    dep = await store.deployments.create(kind="deploy", trigger="cli", plan=plan)
    await store.deployments.record_event(events.StepStarted(dep, verify))
    await store.deployments.record_event(events.StepOutput(dep, verify.id, "gitea answers 502"))
    await store.deployments.record_event(events.RollbackStarted(dep, "gitea", verify.id))
    rolled = StepResult(True, "switched to /nix/store/old-gitea", new_system="/nix/store/old-gitea")
    await store.deployments.record_event(events.RollbackFinished(dep, "gitea", True, rolled))
    await store.deployments.record_event(events.StepOutput(dep, verify.id, "gitea answers 200"))
    await store.deployments.record_event(
        events.StepFinished(
            dep, verify, StepState.ROLLED_BACK, StepResult(False, "gitea answers 502")
        )
    )
    record = await store.deployments.get(dep)
    assert record is not None
    step = record.step(verify.id)
    assert step is not None and step.state is StepState.ROLLED_BACK
    assert step.output.splitlines() == [
        "gitea answers 502",
        "--- verify:gitea failed: rolling gitea back ---",
        "switched to /nix/store/old-gitea",
        "gitea answers 200",
    ]
    gitea = (await store.services.all())["gitea"]
    assert gitea.system_path == "/nix/store/old-gitea"
    assert gitea.last_health == "healthy"  # rolled back and re-verified


async def test_steps_not_in_the_plan_are_added(store: Store) -> None:
    plan = small_plan()
    dep = await store.deployments.create(kind="deploy", trigger="cli", plan=plan)
    extra = Step(id="rollback:gitea", phase=Phase.NIX_SERVICE_CONFIG, service="gitea")
    await store.deployments.record_event(events.StepStarted(dep, extra))
    await store.deployments.record_event(
        events.StepFinished(dep, extra, StepState.SUCCEEDED, StepResult(ok=True))
    )
    record = await store.deployments.get(dep)
    assert record is not None
    assert record.steps[-1].id == "rollback:gitea"
    assert record.steps[-1].state is StepState.SUCCEEDED


async def test_history_newest_first_and_per_service(store: Store) -> None:
    plan = small_plan()
    only_pg = finalize(
        {
            "nix:core:postgresql": Step(
                id="nix:core:postgresql", phase=Phase.NIX_CORE, service="postgresql"
            )
        },
        head="rev-c",
    )
    first = await store.deployments.create(kind="deploy", trigger="cli", plan=plan)
    await asyncio.sleep(0.01)
    second = await store.deployments.create(kind="deploy", trigger="merge", plan=only_pg)
    assert [d.id for d in await store.deployments.history()] == [second, first]
    assert [d.id for d in await store.deployments.history("gitea")] == [first]
    assert [d.id for d in await store.deployments.history(limit=1)] == [second]
    assert await store.deployments.get("nope") is None


async def test_lock_refuses_a_second_holder_naming_it(store: Store) -> None:
    await store.locks.acquire(
        ["gitea", "postgresql"], "deploy-1@host:1", lease=LEASE, reason="deployment 1"
    )
    with pytest.raises(LockBusy) as busy:
        await store.locks.acquire(["caddy", "gitea"], "deploy-2@host:2", lease=LEASE)
    assert busy.value.service == "gitea"
    assert busy.value.holder == "deploy-1@host:1"
    assert "gitea is locked by deploy-1@host:1 (deployment 1)" in str(busy.value)
    # all or nothing: caddy was not taken by the refused attempt
    assert [lock.service for lock in await store.locks.all()] == ["gitea", "postgresql"]
    # the same holder may take its locks again (renewal)
    await store.locks.acquire(["gitea"], "deploy-1@host:1", lease=LEASE)
    await store.locks.release("deploy-1@host:1")
    await store.locks.acquire(["caddy", "gitea"], "deploy-2@host:2", lease=LEASE)
    assert {lock.holder for lock in await store.locks.all()} == {"deploy-2@host:2"}


async def test_a_second_deployment_waits_for_the_lock(store: Store) -> None:
    await store.locks.acquire(["gitea"], "first", lease=LEASE)

    async def release_soon() -> None:
        await asyncio.sleep(0.5)
        await store.locks.release("first")

    releaser = asyncio.create_task(release_soon())
    await store.locks.acquire(["gitea"], "second", lease=LEASE, wait=10)
    await releaser
    assert [(lock.service, lock.holder) for lock in await store.locks.all()] == [
        ("gitea", "second")
    ]
    # a wait that is too short still ends with LockBusy
    with pytest.raises(LockBusy, match="locked by second"):
        await store.locks.acquire(["gitea"], "third", lease=LEASE, wait=0.3)


async def test_expired_lease_is_reclaimed_and_renewal_keeps_it(store: Store) -> None:
    short = timedelta(seconds=0.5)
    await store.locks.acquire(["gitea"], "dead", lease=short)
    await store.locks.acquire(["caddy"], "alive", lease=short)
    for _ in range(3):
        await asyncio.sleep(0.3)
        await store.locks.renew("alive", short)
    # "dead" stopped renewing: its lease ran out, another holder gets the service
    await store.locks.acquire(["gitea"], "next", lease=LEASE)
    with pytest.raises(LockBusy, match="locked by alive"):
        await store.locks.acquire(["caddy"], "next", lease=LEASE)


async def test_concurrent_lockers_exactly_one_wins(store_url: str) -> None:
    stores = [await Store.open(store_url) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(
                s.locks.acquire(["gitea", "postgresql"], f"holder-{i}", lease=LEASE)
                for i, s in enumerate(stores)
            ),
            return_exceptions=True,
        )
        winners = [r for r in results if r is None]
        assert len(winners) == 1
        assert all(isinstance(r, LockBusy) for r in results if r is not None)
    finally:
        for s in stores:
            await s.close()


async def test_manual_lock_and_unlock(store: Store) -> None:
    await store.locks.lock("vaultwarden", "alice", "maintenance")
    with pytest.raises(LockBusy, match=r"vaultwarden is locked by alice \(maintenance\)"):
        await store.locks.acquire(["vaultwarden"], "deploy", lease=LEASE)
    [held] = await store.locks.all()
    assert held.expires_at is None  # a manual lock has no lease: it never expires by itself
    await store.locks.release("alice")  # releasing leases does not drop a manual lock
    assert await store.locks.all()
    assert (await store.locks.unlock("vaultwarden")).removed is True
    assert (await store.locks.unlock("vaultwarden")).removed is False
    await store.locks.acquire(["vaultwarden"], "deploy", lease=LEASE)


async def test_recover_interrupted_after_lease(store: Store) -> None:
    plan = small_plan()
    short = timedelta(seconds=0.4)
    holder = "deploy@host:999"
    await store.locks.acquire(plan.services(), holder, lease=short)
    dep = await store.deployments.create(
        kind="deploy", trigger="cli", plan=plan, holder=holder, lease=short
    )
    await store.deployments.record_event(events.DeploymentStarted(dep, plan))
    for step in plan.steps[:2]:
        await store.deployments.record_event(events.StepStarted(dep, step))
    await store.deployments.record_event(
        events.StepFinished(dep, plan.steps[0], StepState.SUCCEEDED, StepResult(ok=True))
    )
    # while the lease runs, nothing is recovered
    assert await store.deployments.recover_interrupted() == []
    await asyncio.sleep(0.6)
    [record] = await store.deployments.recover_interrupted()
    assert record.id == dep
    assert record.state is DeploymentState.INTERRUPTED
    assert "it stopped during nix:core:postgresql" in (record.note or "")
    states = {s.id: s.state for s in record.steps}
    assert states == {
        "tf:infra": StepState.SUCCEEDED,
        "nix:core:postgresql": StepState.INTERRUPTED,
        "verify:postgresql": StepState.SKIPPED,
        "nix:service-config:gitea": StepState.SKIPPED,
        "verify:gitea": StepState.SKIPPED,
    }
    stopped = record.step("nix:core:postgresql")
    assert stopped is not None and "stopped while running (attempt 1" in (stopped.reason or "")
    assert await store.locks.all() == []  # the dead holder's locks are reclaimed
    assert await store.deployments.recover_interrupted() == []  # only once


async def test_renewed_deployment_is_not_recovered(store: Store) -> None:
    plan = small_plan()
    short = timedelta(seconds=0.4)
    dep = await store.deployments.create(
        kind="deploy", trigger="cli", plan=plan, holder="me", lease=short
    )
    await store.deployments.set_state(dep, DeploymentState.RUNNING)
    for _ in range(3):
        await asyncio.sleep(0.25)
        await store.locks.renew("me", short)
    assert await store.deployments.recover_interrupted() == []
    record = await store.deployments.get(dep)
    assert record is not None and record.state is DeploymentState.RUNNING


async def test_renewal_reports_a_lock_lost_to_another_holder(store: Store) -> None:
    short = timedelta(seconds=0.3)
    await store.locks.acquire(["gitea", "postgresql"], "first", lease=short)
    await store.locks.renew("first", short, ["gitea", "postgresql"])  # all held: renewed
    await asyncio.sleep(0.4)
    # an expired lease nobody took is still ours: the renewal keeps it
    await store.locks.renew("first", short, ["gitea", "postgresql"])
    await asyncio.sleep(0.4)
    await store.locks.acquire(["gitea"], "second", lease=LEASE)  # first's lease ran out
    await store.locks.unlock("postgresql")  # expired: removed, nobody holds it
    with pytest.raises(LockLost) as lost:
        await store.locks.renew("first", short, ["gitea", "postgresql"])
    assert lost.value.lost == {"gitea": "second", "postgresql": None}
    assert "gitea (second)" in str(lost.value)
    # the other holder's lock is untouched by the failed renewal
    assert [(lock.service, lock.holder) for lock in await store.locks.all()] == [
        ("gitea", "second")
    ]


async def test_redelivered_webhook_is_recorded_once(store_url: str) -> None:
    stores = [await Store.open(store_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(s.queue.record_delivery("abc-123") for s in stores))
        assert sorted(results) == [False, False, True]
        assert await stores[0].queue.record_delivery("abc-123") is False
        assert await stores[0].queue.record_delivery("abc-124") is True
    finally:
        for s in stores:
            await s.close()


async def queued_payloads(store: Store) -> list[dict[str, Any]]:
    """Every queued job's payload, oldest first (claimed, so the queue is left empty)."""
    payloads = []
    while (job := await store.queue.claim("reader", lease=LEASE)) is not None:
        payloads.append(job.payload)
    return payloads


async def test_record_deliveries_keeps_the_first_of_duplicates_in_a_batch(store: Store) -> None:
    recorded = await store.queue.record_deliveries(
        [
            ("d-1", [("github.pull_request", {"n": 1}), ("github.push", {"n": 2})]),
            ("d-2", [("github.push", {"n": 3})]),
            ("d-1", [("github.push", {"n": 4})]),
            ("d-3", []),
        ]
    )
    assert recorded == [True, True, False, True]
    assert await queued_payloads(store) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert await store.queue.record_delivery("d-3") is False  # recorded even without jobs
    assert await store.queue.record_deliveries([]) == []


async def test_record_deliveries_recognises_redeliveries_across_calls(store: Store) -> None:
    assert await store.queue.record_deliveries([("r-1", [("k", {"n": 1})])]) == [True]
    assert await store.queue.record_delivery("r-2") is True  # seen through the single-id path too
    recorded = await store.queue.record_deliveries(
        [("r-1", [("k", {"n": 2})]), ("r-2", [("k", {"n": 3})]), ("r-3", [("k", {"n": 4})])]
    )
    assert recorded == [False, False, True]
    # only the new deliveries' jobs were queued, with their kind and payload as given
    job = await store.queue.claim("reader", lease=LEASE)
    assert job is not None and (job.kind, job.payload, job.state) == (
        "k",
        {"n": 1},
        JobState.RUNNING,
    )
    assert await queued_payloads(store) == [{"n": 4}]


async def test_record_deliveries_from_two_stores_records_each_id_once(store_url: str) -> None:
    first, second = await Store.open(store_url), await Store.open(store_url)
    try:
        # overlapping batches from two stores (replicas) at once
        batches = [
            (first, range(0, 30)),
            (second, range(20, 50)),
            (first, range(40, 70)),
            (second, range(0, 70, 3)),
        ]
        results = await asyncio.gather(
            *(
                s.queue.record_deliveries([(f"c-{n}", [("k", {"n": n})]) for n in ids])
                for s, ids in batches
            )
        )
        recorded = [
            n
            for (_, ids), result in zip(batches, results, strict=True)
            for n, new in zip(ids, result, strict=True)
            if new
        ]
        assert sorted(recorded) == list(range(70))
        assert sorted(payload["n"] for payload in await queued_payloads(first)) == list(range(70))
    finally:
        await first.close()
        await second.close()


async def test_record_deliveries_falls_back_when_another_replica_wins_the_race(
    postgres_database: str,
) -> None:
    """PostgreSQL: an id inserted by another transaction after our look-up costs one retry."""
    store, other = await Store.open(postgres_database), await Store.open(postgres_database)
    try:
        async with other.engine.connect() as conn:
            await conn.begin()
            await conn.execute(deliveries.insert().values(delivery_id="x-1", received_at=utcnow()))
            racing = asyncio.create_task(
                store.queue.record_deliveries(
                    [("x-1", [("k", {"n": 1})]), ("x-2", [("k", {"n": 2})])]
                )
            )
            await asyncio.sleep(0.3)
            assert not racing.done()  # its INSERT waits for the other transaction
            await conn.commit()
        assert await asyncio.wait_for(racing, 30) == [False, True]
        assert await queued_payloads(store) == [{"n": 2}]
    finally:
        await store.close()
        await other.close()


async def test_record_deliveries_waits_when_another_writer_holds_sqlite(tmp_path: Path) -> None:
    """The synchronous SQLite path never blocks on a busy file: the async engine waits."""
    path = tmp_path / "busy.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process is writing
        pending = asyncio.create_task(store.queue.record_deliveries([("b-1", [("k", {"n": 1})])]))
        await asyncio.sleep(0.3)
        assert not pending.done()
        other.execute("COMMIT")
        assert await asyncio.wait_for(pending, 30) == [True]
        assert await store.queue.record_deliveries([("b-1", [])]) == [False]
        assert await queued_payloads(store) == [{"n": 1}]
    finally:
        other.close()
        await store.close()


async def test_job_queue_claim_lease_and_finish(store: Store) -> None:
    first = await store.queue.enqueue("github.pull_request", {"number": 7})
    second = await store.queue.enqueue("slack.deploy", {"service": "gitea"})
    job = await store.queue.claim("worker-a", lease=timedelta(seconds=0.4))
    assert job is not None
    assert (job.id, job.kind, job.payload, job.attempts) == (
        first,
        "github.pull_request",
        {"number": 7},
        1,
    )
    assert job.state is JobState.RUNNING
    other = await store.queue.claim("worker-b", lease=LEASE)
    assert other is not None and other.id == second
    assert await store.queue.claim("worker-b", lease=LEASE) is None
    # worker-a died: after its lease the job is claimed again, attempt 2
    await asyncio.sleep(0.5)
    again = await store.queue.claim("worker-c", lease=LEASE)
    assert again is not None
    assert (again.id, again.worker, again.attempts) == (first, "worker-c", 2)
    assert await store.queue.renew(first, "worker-a", LEASE) is False
    assert await store.queue.renew(first, "worker-c", LEASE) is True
    await store.queue.finish(first)
    await store.queue.finish(second, error="boom")
    done, failed = await store.queue.get(first), await store.queue.get(second)
    assert done is not None and done.state is JobState.DONE
    assert failed is not None and (failed.state, failed.error) == (JobState.FAILED, "boom")
    assert await store.queue.claim("worker-a", lease=LEASE) is None


async def test_jobs_survive_reopening(store_url: str) -> None:
    store = await Store.open(store_url)
    job_id = await store.queue.enqueue("github.push", {"after": "abc"})
    await store.close()
    reopened = await Store.open(store_url)
    try:
        job = await reopened.queue.claim("w", lease=LEASE)
        assert job is not None and job.id == job_id and job.payload == {"after": "abc"}
    finally:
        await reopened.close()


async def test_concurrent_claims_never_share_a_job(store_url: str) -> None:
    stores = [await Store.open(store_url) for _ in range(3)]
    try:
        ids = [await stores[0].queue.enqueue("k", {"n": n}) for n in range(6)]
        claimed = await asyncio.gather(
            *(s.queue.claim(f"w{i}", lease=LEASE) for i, s in enumerate(stores * 2))
        )
        assert sorted(job.id for job in claimed if job is not None) == ids
    finally:
        for s in stores:
            await s.close()


async def test_approvals_resolve_once(store: Store) -> None:
    plan = small_plan()
    approval = await store.approvals.create(
        kind="deploy",
        requested_by="U_ALICE",
        digest=plan.digest,
        ttl=timedelta(minutes=15),
        plan=plan,
        service="gitea",
        args={"ref": "main"},
    )
    await store.approvals.set_message(approval, "C1", "1700000000.0001")
    record = await store.approvals.get(approval)
    assert record is not None
    assert record.state is ApprovalState.PENDING
    assert (record.plan, record.args, record.channel, record.ts) == (
        plan,
        {"ref": "main"},
        "C1",
        "1700000000.0001",
    )
    results = await asyncio.gather(
        store.approvals.resolve(approval, ApprovalState.APPROVED, "U_BOB"),
        store.approvals.resolve(approval, ApprovalState.CANCELLED, "U_ALICE"),
    )
    assert sorted(results) == [False, True]
    final = await store.approvals.get(approval)
    assert final is not None and final.resolved_by in {"U_BOB", "U_ALICE"}
    assert await store.approvals.get("missing") is None


async def test_a_pending_approval_takes_the_plan_its_previews_completed(store: Store) -> None:
    planned, completed = small_plan(head="rev-b"), small_plan(head="rev-b", base=None)
    assert planned.digest != completed.digest
    approval = await store.approvals.create(
        kind="deploy", requested_by="U_A", digest=planned.digest, ttl=timedelta(minutes=5),
        plan=planned, args={"revision": "rev-b"},
    )  # fmt: skip
    assert not await store.approvals.complete_plan(approval, "another digest", completed)
    assert await store.approvals.complete_plan(approval, planned.digest, completed)
    record = await store.approvals.get(approval)
    assert record is not None and record.plan is not None
    assert (record.digest, record.plan.digest) == (completed.digest, completed.digest)
    assert record.args == {"revision": "rev-b", "planned_digest": planned.digest}
    assert record.plans_digests() == {planned.digest, completed.digest}
    assert await store.approvals.resolve(approval, ApprovalState.APPROVED, "U_B")
    # approved meanwhile: the plan the approver saw stays
    assert not await store.approvals.complete_plan(approval, completed.digest, planned)


async def test_expired_approval_cannot_be_approved(store: Store) -> None:
    approval = await store.approvals.create(
        kind="rollback", requested_by="U_A", digest="d", ttl=timedelta(seconds=0.2)
    )
    await asyncio.sleep(0.3)
    assert await store.approvals.resolve(approval, ApprovalState.APPROVED, "U_B") is False
    [expired] = await store.approvals.expire()
    assert expired.id == approval and expired.state is ApprovalState.EXPIRED
    assert await store.approvals.expire() == []


async def test_audit_log(store: Store) -> None:
    await store.audit.record(
        "alice", "unlock", {"service": "gitea", "state": DeploymentState.FAILED}
    )
    await store.audit.record("bob", "deploy", {"ref": "main"})
    entries = await store.audit.entries()
    assert [(e.actor, e.action) for e in entries] == [("bob", "deploy"), ("alice", "unlock")]
    assert entries[1].detail == {"service": "gitea", "state": "failed"}
    await store.audit.record("carol", "unlock", {"service": "forgejo"})
    unlocks = await store.audit.entries(action="unlock")
    assert [(e.actor, e.detail["service"]) for e in unlocks] == [
        ("carol", "forgejo"),
        ("alice", "gitea"),
    ]


async def test_unlock_leaves_a_running_deployments_lease_unless_forced(store: Store) -> None:
    await store.locks.acquire(["gitea"], "deployment d1", lease=LEASE, reason="deploy")
    kept = await store.locks.unlock("gitea")
    assert not kept and kept.removed is False
    assert kept.deployment_lock is not None and kept.deployment_lock.holder == "deployment d1"
    with pytest.raises(LockBusy):  # a second deployment still cannot take the service
        await store.locks.acquire(["gitea"], "deployment d2", lease=LEASE)
    forced = await store.locks.unlock("gitea", force=True)
    assert forced and forced.deployment_lock is None
    assert await store.locks.all() == []
    # an expired lease belongs to a dead holder: removable without force, as before
    await store.locks.acquire(["gitea"], "deployment d3", lease=timedelta(seconds=0.05))
    await asyncio.sleep(0.1)
    assert await store.locks.unlock("gitea")
    missing = await store.locks.unlock("gitea")
    assert not missing and missing.deployment_lock is None


async def test_an_approval_is_claimed_for_one_deployment_only(store: Store) -> None:
    approval = await store.approvals.create(
        kind="deploy", requested_by="U_A", digest="d", ttl=timedelta(minutes=5)
    )
    # a pending request cannot be claimed: only an approved one deploys
    assert await store.approvals.claim_for_deployment(approval, "dep1") is False
    assert await store.approvals.resolve(approval, ApprovalState.APPROVED, "U_B")
    results = await asyncio.gather(
        store.approvals.claim_for_deployment(approval, "starting:a"),
        store.approvals.claim_for_deployment(approval, "starting:b"),
    )
    assert sorted(results) == [False, True]
    winner = "starting:a" if results[0] else "starting:b"
    loser = "starting:b" if results[0] else "starting:a"
    assert not await store.approvals.claim_for_deployment(approval, "dep2", replacing=loser)
    assert await store.approvals.claim_for_deployment(approval, "dep1", replacing=winner)
    record = await store.approvals.get(approval)
    assert record is not None and record.deployment_id == "dep1"
    assert await store.approvals.claim_for_deployment(approval, "dep3") is False


async def test_a_version_1_database_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the approvals table as schema 1 made it
        db.executescript(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DATETIME);"
            "INSERT INTO schema_version VALUES (1, '2026-01-01 00:00:00');"
            "CREATE TABLE approvals (id VARCHAR(32) PRIMARY KEY, kind VARCHAR(32) NOT NULL,"
            " requested_by VARCHAR(255) NOT NULL, service VARCHAR(255), args JSON,"
            " digest VARCHAR(128) NOT NULL, plan TEXT, channel VARCHAR(255), ts VARCHAR(255),"
            " state VARCHAR(32) NOT NULL, created_at DATETIME NOT NULL,"
            " expires_at DATETIME NOT NULL, resolved_by VARCHAR(255), resolved_at DATETIME);"
        )
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    try:
        assert await store.schema_revision() == SCHEMA_REVISION
        approval = await store.approvals.create(
            kind="deploy", requested_by="U_A", digest="d", ttl=timedelta(minutes=5)
        )
        await store.approvals.resolve(approval, ApprovalState.APPROVED, "U_B")
        assert await store.approvals.claim_for_deployment(approval, "dep1")
    finally:
        await store.close()

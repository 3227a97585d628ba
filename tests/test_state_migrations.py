"""Alembic migrations of the state database, on a real SQLite file and a real PostgreSQL server.

Databases are made with the schema nixmox had before Alembic (the DDL frozen in tests/data/),
filled with rows, then opened by today's Store.
"""

from __future__ import annotations

import ast
import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncConnection

from state.approvals import ApprovalState
from state.base import StoreError
from state.engine import make_engine, normalize_url
from state.events import DeploymentState, StepState
from state.migrate import head_revision
from state.schema import metadata
from state.store import SCHEMA_REVISION, Store

DATA = Path(__file__).resolve().parent / "data"
MESSAGE = "slack.deployment.message"  # the audit action that held message links before
T0 = datetime(2026, 11, 30, 12, 0, 0)  # naive UTC, as the old schema stores it


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL of each backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/state.db"
    return str(request.getfixturevalue("postgres_database"))


def frozen_ddl(backend: str) -> list[str]:
    """The CREATE statements of the pre-Alembic schema (schema_version 2) for a backend."""
    text = (DATA / f"state_schema_v2.{backend}.sql").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("--")]
    return [sql.strip() for sql in "\n".join(lines).split(";") if sql.strip()]


def _typed(value: Any) -> sa.types.TypeEngine[Any] | None:
    if isinstance(value, datetime):
        return sa.DateTime()
    if isinstance(value, dict | list):
        return sa.JSON()
    return None


async def insert(conn: AsyncConnection, table: str, **values: Any) -> None:
    """A row written the way the old code wrote it (JSON and DateTime columns typed)."""
    columns = [sa.column(name, _typed(value)) for name, value in values.items()]
    await conn.execute(sa.table(table, *columns).insert().values(**values))


async def make_old_database(url: str, version: int = 2) -> None:
    """A database as nixmox before Alembic left it, at `version`, with a row in every table."""
    engine = make_engine(normalize_url(url))
    try:
        async with engine.begin() as conn:
            for sql in frozen_ddl(engine.dialect.name):
                await conn.exec_driver_sql(sql)
            if version == 1:  # schema 2 added approvals.deployment_id
                await conn.exec_driver_sql("ALTER TABLE approvals DROP COLUMN deployment_id")
            await insert(conn, "schema_version", version=version, applied_at=T0)
            await fill_old_rows(conn, with_claim=version >= 2)
    finally:
        await engine.dispose()


async def fill_old_rows(conn: AsyncConnection, *, with_claim: bool) -> None:
    """One row of each kind, and the audit entries that held Slack message links."""
    await insert(
        conn,
        "deployments",
        id="d1",
        kind="deploy",
        trigger="slack",
        state="succeeded",
        requested_by="U_A",
        head="rev-b",
        digest="sha256:x",
        plan="{}",
        created_at=T0,
        finished_at=T0 + timedelta(minutes=1),
    )
    for position, (step, service) in enumerate([("nix:core:gitea", "gitea"), ("tf:infra", None)]):
        await insert(
            conn,
            "steps",
            deployment_id="d1",
            step_id=step,
            position=position,
            phase=step.rsplit(":", 1)[0] if service else step,
            service=service,
            state="succeeded",
            attempt=1,
            output=f"output of {step}",
            commands=["nixos-rebuild switch"],
        )
    await insert(conn, "services", name="gitea", revision="rev-b", system_path="/nix/store/g")
    await insert(conn, "locks", service="caddy", holder="alice", reason="maint", acquired_at=T0)
    await insert(conn, "deliveries", delivery_id="delivery-1", received_at=T0)
    await insert(
        conn, "jobs", kind="push", payload={"n": 1}, state="queued", attempts=0, created_at=T0
    )
    approval: dict[str, Any] = {"deployment_id": "d1"} if with_claim else {}
    await insert(
        conn,
        "approvals",
        id="a1",
        kind="deploy",
        requested_by="U_A",
        digest="sha256:x",
        args={"service": "gitea"},
        state="approved",
        created_at=T0,
        expires_at=T0 + timedelta(days=3650),
        **approval,
    )
    links = [
        ("d1", {"deployment": "d1", "channel": "C1", "ts": "1.000", "title": "old"}),
        ("other", {"actor": "alice"}),
        ("d1", {"deployment": "d1", "channel": "C1", "ts": "2.000", "title": "deploy gitea"}),
        ("d2", {"deployment": "d2", "channel": "C2"}),  # no ts: not a usable link
        ("d3", {"deployment": "d3", "channel": "C3", "ts": "3.000", "origin": "slack"}),
    ]
    for minute, (kind, detail) in enumerate(links):
        action = "lock" if kind == "other" else MESSAGE
        at = T0 + timedelta(minutes=minute)
        await insert(conn, "audit_log", at=at, actor="nixmox", action=action, detail=detail)


async def legacy_versions(store: Store) -> list[int]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(sa.text("SELECT version FROM schema_version ORDER BY version"))
        return [int(version) for (version,) in rows]


def test_the_store_names_the_head_revision() -> None:
    assert head_revision() == SCHEMA_REVISION


async def test_a_fresh_database_is_created_at_head_matching_the_schema(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        assert await store.schema_revision() == SCHEMA_REVISION
        async with store.engine.connect() as conn:
            differences = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
        assert differences == []
        assert await legacy_versions(store) == [2, 3]  # an older nixmox refuses it
    finally:
        await store.close()


async def test_todays_database_is_stamped_and_upgraded_keeping_its_rows(db_url: str) -> None:
    await make_old_database(db_url, version=2)
    store = await Store.open(db_url)
    try:
        assert await store.schema_revision() == SCHEMA_REVISION
        record = await store.deployments.get("d1")
        assert record is not None and record.state is DeploymentState.SUCCEEDED
        assert record.created_at == T0.replace(tzinfo=UTC)
        assert [(s.id, s.state) for s in record.steps] == [
            ("nix:core:gitea", StepState.SUCCEEDED),
            ("tf:infra", StepState.SUCCEEDED),
        ]
        assert record.steps[0].commands == ["nixos-rebuild switch"]
        assert (await store.services.all())["gitea"].system_path == "/nix/store/g"
        assert [(lock.service, lock.holder) for lock in await store.locks.all()] == [
            ("caddy", "alice")
        ]
        assert await store.queue.record_delivery("delivery-1") is False  # seen before
        job = await store.queue.claim("w", lease=timedelta(seconds=30))
        assert job is not None and job.payload == {"n": 1}
        approval = await store.approvals.get("a1")
        assert approval is not None and approval.state is ApprovalState.APPROVED
        assert approval.deployment_id == "d1" and approval.args == {"service": "gitea"}
        assert len(await store.audit.entries(50)) == 5
        # the message links moved from the audit log into their own table: the latest wins
        links = await store.slack_messages.of({"d1", "d2", "d3"})
        assert sorted(links) == ["d1", "d3"]
        assert (links["d1"].channel, links["d1"].ts, links["d1"].title) == (
            "C1",
            "2.000",
            "deploy gitea",
        )
        assert links["d3"].origin == "slack"
        assert links["d1"].posted_at == (T0 + timedelta(minutes=2)).replace(tzinfo=UTC)
        assert await legacy_versions(store) == [2, 3]
    finally:
        await store.close()
    again = await Store.open(db_url)  # opening again changes nothing
    try:
        assert await again.schema_revision() == SCHEMA_REVISION
        assert len(await again.slack_messages.of({"d1", "d3"})) == 2
    finally:
        await again.close()


async def test_a_version_1_database_is_upgraded(db_url: str) -> None:
    await make_old_database(db_url, version=1)
    store = await Store.open(db_url)
    try:
        assert await store.schema_revision() == SCHEMA_REVISION
        approval = await store.approvals.get("a1")
        assert approval is not None and approval.deployment_id is None
        assert await store.approvals.claim_for_deployment("a1", "d1")
        assert (await store.deployments.get("d1")) is not None
        assert (await store.slack_messages.get("d1")) is not None
        assert await legacy_versions(store) == [1, 2, 3]
    finally:
        await store.close()


async def test_a_pre_alembic_database_newer_than_this_code_is_refused(db_url: str) -> None:
    await make_old_database(db_url, version=2)
    engine = make_engine(normalize_url(db_url))
    async with engine.begin() as conn:
        await insert(conn, "schema_version", version=7, applied_at=T0)
    await engine.dispose()
    newer = rf"has schema version 7, newer than this nixmox \({SCHEMA_REVISION}\)"
    with pytest.raises(StoreError, match=newer):
        await Store.open(db_url)


async def test_processes_starting_together_migrate_once(db_url: str) -> None:
    stores = await asyncio.gather(*(Store.open(db_url) for _ in range(3)))
    try:
        assert [await s.schema_revision() for s in stores] == [SCHEMA_REVISION] * 3
        assert await legacy_versions(stores[0]) == [2, 3]
    finally:
        for store in stores:
            await store.close()


async def test_a_recorded_message_replaces_the_earlier_one(db_url: str) -> None:
    store = await Store.open(db_url)
    try:
        await store.slack_messages.remember("d9", "C1", "1.0", title="first")
        await store.slack_messages.remember("d9", "C1", "2.0", origin="merge")
        message = await store.slack_messages.get("d9")
        assert message is not None and (message.ts, message.title, message.origin) == (
            "2.0",
            None,
            "merge",
        )
        assert await store.slack_messages.get("unknown") is None
    finally:
        await store.close()


def test_the_state_package_imports_no_front_end_or_runner() -> None:
    """state sits below runners and the front ends: it imports only itself and planner."""
    root = Path(__file__).resolve().parents[1] / "state"
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in {"bot", "cli", "runners"}:
                    found.setdefault(str(path.relative_to(root)), set()).add(name)
    assert found == {}

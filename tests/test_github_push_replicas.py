"""Two push deliveries of the same revision, claimed by two workers at once, deploy once: two
bots (own Git caches) sharing one store (one SQLite file, or a real PostgreSQL database), the
fake GitHub, simulated runners."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.github.push import merge_lock_name
from state.locks import LockBusy
from state.store import Store
from tests.fakes.github import FakeGitHub
from tests.fixtures_github import ManifestRepo, Payloads, add_port


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/state.db"
    return str(request.getfixturevalue("postgres_database"))


async def test_two_workers_deploy_a_revision_pushed_twice_once(
    make_bot: Any,
    shared_store_url: str,
    tmp_path: Path,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
    fake_github: FakeGitHub,
) -> None:
    first = await make_bot(database_url=shared_store_url)
    second = await make_bot(database_url=shared_store_url, workdir=tmp_path / "work-2")
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "gitea: port 3001")
    # two distinct deliveries of one revision (two hooks, say): different bodies and ids
    for bot, pusher in ((first, "alice"), (second, "bob")):
        payload = payloads.push(before=before, after=after)
        payload["pusher"] = {"name": pusher, "email": f"{pusher}@example.com"}
        response = await bot.deliver("push", payload)
        assert (await response.json())["status"] == "accepted"

    ran = await asyncio.gather(
        first.ctx.require_jobs().run_once(), second.ctx.require_jobs().run_once()
    )

    assert ran == [True, True]  # each worker claimed one of the two jobs
    store = first.ctx.require_store()
    [record] = await store.deployments.history()
    assert record.head == after
    finals = [s["description"] for s in fake_github.statuses_for(after, "nixmox/deploy")]
    assert any(d.startswith("succeeded") for d in finals)
    assert any(d.startswith("already deployed") for d in finals)
    assert merge_lock_name(after) not in [lock.service for lock in await store.locks.all()]


async def test_a_kept_lock_outlives_its_lease_and_is_released_after(store: Store) -> None:
    lease = timedelta(seconds=0.6)
    await store.locks.acquire(["merge:abc"], "worker-a", lease=lease)
    async with store.locks.keeping("worker-a", lease):
        await asyncio.sleep(lease.total_seconds() * 2)  # renewed meanwhile, never ran out
        with pytest.raises(LockBusy):
            await store.locks.acquire(["merge:abc"], "worker-b", lease=lease)
    await store.locks.acquire(["merge:abc"], "worker-b", lease=lease)  # released at the end
    assert [lock.holder for lock in await store.locks.all()] == ["worker-b"]

"""`bot.planning`: with `--role all`, plans run in a process pool, with the same result, at a
lower CPU priority (`NIXMOX_WORKER_NICE`)."""

from __future__ import annotations

import os

from bot.planning import Planning
from planner.source import EvalCache
from tests.fixtures_github import MANIFEST_PATH, ManifestRepo, add_port


async def test_a_plan_from_the_process_pool_equals_the_threads_plan(
    manifest_repo: ManifestRepo,
) -> None:
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port")
    pool = Planning(in_processes=True, cache=EvalCache())
    threads = Planning(in_processes=False, cache=EvalCache())
    try:
        pooled = await pool.plan_revisions(
            manifest_repo.path, base, head, manifest_path=MANIFEST_PATH
        )
        threaded = await threads.plan_revisions(
            manifest_repo.path, base, head, manifest_path=MANIFEST_PATH
        )
        assert pool._pool is not None  # it did run in the pool
        assert pooled.digest == threaded.digest
        assert [step.id for step in pooled.steps] == [step.id for step in threaded.steps]
        assert "nix:service-config:gitea" in [step.id for step in pooled.steps]
    finally:
        pool.close()


async def test_the_pool_plans_at_a_lower_cpu_priority(manifest_repo: ManifestRepo) -> None:
    base = manifest_repo.repo.heads.main.commit.hexsha
    head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port")
    pool = Planning(in_processes=True, cache=EvalCache(), nice=5)
    try:
        plan = await pool.plan_revisions(
            manifest_repo.path, base, head, manifest_path=MANIFEST_PATH
        )
        assert plan.digest and pool._pool is not None
        children = [process.pid or 0 for process in pool._pool._processes.values()]
        own = os.getpriority(os.PRIO_PROCESS, 0)
        assert children
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in children] == [
            min(19, own + 5) for _ in children
        ]
        assert os.getpriority(os.PRIO_PROCESS, 0) == own  # this process keeps its priority
    finally:
        pool.close()

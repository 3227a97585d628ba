"""`bot.planning`: with `--role all`, plans run in a process pool, with the same result."""

from __future__ import annotations

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

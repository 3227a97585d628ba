"""Deploy on merge: plan from the deployed revision, statuses, GitHub Deployments, failures."""

from __future__ import annotations

from typing import Any

from state.events import DeploymentState, Trigger
from tests.fakes.github import Failure, FakeGitHub
from tests.fixtures_github import ManifestRepo, Payloads, add_port, break_manifest, fast_runners

DEPLOY = "nixmox/deploy"


async def push(bot: Any, payloads: Payloads, before: str, after: str) -> None:
    response = await bot.deliver("push", payloads.push(before=before, after=after))
    assert (await response.json())["status"] == "accepted", await response.text()
    await bot.drain()


def deploy_states(fake: FakeGitHub, sha: str, context: str = DEPLOY) -> list[str]:
    return [s["state"] for s in fake.statuses_for(sha, context)]


async def test_a_merge_deploys_and_reports_everywhere(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "gitea: port 3001")
    await push(bot, payloads, before, after)

    (record,) = await bot.ctx.require_store().deployments.history()
    assert record.state is DeploymentState.SUCCEEDED
    assert record.trigger == Trigger.MERGE
    assert (record.base, record.head) == (before, after)
    assert record.requested_by == "github:alice"
    assert sorted(s.id for s in record.steps) == ["nix:service-config:gitea", "verify:gitea"]

    assert deploy_states(fake_github, after) == ["pending", "pending", "success"]
    final = fake_github.last_status(after, DEPLOY)
    assert final["description"].startswith("succeeded")
    assert final["target_url"] == f"http://bot.test/deployments/{record.id}"
    assert deploy_states(fake_github, after, f"{DEPLOY}/gitea") == ["pending", "success"]
    (deployment,) = fake_github.deployments.values()
    assert deployment["environment"] == "homelab" and deployment["sha"] == after
    statuses = fake_github.deployment_statuses[deployment["id"]]
    assert [s["state"] for s in statuses] == ["in_progress", "success"]
    page = await bot.client.get(f"/deployments/{record.id}")
    assert "succeeded" in await page.text()


async def test_the_next_merge_plans_from_the_last_deployed_revision(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    first = manifest_repo.repo.heads.main.commit.hexsha
    second = manifest_repo.commit(add_port(manifest_repo.manifest()), "port")
    await push(bot, payloads, first, second)
    third = manifest_repo.commit(
        manifest_repo.manifest().replace("vmid = 302", "vmid = 312"), "vmid"
    )
    # the push says `before` is the first commit (e.g. two commits pushed at once): the plan
    # still starts at what is deployed, so gitea's port change is not deployed twice
    await push(bot, payloads, first, third)
    latest = (await bot.ctx.require_store().deployments.history())[0]
    assert latest.base == second and latest.head == third
    assert "nix:service-config:gitea" not in [s.id for s in latest.steps]


async def test_a_merge_with_nothing_to_deploy(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit("# docs\n" + manifest_repo.manifest(), "comment only")
    await push(bot, payloads, before, after)
    status = fake_github.last_status(after, DEPLOY)
    assert (status["state"], status["description"]) == ("success", "no deployment needed")
    assert fake_github.deployments == {}
    assert await bot.ctx.require_store().deployments.history() == []


async def test_an_invalid_manifest_on_main_fails_the_deploy_status(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(break_manifest(manifest_repo.manifest()), "broken")
    await push(bot, payloads, before, after)
    status = fake_github.last_status(after, DEPLOY)
    assert (status["state"], status["description"]) == ("failure", "invalid manifest: 2 errors")
    assert status["target_url"].startswith("http://bot.test/plans/")
    assert fake_github.deployments == {}


async def test_a_failing_step_fails_the_statuses_and_the_deployment(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot(
        auto_rollback=False, runner_config=fast_runners(fail=["nix:service-config:gitea"])
    )
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "port")
    await push(bot, payloads, before, after)
    (record,) = await bot.ctx.require_store().deployments.history()
    assert record.state is DeploymentState.FAILED
    assert fake_github.last_status(after, DEPLOY)["state"] == "failure"
    service = fake_github.last_status(after, f"{DEPLOY}/gitea")
    assert service["state"] == "failure"
    assert service["description"].startswith("nix:service-config:gitea failed")
    (deployment,) = fake_github.deployments.values()
    assert fake_github.deployment_statuses[deployment["id"]][-1]["state"] == "failure"


async def test_github_failing_never_fails_the_deployment(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "port")
    # every status and Deployment call fails, retries included
    bot.fake.fail_next(1000, Failure.SERVER_ERROR, path=r"/deployments")
    bot.fake.fail_next(1000, Failure.SERVER_ERROR, path=r"/statuses/")
    await push(bot, payloads, before, after)
    (record,) = await bot.ctx.require_store().deployments.history()
    assert record.state is DeploymentState.SUCCEEDED
    failed = await bot.client.get("/metrics")
    assert "nixmox_github_notifications_failed_total" in await failed.text()
    assert fake_github.deployments == {}


async def test_a_late_push_that_is_already_deployed_does_nothing(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()
    first = manifest_repo.repo.heads.main.commit.hexsha
    second = manifest_repo.commit(add_port(manifest_repo.manifest()), "port")
    third = manifest_repo.commit(add_port(manifest_repo.manifest(), 3005), "another port")
    await push(bot, payloads, first, third)
    await push(bot, payloads, first, second)  # delivered late, after the newer one
    assert len(await bot.ctx.require_store().deployments.history()) == 1
    assert fake_github.last_status(second, DEPLOY)["description"].startswith("already deployed")


async def test_a_merge_waits_for_a_locked_service_then_deploys(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    import asyncio

    bot = await make_bot(merge_lock_wait=30)
    store = bot.ctx.require_store()
    await store.locks.lock("gitea", "slack:U1", "maintenance")
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "port")

    async def unlock_once_waiting() -> None:
        while not any(
            s["description"].startswith("waiting for gitea")
            for s in fake_github.statuses_for(after, DEPLOY)
        ):
            await asyncio.sleep(0.02)
        await store.locks.unlock("gitea")

    unlocker = asyncio.create_task(unlock_once_waiting())
    await push(bot, payloads, before, after)
    await asyncio.wait_for(unlocker, 5)
    descriptions = [s["description"] for s in fake_github.statuses_for(after, DEPLOY)]
    assert "waiting for gitea locked by slack:U1" in descriptions
    assert fake_github.last_status(after, DEPLOY)["state"] == "success"
    (record,) = await store.deployments.history()
    assert record.state is DeploymentState.SUCCEEDED and record.head == after


async def test_a_merge_still_locked_after_the_wait_is_an_error(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot(merge_lock_wait=0.3)
    store = bot.ctx.require_store()
    await store.locks.lock("gitea", "slack:U1", "maintenance")
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "port")
    await push(bot, payloads, before, after)
    final = fake_github.last_status(after, DEPLOY)
    assert final["state"] == "error"
    assert final["description"] == "not deployed: gitea still locked by slack:U1 after 0.3 s"
    assert await store.deployments.history() == []
    assert fake_github.deployments == {}


def test_merge_lock_wait_defaults_to_ten_minutes() -> None:
    from bot.config import Settings

    assert Settings().merge_lock_wait == 600
    assert Settings(merge_lock_wait="5").merge_lock_wait == 5


async def test_after_a_failed_first_deployment_the_next_merge_deploys_everything(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    from bot.github.push import NOT_YET_DEPLOYED

    bot = await make_bot(
        auto_rollback=False, runner_config=fast_runners(fail=["nix:service-config:gitea"])
    )
    first = manifest_repo.repo.heads.main.commit.hexsha
    second = manifest_repo.commit(add_port(manifest_repo.manifest()), "gitea: port 3001")
    await push(bot, payloads, first, second)
    store = bot.ctx.require_store()
    (failed,) = await store.deployments.history()
    assert failed.state is DeploymentState.FAILED and failed.base == first

    bot.ctx.runner_config = fast_runners()  # gitea's step works again
    third = manifest_repo.commit(
        manifest_repo.manifest().replace("vmid = 302", "vmid = 312"), "vmid"
    )
    await push(bot, payloads, second, third)  # the push's diff does not touch gitea
    latest = (await store.deployments.history())[0]
    assert latest.id != failed.id and (latest.base, latest.head) == (None, third)
    ids = [s.id for s in latest.steps]
    assert {"nix:service-config:gitea", "verify:gitea"} <= set(ids)
    assert len(ids) > len(failed.steps)
    assert latest.state is DeploymentState.SUCCEEDED
    assert NOT_YET_DEPLOYED in [s["description"] for s in fake_github.statuses_for(third, DEPLOY)]
    assert await store.deployments.last_deployed_revision() == third


async def test_an_empty_store_plans_a_merge_from_the_pushs_before(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    from bot.github.push import NOT_YET_DEPLOYED

    bot = await make_bot()
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "gitea: port 3001")
    await push(bot, payloads, before, after)
    (record,) = await bot.ctx.require_store().deployments.history()
    assert record.base == before
    assert NOT_YET_DEPLOYED not in [
        s["description"] for s in fake_github.statuses_for(after, DEPLOY)
    ]


async def test_a_push_to_another_branch_is_planned_never_deployed(
    make_bot: Any, manifest_repo: ManifestRepo, payloads: Payloads, fake_github: FakeGitHub
) -> None:
    bot = await make_bot()  # NIXMOX_APPLY_ON_MERGE is on
    before = manifest_repo.repo.heads.main.commit.hexsha
    after = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="feature")
    response = await bot.deliver(
        "push", payloads.push(before=before, after=after, branch="feature")
    )
    assert (await response.json())["status"] == "accepted", await response.text()
    await bot.drain()
    assert fake_github.statuses_for(after, DEPLOY) == []
    assert fake_github.last_status(after, "nixmox/plan")["state"] == "success"
    assert fake_github.deployments == {}
    assert await bot.ctx.require_store().deployments.history() == []
    assert await bot.ctx.require_store().deployments.last_deployed_revision() is None

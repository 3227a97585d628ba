"""The dashboard (`/`, `/deployments/{id}`, `/services/{name}`) over real simulated deployments."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import git
import pytest
import sqlalchemy as sa

from bot.app import build_app
from bot.config import Settings
from deployments import ExecutionOptions, GitSource, Requester, plan_for_deploy, start_deployment
from planner.plan import Phase, Step
from runners.base import Context
from runners.config import RunnerConfig, SimulateConfig
from runners.registry import RunnerKind, RunnerSet, build_runners
from state.deployments import DeploymentRecord
from state.events import DeploymentState, StepFinished, StepResult, StepStarted, StepState
from state.store import Store
from tests.fixtures_manifests import MANIFEST_PATH, SMALL_MANIFEST

SMALL = SMALL_MANIFEST.read_text()
FAST = RunnerConfig(simulate=SimulateConfig(scale=0.005))
FAILING_VERIFY = RunnerConfig(simulate=SimulateConfig(scale=0.005, fail=["verify:gitea"]))
MARKUP = '<script>alert("pwned")</script> & <b>bold</b>'
SECRET = "webhook-secret-never-shown"


class MarkupVerifier:
    """A verify runner whose output is HTML, as a health check printing a web page would."""

    async def run(self, step: Step, ctx: Context) -> StepResult:
        return StepResult(True, f"{step.id}: {MARKUP}")


async def deploy(
    store: Store,
    repo: git.Repo,
    tmp_path: Path,
    runner_config: RunnerConfig = FAST,
    runners: RunnerSet | None = None,
) -> DeploymentRecord:
    """Plan from the store's deployed revision and run it with simulated runners."""
    plan = await plan_for_deploy(store, repo.working_tree_dir, "main", manifest_path=MANIFEST_PATH)
    record = await start_deployment(
        store,
        plan,
        GitSource(Path(repo.working_tree_dir), manifest_path=MANIFEST_PATH),
        requester=Requester(requested_by="github:alice", approved_by="slack:U2"),
        options=ExecutionOptions(
            runner_kind=RunnerKind.SIMULATE,
            runner_config=runner_config,
            runners=runners,
            work_root=tmp_path / "work",
        ),
    )
    assert record is not None
    return record


def markup_runners() -> RunnerSet:
    """The simulated runners, except that verify steps print HTML."""
    simulated = build_runners(RunnerKind.SIMULATE, RunnerConfig(simulate=SimulateConfig(scale=0)))
    by_phase = {**simulated.by_phase, Phase.VERIFY: MarkupVerifier()}
    return RunnerSet(RunnerKind.SIMULATE, by_phase, simulated.rollback)


def cells(page: str, row_key: str) -> list[str]:
    """The text of each cell of the table row that mentions `row_key`."""
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        if row_key in row:
            return [
                re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.S)
            ]
    raise AssertionError(f"no row with {row_key}")


def section(page: str, title: str) -> str:
    """The part of a page under the heading `title`, up to the next heading."""
    return page.split(f"<h2>{title}</h2>")[1].split("<h2>")[0]


@pytest.fixture
async def client(aiohttp_client: Any, store: Store, tmp_path: Path) -> Any:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/state.db",
        workdir=tmp_path / "bot",
        github_webhook_secret=SECRET,
    )
    return await aiohttp_client(
        build_app(settings, store=store, start_worker=False, start_monitor=False)
    )


async def test_overview_shows_services_locks_and_recent_deployments(
    client: Any, store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    record = await deploy(store, repo, tmp_path, runner_config=FAILING_VERIFY)
    assert record.state is DeploymentState.ROLLED_BACK
    await store.locks.lock("postgresql", "alice", "disk <swap>")
    services = await store.services.all()

    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert '<meta http-equiv="refresh" content="10">' in page
    postgresql = cells(page, 'href="/services/postgresql"')
    assert postgresql[:3] == ["postgresql", record.head[:12], "healthy"]
    assert services["postgresql"].system_path in postgresql
    assert postgresql[5] == record.id
    assert "alice (manual lock: disk &lt;swap&gt;" in postgresql[6]
    gitea = cells(page, 'href="/services/gitea"')
    # gitea was rolled back: not at the new revision, running its earlier system again
    assert gitea[1] == "–" and services["gitea"].system_path in gitea
    row = cells(section(page, "Last 20 deployments"), record.id)
    assert row[:6] == [record.id, "deploy", "cli", "github:alice", "slack:U2", "rolled_back"]
    assert row[6] == record.head[:12]
    assert "Nothing is running." in page
    assert SECRET not in page and "sqlite" not in page


async def test_running_deployments_show_their_progress(
    client: Any, store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    finished = await deploy(store, repo, tmp_path)
    plan = finished.plan
    running_id = await store.deployments.create(kind="deploy", trigger="slack", plan=plan)
    await store.deployments.set_state(running_id, DeploymentState.RUNNING)
    record = await store.deployments.get(running_id)
    assert record is not None
    first, second = plan.steps[0], plan.steps[1]
    await store.deployments.record_event(StepStarted(running_id, first))
    await store.deployments.record_event(StepFinished(running_id, first, StepState.SUCCEEDED))
    await store.deployments.record_event(StepStarted(running_id, second))

    page = await (await client.get("/")).text()
    running = section(page, "Running")
    assert running_id in running and finished.id not in running
    assert f'<progress value="1" max="{len(plan.steps)}">' in running
    assert f"1/{len(plan.steps)} steps finished; running: {second.id}" in re.sub(
        r"<[^>]+>", "", running
    )
    detail = await client.get(f"/deployments/{running_id}")
    assert '<meta http-equiv="refresh"' in await detail.text()  # a running deployment refreshes


async def test_deployment_page_shows_steps_output_and_rollback(
    client: Any, store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    record = await deploy(store, repo, tmp_path, runner_config=FAILING_VERIFY)
    response = await client.get(f"/deployments/{record.id}")
    assert response.status == 200
    page = await response.text()
    assert "5 steps in" in page  # planner.render.summary of the recorded plan
    assert "<h2>Rollback</h2>" in page
    verify = record.step("verify:gitea")
    assert verify is not None and verify.state is StepState.ROLLED_BACK
    assert verify.reason is not None and verify.reason in page
    for step in record.steps:
        row = cells(page, f"<code>{step.id}</code>")
        assert row[3] == step.state.value and row[4] == str(step.attempt)
    failing = cells(page, "<code>verify:gitea</code>")
    assert "simulated failure of verify:gitea" in failing[-1]
    assert "<details open>" in page  # a failed step's output is shown unfolded
    assert '<meta http-equiv="refresh"' not in page  # finished: nothing to refresh

    as_json = await client.get(f"/deployments/{record.id}?format=json")
    detail = await as_json.json()
    assert detail["state"] == "rolled_back" and detail["head"] == record.head
    assert [s["id"] for s in detail["steps"]] == [s.id for s in record.steps]


async def test_html_in_step_output_is_escaped(
    client: Any, store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    record = await deploy(store, repo, tmp_path, runners=markup_runners())
    assert record.state is DeploymentState.SUCCEEDED
    page = await (await client.get(f"/deployments/{record.id}")).text()
    assert "<script>" not in page and "<b>bold" not in page
    escaped = "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"
    assert f"verify:gitea: {escaped}" in page


async def test_service_page_lists_its_deployments(
    client: Any, store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    first = await deploy(store, repo, tmp_path)
    path = Path(repo.working_tree_dir) / MANIFEST_PATH
    path.write_text(path.read_text().replace("ports = [ 3000 ]", "ports = [ 3001 ]"))
    repo.index.add([MANIFEST_PATH])
    repo.index.commit("gitea port")
    second = await deploy(store, repo, tmp_path)
    assert second.services == ["gitea"]

    gitea = await (await client.get("/services/gitea")).text()
    assert first.id in gitea and second.id in gitea
    assert cells(gitea, second.id)[6] == f"{first.head[:12]} → {second.head[:12]}"
    postgresql = await (await client.get("/services/postgresql")).text()
    assert first.id in postgresql and second.id not in postgresql


async def test_unknown_ids_are_404_pages(client: Any, store: Store) -> None:
    for path in ("/deployments/nope", "/services/nope", "/deployments/" + "x<y" * 200):
        response = await client.get(path)
        assert response.status == 404, path
        assert response.content_type == "text/html"
        assert "<y" not in await response.text()
    missing = await client.get("/deployments/nope?format=json")
    assert missing.status == 404 and "nope" in (await missing.json())["error"]
    empty = await client.get("/")
    assert empty.status == 200
    assert "No deployments yet." in await empty.text()


async def test_a_store_that_fails_gives_a_503_page_not_a_500(client: Any, store: Store) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(sa.text("ALTER TABLE services RENAME TO services_gone"))
    response = await client.get("/")
    assert response.status == 503
    assert "The state store does not answer" in await response.text()

"""The deployment core: one base-revision rule, options from the settings, the status views
every surface renders, and its place in the layers."""

from __future__ import annotations

import ast
from datetime import timedelta
from pathlib import Path

import git
import pytest

from bot.config import Settings
from bot.context import BotContext
from bot.github.comments import history_markdown, status_markdown
from bot.slack.status import history_slack, status_slack
from cli.status import history_text, status_text
from deployments import (
    NOT_YET_DEPLOYED,
    Base,
    ExecutionOptions,
    GitSource,
    base_revision,
    plan_for_deploy,
    start_deployment,
    views,
)
from runners.config import RunnerConfig, SimulateConfig
from runners.registry import RunnerKind
from state.store import Store
from tests.fixtures_manifests import MANIFEST_PATH, REPO_ROOT

FAST = RunnerConfig(simulate=SimulateConfig(scale=0.005))


def commit(repo: git.Repo, old: str, new: str, message: str) -> str:
    path = Path(str(repo.working_tree_dir)) / MANIFEST_PATH
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    repo.index.add([MANIFEST_PATH])
    return repo.index.commit(message).hexsha


def simulated(tmp_path: Path, config: RunnerConfig = FAST) -> ExecutionOptions:
    return ExecutionOptions(
        runner_kind=RunnerKind.SIMULATE, runner_config=config, work_root=tmp_path / "work"
    )


async def deploy_head(store: Store, repo: git.Repo, options: ExecutionOptions) -> None:
    repo_dir = Path(str(repo.working_tree_dir))
    plan = await plan_for_deploy(store, repo_dir, "main", manifest_path=MANIFEST_PATH)
    await start_deployment(
        store, plan, GitSource(repo_dir, manifest_path=MANIFEST_PATH), options=options
    )


# --- one rule for the base revision ------------------------------------------------------------


async def test_the_base_rule_for_an_empty_store(store: Store, repo: git.Repo) -> None:
    """Nothing deployed: everything, unless the caller knows what runs (a merge's `before`)."""
    repo_dir = Path(str(repo.working_tree_dir))
    first = repo.head.commit.hexsha
    assert await base_revision(store, repo_dir) == Base(None)
    assert await base_revision(store, repo_dir, running=first) == Base(first)
    # a `before` Git does not know (a new branch's zeros) plans everything
    assert await base_revision(store, repo_dir, running="0" * 40) == Base(None)


async def test_after_a_failed_first_deployment_every_front_end_deploys_everything(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    """The CLI, Slack and a merge plan alike: no full success yet means everything, noted."""
    repo_dir = Path(str(repo.working_tree_dir))
    first = repo.head.commit.hexsha
    failing = RunnerConfig(simulate=SimulateConfig(scale=0.005, fail=["tf:infra"]))
    await deploy_head(store, repo, simulated(tmp_path, failing))
    second = commit(repo, "ports = [ 3000 ]", "ports = [ 3001 ]", "gitea port")
    # a merge passes its `before`; the CLI and Slack pass nothing: the same base either way
    as_merge = await base_revision(store, repo_dir, running=first)
    as_slack = await base_revision(store, repo_dir)
    assert as_merge == as_slack == Base(None, never_succeeded=True)
    plan = await plan_for_deploy(
        store, repo_dir, second, running=first, manifest_path=MANIFEST_PATH
    )
    assert plan.base is None and plan.note == NOT_YET_DEPLOYED
    assert len(plan.steps) == 5


async def test_after_a_success_the_deployed_revision_is_the_base_for_all(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    repo_dir = Path(str(repo.working_tree_dir))
    deployed = repo.head.commit.hexsha
    await deploy_head(store, repo, simulated(tmp_path))
    later = commit(repo, "ports = [ 3000 ]", "ports = [ 3001 ]", "gitea port")
    assert await base_revision(store, repo_dir, running=later) == Base(deployed)
    assert await base_revision(store, repo_dir) == Base(deployed)
    # a --service deploy starts from what that service runs
    assert await base_revision(store, repo_dir, service="gitea") == Base(deployed)


# --- options from the settings -----------------------------------------------------------------


def test_the_bot_takes_lock_lease_and_execution_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nixmox serve` honours NIXMOX_LOCK_LEASE like the CLI does."""
    monkeypatch.setenv("NIXMOX_LOCK_LEASE", "7.5")
    monkeypatch.setenv("NIXMOX_PARALLEL", "2")
    monkeypatch.setenv("NIXMOX_RUNNER", "simulate")
    ctx = BotContext(settings=Settings(workdir=tmp_path))
    options = ctx.execution
    assert options.lock_lease == timedelta(seconds=7.5)
    assert (options.parallel, options.runner_kind) == (2, RunnerKind.SIMULATE)
    assert options.work_root == tmp_path / "work"
    assert options.waiting(30).lock_wait == 30 and options.lock_wait == 0.0
    assert not options.without_auto_rollback().auto_rollback


# --- status and history: one view, one renderer per surface ------------------------------------


async def test_every_surface_says_the_same_when_nothing_is_recorded(store: Store) -> None:
    status = await views.status_view(store)
    assert views.NOTHING_DEPLOYED in status_text(status)
    assert views.NOTHING_DEPLOYED in status_slack(status)
    assert status_markdown(status) == views.NOTHING_DEPLOYED
    history = await views.history_view(store, "gitea")
    words = views.NO_HISTORY_OF.format(service="gitea")
    assert history_text(history) == history_slack(history) == history_markdown(history) == words


async def test_every_surface_shows_the_same_columns_and_revisions(
    store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    from planner.render import short_rev  # the one short-revision function

    await deploy_head(store, repo, simulated(tmp_path))
    short = short_rev(repo.head.commit.hexsha)
    status = await views.status_view(store)
    assert [row.service for row in status.rows] == ["gitea", "postgresql"]
    assert {row.revision for row in status.rows} == {short}
    cli, markdown, slack = status_text(status), status_markdown(status), status_slack(status)
    [header] = [line for line in cli.split("\n") if line.startswith("SERVICE")]
    assert header.split() == " ".join(views.STATUS_HEADERS).split()
    assert "| " + " | ".join(views.STATUS_HEADERS) + " |" in markdown
    for text in (cli, markdown, slack):
        assert short in text and "gitea" in text
    history = await views.history_view(store)
    assert "| " + " | ".join(views.HISTORY_HEADERS) + " |" in history_markdown(history)
    assert history_text(history).split("\n")[0].split() == list(views.HISTORY_HEADERS)
    assert short in history_slack(history)


# --- layers ------------------------------------------------------------------------------------


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (TYPE_CHECKING imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_the_core_imports_no_front_end() -> None:
    for path in sorted((REPO_ROOT / "deployments").glob("*.py")):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in {"bot", "cli"}}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_no_runner_or_store_module_imports_the_core() -> None:
    for path in sorted((REPO_ROOT / "runners").glob("*.py")):
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "deployments"}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_context_and_jobs_do_not_import_each_other() -> None:
    jobs = imported_modules(REPO_ROOT / "bot" / "jobs.py")
    assert "bot.context" not in jobs

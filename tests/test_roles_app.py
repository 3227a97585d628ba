"""`build_app(role=...)`: what a web, a worker and `all` run (SQLite, real aiohttp server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner
from pydantic import SecretStr

from bot.app import build_app
from bot.config import Settings
from bot.context import CONTEXT
from bot.roles import Role
from cli.main import main
from tests.fixtures_github import WEBHOOK_SECRET


def settings_for(tmp_path: Path) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        workdir=tmp_path / "work",
        github_webhook_secret=SecretStr(WEBHOOK_SECRET),
        github_token=SecretStr("t"),
        github_api_url="http://127.0.0.1:9",
        repo="octo-org/homelab",
        runner="real",
        monitor=True,
    )


async def test_a_web_queues_but_runs_nothing(aiohttp_client: Any, tmp_path: Path) -> None:
    app = build_app(settings_for(tmp_path), role=Role.WEB)
    client = await aiohttp_client(app)
    ctx = app[CONTEXT]
    assert ctx.jobs is not None and ctx.jobs._tasks == []  # no job worker
    assert ctx.tasks.recovery_sweep is None and ctx.tasks.monitor is None
    assert not ctx.planning.in_processes
    answer = await client.post("/github/webhook", data=b"{}")
    assert answer.status == 401  # the webhook is served (and checks its signature)
    assert (await client.get("/healthz")).status == 200


async def test_a_worker_runs_jobs_and_serves_only_health_and_metrics(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    app = build_app(settings.model_copy(update={"monitor": False}), role=Role.WORKER)
    client = await aiohttp_client(app)
    ctx = app[CONTEXT]
    assert ctx.jobs is not None and ctx.jobs._tasks  # claiming jobs
    assert ctx.tasks.recovery_sweep is not None and not ctx.tasks.recovery_sweep.done()
    assert (await client.post("/github/webhook", data=b"{}")).status == 404
    assert (await client.get("/")).status == 404  # no dashboard either
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_all_plans_in_a_process_pool_when_asked(aiohttp_client: Any, tmp_path: Path) -> None:
    settings = settings_for(tmp_path).model_copy(update={"monitor": False})
    app = build_app(settings, plan_in_processes=True)
    await aiohttp_client(app)
    ctx = app[CONTEXT]
    assert ctx.planning.in_processes and ctx.jobs is not None and ctx.jobs._tasks
    assert ctx.planning.nice == settings.worker_nice == 10  # NIXMOX_WORKER_NICE's default


async def test_a_worker_plans_in_a_process_pool_when_asked(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path).model_copy(update={"monitor": False, "worker_nice": 3})
    app = build_app(settings, role=Role.WORKER, plan_in_processes=True)
    await aiohttp_client(app)
    planning = app[CONTEXT].planning
    assert planning.in_processes and planning.nice == 3


def test_the_cli_offers_the_roles() -> None:
    serve = CliRunner().invoke(main, ["serve", "--help"])
    assert serve.exit_code == 0 and "[web|worker|all]" in serve.output
    worker = CliRunner().invoke(main, ["worker", "--help"])
    assert worker.exit_code == 0 and "--port" in worker.output and "8081" in worker.output
    bad = CliRunner().invoke(main, ["serve", "--role", "both"])
    assert bad.exit_code == 2 and "'both' is not one of" in bad.output

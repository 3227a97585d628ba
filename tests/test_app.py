"""The aiohttp application: health, metrics, plan and deployment pages, the Slack hook."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.app import build_app
from bot.config import Settings
from bot.context import CONTEXT, BotContext, DeploymentRequest
from planner.plan import Plan, Step
from runners.base import Trigger
from state.store import SCHEMA_REVISION, Store


def plain_settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        workdir=tmp_path / "work",
        **values,
    )


async def test_healthz_reports_the_store(aiohttp_client: Any, tmp_path: Path) -> None:
    app = build_app(plain_settings(tmp_path))
    client = await aiohttp_client(app)
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "store": "up"}
    await app[CONTEXT].require_store().engine.dispose()
    app[CONTEXT].store = None
    down = await client.get("/healthz")
    assert down.status == 503
    assert (await down.json())["store"] == "down"


async def test_metrics_are_prometheus_text(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(plain_settings(tmp_path)))
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert "# TYPE nixmox_github_webhooks_total counter" in text
    assert "nixmox_jobs_running 0.0" in text


async def test_without_github_there_is_no_webhook_route(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    client = await aiohttp_client(build_app(plain_settings(tmp_path)))
    assert (await client.post("/github/webhook", data=b"{}")).status == 404


async def test_plan_pages(aiohttp_client: Any, tmp_path: Path) -> None:
    app = build_app(plain_settings(tmp_path))
    client = await aiohttp_client(app)
    step = Step(id="verify:<script>", phase="verify", service="x")
    plan = Plan(steps=[step], waves=[[step.id]], digest="ab" * 32)
    key = app[CONTEXT].plans.save(plan)
    html_page = await client.get(f"/plans/{key}")
    assert html_page.status == 200
    text = await html_page.text()
    assert "verify:&lt;script&gt;" in text and "<script>" not in text
    as_json = await client.get(f"/plans/{key}?format=json")
    assert (await as_json.json())["digest"] == "ab" * 32
    assert (await client.get("/plans/" + "cd" * 32)).status == 404
    assert (await client.get("/plans/..%2F..%2Fetc%2Fpasswd")).status == 404


async def test_unknown_deployment_is_404(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(plain_settings(tmp_path)))
    assert (await client.get("/deployments/nope")).status == 404


async def test_a_given_store_is_used_and_left_open(aiohttp_client: Any, tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'given.db'}")
    app = build_app(plain_settings(tmp_path), store=store)
    client = await aiohttp_client(app)
    assert app[CONTEXT].store is store
    await client.close()
    assert await store.schema_revision() == SCHEMA_REVISION  # still open
    await store.close()


async def test_slack_joins_through_setup_slack(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """With NIXMOX_SLACK_SIGNING_SECRET, `bot.slack.setup_slack(app, ctx)` adds its parts."""
    calls: list[tuple[web.Application, BotContext]] = []

    async def slack_events(request: web.Request) -> web.Response:
        return web.Response(text="slack")

    def setup_slack(app: web.Application, ctx: BotContext) -> None:
        calls.append((app, ctx))
        app.router.add_post("/slack/events", slack_events)

        async def subscriber_factory(request: DeploymentRequest) -> None:
            return None

        ctx.subscriber_factories.append(subscriber_factory)

    fake_slack = types.ModuleType("bot.slack")
    fake_slack.setup_slack = setup_slack  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bot.slack", fake_slack)
    app = build_app(plain_settings(tmp_path, slack_signing_secret="s"))
    client = await aiohttp_client(app)
    ((called_app, ctx),) = calls
    assert called_app is app and ctx is app[CONTEXT]
    assert (await client.post("/slack/events")).status == 200
    request = DeploymentRequest(trigger=Trigger.SLACK, requested_by="slack:U1", revision=None)
    assert await ctx.subscribers_for(request) == []


async def test_a_failing_subscriber_factory_is_skipped(tmp_path: Path) -> None:
    ctx = BotContext(settings=plain_settings(tmp_path))

    async def broken(request: DeploymentRequest) -> None:
        raise RuntimeError("boom")

    async def good_subscriber(event: Any) -> None:
        return None

    async def good(request: DeploymentRequest) -> Any:
        return good_subscriber

    ctx.subscriber_factories += [broken, good]
    request = DeploymentRequest(trigger=Trigger.CLI, requested_by="me", revision="a" * 40)
    assert await ctx.subscribers_for(request) == [good_subscriber]

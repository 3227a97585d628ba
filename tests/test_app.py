"""The aiohttp application: health, metrics, plan and deployment pages, the Slack hook."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.app import build_app
from bot.config import Settings
from bot.context import CONTEXT, BotContext
from bot.frontend import BaseFrontEnd, Method, Route
from bot.jobs import JobHandler
from bot.request import DeploymentRequest
from planner.plan import Plan, Step
from state.events import Trigger
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


class RecordingFrontEnd(BaseFrontEnd):
    """A front end that records what the application does with it."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def routes(self) -> Sequence[Route]:
        async def events(request: web.Request) -> web.Response:
            return web.Response(text="recorded")

        return (Route(Method.POST, "/slack/events", events),)

    def job_handlers(self) -> Mapping[str, JobHandler]:
        async def handle(payload: dict[str, Any]) -> None:
            self.calls.append(f"job {payload['n']}")

        return {"recording.job": handle}

    async def subscriber_for(self, request: DeploymentRequest) -> None:
        self.calls.append(f"subscriber for {request.requested_by}")
        return None

    async def start(self) -> None:
        self.calls.append("start")

    async def close(self) -> None:
        self.calls.append("close")


async def test_a_front_end_plugs_in_through_build_app(aiohttp_client: Any, tmp_path: Path) -> None:
    """Routes, job handlers, the deployment subscriber and the lifecycle of a front end."""
    front_end = RecordingFrontEnd()
    made: list[tuple[web.Application, BotContext]] = []

    def factory(app: web.Application, ctx: BotContext) -> RecordingFrontEnd:
        made.append((app, ctx))
        return front_end

    app = build_app(plain_settings(tmp_path), front_ends=[factory], start_worker=False)
    ((called_app, ctx),) = made
    assert called_app is app and ctx is app[CONTEXT]
    assert ctx.front_ends == [front_end]
    client = await aiohttp_client(app)
    assert front_end.calls == ["start"]
    assert (await client.post("/slack/events")).status == 200
    await ctx.require_jobs().enqueue("recording.job", {"n": 1})
    await ctx.require_jobs().drain()
    request = DeploymentRequest(trigger=Trigger.SLACK, requested_by="slack:U1", revision=None)
    assert await ctx.subscribers_for(request) == []
    assert front_end.calls == ["start", "job 1", "subscriber for slack:U1"]
    await client.close()
    assert front_end.calls[-1] == "close"


def test_build_app_imports_no_front_end_that_is_not_configured(tmp_path: Path) -> None:
    """Neither GitHub's nor Slack's modules are loaded unless they are configured."""
    script = (
        "import sys; from pathlib import Path; from bot.app import build_app; "
        "from bot.config import Settings; "
        f"app = build_app(Settings(workdir=Path({str(tmp_path)!r}))); "
        "print(sorted(m for m in sys.modules if m.startswith(('bot.github', 'bot.slack'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


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

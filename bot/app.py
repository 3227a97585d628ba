"""The one aiohttp application of `nixmox serve`: GitHub, Slack (when configured), health, metrics.

`build_app(settings)` returns the application; everything that needs the event loop (store,
HTTP session, GitHub clients, the job worker) is created when it starts and closed when it
stops. Routes:

- `POST /github/webhook` (when GitHub is enabled), `POST /slack/events` (when Slack is)
- `GET /healthz`: 200 when the store answers, 503 otherwise
- `GET /metrics`: Prometheus text format
- `GET /plans/{key}`: a plan the bot posted (commit status `target_url`), HTML or JSON
- `GET /`, `/deployments/{id}` (deploy status `target_url`), `/services/{name}`: the dashboard
  (`bot.dashboard`)

With `NIXMOX_DASHBOARD_PASSWORD` set, every GET page but `/healthz` needs it (`bot.auth`).
"""

from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.auth import setup_dashboard_auth
from bot.config import Settings
from bot.context import CONTEXT, BotContext, Metrics, PlanArchive
from bot.dashboard import setup_dashboard
from bot.jobs import JobWorker
from bot.recovery import start_reporting, start_sweeping, stop_reporting, stop_sweeping
from planner.render import render_json, render_text
from runners.base import utcnow
from runners.config import RunnerConfig
from runners.deploy import DEFAULT_LOCK_LEASE
from runners.store import Store
from state.health import HealthRepository

log = logging.getLogger(__name__)

MAX_BODY = 26 * 1024 * 1024  # GitHub caps webhook payloads at 25 MB
HTTP_TIMEOUT = ClientTimeout(total=60, connect=10)
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f6f8fa;padding:1em}}</style>
</head><body><h1>{title}</h1><pre>{body}</pre></body></html>
"""


def build_app(
    settings: Settings,
    *,
    store: Store | None = None,
    runner_config: RunnerConfig | None = None,
    metrics: Metrics | None = None,
    start_worker: bool = True,
    github_policy: Any = None,
    github_sleeper: Any = None,
    recovery_interval: float | None = None,
    start_monitor: bool = True,
) -> web.Application:
    """The application; `store` is used as given (and not closed), else opened from settings.

    `start_worker=False` leaves queued jobs for the caller (`ctx.jobs.drain()` in tests).
    `github_policy` / `github_sleeper` tune the GitHub client's retries (tests).
    `recovery_interval`: seconds between recovery sweeps (default: the deployment lock lease).
    `start_monitor=False` keeps the health and drift monitor off whatever NIXMOX_MONITOR says.
    """
    ctx = BotContext(
        settings=settings,
        store=store,
        metrics=metrics or Metrics(),
        runner_config=runner_config or RunnerConfig(),
        plans=PlanArchive(settings.workdir / "plans"),
    )
    app = web.Application(client_max_size=MAX_BODY)
    app[CONTEXT] = ctx
    setup_dashboard_auth(app, settings)
    setup_dashboard(app, ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/plans/{key}", plan_page)
    app.cleanup_ctx.append(
        _resources(
            own_store=store is None,
            start_worker=start_worker,
            github_policy=github_policy,
            github_sleeper=github_sleeper,
            recovery_interval=recovery_interval or DEFAULT_LOCK_LEASE.total_seconds(),
        )
    )
    if settings.github_enabled:
        from bot.github import setup_github

        setup_github(app, ctx)
    if settings.slack_enabled:
        from bot.slack import setup_slack  # type: ignore[attr-defined]

        setup_slack(app, ctx)
    if settings.monitor and start_monitor:
        from bot.monitoring import setup_monitoring

        setup_monitoring(app, ctx)
    return app


def _resources(
    *,
    own_store: bool,
    start_worker: bool,
    github_policy: Any,
    github_sleeper: Any,
    recovery_interval: float,
) -> Any:
    """The cleanup context that opens and closes what needs the running loop."""

    async def resources(app: web.Application) -> AsyncIterator[None]:
        ctx = app[CONTEXT]
        settings = ctx.settings
        if ctx.store is None:
            ctx.store = await Store.open(settings.database_url)
        store = ctx.store
        await HealthRepository(store.engine).ensure()  # health and drift tables (state.health)
        started = utcnow()
        interrupted = await store.recover_interrupted()
        for record in interrupted:
            log.warning("deployment %s was left running by a dead process: interrupted", record.id)
        session = ctx.session = ClientSession(timeout=HTTP_TIMEOUT)
        if settings.github_enabled:
            from bot.github.client import GitHubClientFactory
            from bot.github.gitcache import GitCache

            ctx.github = GitHubClientFactory(
                settings, session, policy=github_policy, sleeper=github_sleeper
            )
            ctx.git = GitCache.for_settings(settings)
        jobs = ctx.jobs = JobWorker(store, metrics=ctx.metrics)
        for kind, handler in ctx.job_handlers.items():
            jobs.register(kind, handler)
        if start_worker:
            jobs.start()
        # reported once GitHub and Slack are ready, in the background: the bot serves meanwhile
        report = start_reporting(ctx, interrupted)
        # a crash and restart within the lease left deployments not yet stale: swept later
        sweep = start_sweeping(
            ctx, recovery_interval, started, reported=[record.id for record in interrupted]
        )
        try:
            yield
        finally:
            await stop_sweeping(sweep)
            await stop_reporting(report)
            await jobs.stop()
            await session.close()
            if own_store:
                await store.close()

    return resources


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "") or (
        request.query.get("format") == "json"
    )


def page(title: str, body: str) -> web.Response:
    return web.Response(
        text=PAGE.format(title=html.escape(title), body=html.escape(body)),
        content_type="text/html",
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness and readiness: the store must answer."""
    ctx = request.app[CONTEXT]
    try:
        if ctx.store is None:
            raise RuntimeError("the store is not open")
        await asyncio.wait_for(ctx.store.schema_version(), 5)
    except Exception as exc:
        log.warning("health check: store unavailable: %s", exc)
        return web.json_response({"status": "unavailable", "store": "down"}, status=503)
    return web.json_response({"status": "ok", "store": "up"})


async def metrics_page(request: web.Request) -> web.Response:
    registry = request.app[CONTEXT].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def plan_page(request: web.Request) -> web.Response:
    """A plan the bot posted: text for people, JSON for tools."""
    ctx = request.app[CONTEXT]
    key = request.match_info["key"]
    plan = await asyncio.to_thread(ctx.plans.load, key) if ctx.plans else None
    if plan is None:
        raise web.HTTPNotFound(text=f"no plan {key[:100]}")
    if wants_json(request):
        return web.Response(text=render_json(plan), content_type="application/json")
    return page(f"NixMox plan {key[:12]}", render_text(plan))


def context_of(app: web.Application) -> BotContext:
    """The application's shared context (for front ends and tests)."""
    return app[CONTEXT]


__all__ = ["build_app", "context_of"]

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
Request bodies are limited per route in size, time and bytes received at once (`bot.limits`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.auth import setup_dashboard_auth
from bot.config import Settings
from bot.context import CONTEXT, BotContext
from bot.dashboard import DashboardFrontEnd
from bot.frontend import FrontEnd, add_routes
from bot.jobs import JobWorker
from bot.limits import LIMITS, OTHER_ROUTES_LIMIT, BodyLimits
from bot.metrics import Metrics
from bot.plan_archive import PlanArchive
from bot.planning import Planning
from bot.recovery import start_reporting, start_sweeping, stop_reporting, stop_sweeping
from bot.roles import Role
from planner.escape import html_text
from planner.render import render_json, render_markdown
from runners.config import RunnerConfig
from state.events import utcnow
from state.store import Store

log = logging.getLogger(__name__)

HTTP_TIMEOUT = ClientTimeout(total=60, connect=10)
FrontEndFactory = Callable[[web.Application, BotContext], FrontEnd]
"""Makes a front end for the application and its context (called once by `build_app`)."""
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
    front_ends: Sequence[FrontEndFactory] | None = None,
    start_monitor: bool = True,
    role: Role = Role.ALL,
    plan_in_processes: bool = False,
) -> web.Application:
    """The application; `store` is used as given (and not closed), else opened from settings.

    `start_worker=False` leaves queued jobs for the caller (`ctx.jobs.drain()` in tests).
    `github_policy` / `github_sleeper` tune the GitHub client's retries (tests).
    `recovery_interval`: seconds between recovery sweeps (default: the deployment lock lease).
    `front_ends`: the front ends to plug in (default: the dashboard, then GitHub and Slack
    when configured; the modules of front ends not configured are not imported).
    `start_monitor=False` keeps the health and drift monitor off whatever NIXMOX_MONITOR says.
    `role`: `web` serves the front ends' routes and queues (no job worker, monitor, recovery
    or deployments); `worker` runs all of those and serves only /healthz and /metrics.
    `plan_in_processes`: with roles `all` and `worker`, plan in a process pool, niced by
    `NIXMOX_WORKER_NICE` (`nixmox serve` does; tests plan in threads).
    """
    ctx = BotContext(
        settings=settings,
        store=store,
        metrics=metrics or Metrics(),
        runner_config=runner_config or RunnerConfig(),
        plans=PlanArchive(settings.workdir / "plans"),
    )
    if role.runs_work and plan_in_processes:
        # plans must not hold this process's GIL (it acknowledges webhooks, or holds the
        # store's write lock between jobs), and run at a lower CPU priority (bot.planning)
        ctx.planning = Planning(in_processes=True, cache=ctx.eval_cache, nice=settings.worker_nice)
    limits = BodyLimits(settings.body_bytes_in_flight)
    # first middleware: bodies are limited before anything else looks at a request
    app = web.Application(client_max_size=OTHER_ROUTES_LIMIT, middlewares=[limits.middleware])
    app[CONTEXT] = ctx
    app[LIMITS] = limits
    setup_dashboard_auth(app, settings)
    factories = configured_front_ends(settings) if front_ends is None else front_ends
    for factory in factories:
        register(app, ctx, factory(app, ctx), with_routes=role.answers_webhooks)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/plans/{key}", plan_page)
    app.cleanup_ctx.append(
        _resources(
            own_store=store is None,
            start_worker=start_worker and role.runs_work,
            runs_work=role.runs_work,
            github_policy=github_policy,
            github_sleeper=github_sleeper,
            recovery_interval=recovery_interval or settings.lock_lease.total_seconds(),
        )
    )
    for front_end in ctx.front_ends:
        app.cleanup_ctx.append(lifecycle(front_end))
    if settings.monitor and start_monitor and role.runs_work:
        from bot.monitoring import setup_monitoring

        setup_monitoring(app, ctx)
    return app


def configured_front_ends(settings: Settings) -> list[FrontEndFactory]:
    """The dashboard (first: it owns `/deployments/{id}`), then GitHub and Slack if enabled."""
    factories: list[FrontEndFactory] = [DashboardFrontEnd.create]
    if settings.github_enabled:
        from bot.github import GitHubFrontEnd

        factories.append(GitHubFrontEnd.create)
    if settings.slack_enabled:
        from bot.slack import SlackFrontEnd

        factories.append(SlackFrontEnd.create)
    return factories


def register(
    app: web.Application, ctx: BotContext, front_end: FrontEnd, *, with_routes: bool = True
) -> None:
    """Plug one front end in: routes, job handlers, deployment subscriber, recovery report."""
    ctx.front_ends.append(front_end)
    if with_routes:
        add_routes(app, front_end, app[LIMITS])
    for kind, handler in front_end.job_handlers().items():
        if kind in ctx.job_handlers:
            raise ValueError(f"two front ends handle job kind {kind!r}")
        ctx.job_handlers[kind] = handler
    ctx.subscriber_factories.append(front_end.subscriber_for)


def lifecycle(front_end: FrontEnd) -> Callable[[web.Application], AsyncIterator[None]]:
    """Start a front end once the shared resources are up; close it before they go."""

    async def run(_: web.Application) -> AsyncIterator[None]:
        await front_end.start()
        try:
            yield
        finally:
            await front_end.close()

    return run


def _resources(
    *,
    own_store: bool,
    start_worker: bool,
    runs_work: bool,
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
        started = utcnow()
        # only processes that run deployments recover them (a web has none of its own)
        interrupted = await store.deployments.recover_interrupted() if runs_work else []
        for record in interrupted:
            log.warning("deployment %s was left running by a dead process: interrupted", record.id)
        ctx.planning.start()
        session = ctx.session = ClientSession(timeout=HTTP_TIMEOUT)
        if settings.github_enabled:
            from bot.github.client import GitHubClientFactory

            ctx.github = GitHubClientFactory(
                settings, session, policy=github_policy, sleeper=github_sleeper
            )
        if settings.github_enabled or settings.git_remote:
            from bot.gitcache import GitCache

            ctx.git = GitCache.for_settings(settings)  # one cache: front ends and the monitor
        jobs = ctx.jobs = JobWorker(store, metrics=ctx.metrics)
        for kind, handler in ctx.job_handlers.items():
            jobs.register(kind, handler)
        if start_worker:
            jobs.start()
        # reported once GitHub and Slack are ready, in the background: the bot serves meanwhile
        report = start_reporting(ctx, interrupted)
        # a crash and restart within the lease left deployments not yet stale: swept later
        sweep = (
            start_sweeping(
                ctx, recovery_interval, started, reported=[record.id for record in interrupted]
            )
            if runs_work
            else None
        )
        try:
            yield
        finally:
            await stop_sweeping(sweep)
            await stop_reporting(report)
            await jobs.stop()
            await session.close()
            ctx.planning.close()
            if own_store:
                await store.close()

    return resources


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "") or (
        request.query.get("format") == "json"
    )


def page(title: str, body: str) -> web.Response:
    return web.Response(
        text=PAGE.format(title=html_text(title), body=html_text(body)),
        content_type="text/html",
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness and readiness: the store must answer."""
    ctx = request.app[CONTEXT]
    try:
        if ctx.store is None:
            raise RuntimeError("the store is not open")
        await asyncio.wait_for(ctx.store.schema_revision(), 5)
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
    """A plan the bot posted: its Markdown (what a PR comment shows) for people, JSON for
    tools, the raw Markdown with `?format=markdown`."""
    ctx = request.app[CONTEXT]
    key = request.match_info["key"]
    plan = await asyncio.to_thread(ctx.plans.load, key) if ctx.plans else None
    if plan is None:
        raise web.HTTPNotFound(text=f"no plan {key[:100]}")
    if wants_json(request):
        return web.Response(text=render_json(plan), content_type="application/json")
    markdown = "\n\n".join(render_markdown(plan))
    if request.query.get("format") == "markdown":
        return web.Response(text=markdown, content_type="text/markdown")
    return page(f"NixMox plan {key[:12]}", markdown)


def context_of(app: web.Application) -> BotContext:
    """The application's shared context (for front ends and tests)."""
    return app[CONTEXT]


__all__ = ["build_app", "context_of"]

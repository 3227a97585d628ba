"""The dashboard of `nixmox serve`: server-rendered HTML pages of the state store.

`setup_dashboard(app, ctx)` adds:

- `GET /`: every service (deployed revision, health, system, lock), the running deployments with
  their progress and the last deployments; refreshes itself every few seconds
- `GET /deployments/{id}`: one deployment, its plan summary, steps and their output, rollback
  (the `target_url` of `nixmox/deploy`; `?format=json` or `Accept: application/json` for JSON)
- `GET /services/{name}`: one service, its latest health check and health history (the
  monitor's transitions, `nixmox health` runs), and the deployments that touched it
- on `/`, a drift section: hosts running another system than deployed, undeployed commits,
  terraform roots with changes (`deployments.drift`, found by the monitor)

No JavaScript. Every value from the store goes through `planner.escape.html_text` (step output holds whatever
a command printed); markup this module builds itself is marked `Html` so it is not escaped twice.
Nothing from the settings is shown: no tokens, secrets or database address.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from urllib.parse import quote

from aiohttp import web

from bot.context import CONTEXT, BotContext
from bot.frontend import BaseFrontEnd, Method, Route
from planner.escape import html_text
from planner.render import short_rev, summary
from state.deployments import ACTIVE_STATES, DeploymentRecord, StepRecord
from state.events import DeploymentKind, DeploymentState, StepState
from state.health import DriftRecord, HealthCheck
from state.locks import LockRecord
from state.services import ServiceRecord

log = logging.getLogger(__name__)

RECENT = 20  # deployments listed on the overview
SERVICE_HISTORY = 50  # deployments listed on a service's page
REFRESH_SECONDS = 10
MAX_ID = 100  # longer path parameters cannot name anything and are not echoed in full
NONE = "–"
NOT_FOUND = "Not found"
STORE_DOWN = "The state store does not answer; try again in a moment."
NO_DEPLOYMENT = "There is no deployment {id}."
NO_SERVICE = "No service {name} has been deployed, checked or locked."
NOTHING_RUNNING = "Nothing is running."
NO_DEPLOYMENTS = "No deployments yet."
NO_SERVICES = "No service has been deployed yet."
NO_DRIFT = "No drift found: hosts run what was deployed, nothing is pending."
NO_HEALTH_HISTORY = "No health check recorded yet."
HEALTH_HISTORY = 50  # checks and transitions listed on a service's page
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#1f2328}
a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border-bottom:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}code,pre{font-family:ui-monospace,monospace;font-size:.9em}
pre{background:#f6f8fa;padding:.6em;max-height:30em;overflow:auto;white-space:pre-wrap}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}
.state{padding:.1em .4em;border-radius:.3em;background:#eaeef2}
.succeeded,.healthy{background:#dafbe1}.failed,.unhealthy,.interrupted{background:#ffebe9}
.running,.queued{background:#ddf4ff}.rolled_back,.skipped{background:#fff8c5}
nav a{margin-right:1em}
"""


class Html(str):
    """Markup built by this module: trusted, inserted as is."""


def esc(value: object) -> Html:
    """A value as HTML text: markup is kept, anything else escaped; None is a dash."""
    if isinstance(value, Html):
        return value
    if value is None or value == "":
        return Html(NONE)
    return Html(html_text(str(value)))


def join(parts: Iterable[object], separator: str = "") -> Html:
    return Html(html_text(separator).join(esc(part) for part in parts))


def link(href: str, text: object) -> Html:
    return Html(f'<a href="{html_text(href)}">{esc(text)}</a>')


def code(text: object) -> Html:
    return Html(f"<code>{esc(text)}</code>")


def badge(state: object) -> Html:
    """A state or health word, coloured by its value."""
    word = str(state) if state else "unknown"
    return Html(f'<span class="state {html_text(word)}">{html_text(word)}</span>')


def table(headers: list[str], rows: Iterable[Iterable[object]], empty: str) -> Html:
    """A table of escaped cells, or the `empty` sentence when there are no rows."""
    body = ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows]
    if not body:
        return Html(f"<p>{esc(empty)}</p>")
    head = "".join(f"<th>{esc(header)}</th>" for header in headers)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def facts(items: Iterable[tuple[str, object]]) -> Html:
    """A definition list of (label, value) pairs."""
    body = "".join(f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>" for label, value in items)
    return Html(f"<dl>{body}</dl>")


def section(title: str, content: Html) -> Html:
    return Html(f"<h2>{esc(title)}</h2>{content}")


def document(title: str, body: Iterable[Html], *, refresh: bool = False) -> str:
    """A whole page; `refresh` makes the browser reload it every REFRESH_SECONDS."""
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"{meta}<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
        f"<nav>{link('/', 'NixMox dashboard')}</nav><h1>{esc(title)}</h1>"
        f"{''.join(body)}</body></html>\n"
    )


def html_response(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html")


def not_found(message: str) -> web.Response:
    return html_response(document(NOT_FOUND, [Html(f"<p>{esc(message)}</p>")]), status=404)


# --- formatting of recorded values -----------------------------------------------------------


def when(moment: datetime | None) -> Html:
    return esc(moment.strftime(TIME_FORMAT) if moment else None)


def duration(start: datetime | None, end: datetime | None) -> str | None:
    """`1m 05s` between two moments (None when either is unknown)."""
    if start is None or end is None:
        return None
    seconds = max((end - start).total_seconds(), 0.0)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m {rest:02d}s"


def revision(rev: str | None) -> Html:
    return code(short_rev(rev)) if rev else esc(None)


def revisions(record: DeploymentRecord) -> Html:
    """`base → head`, or only the head of a first deployment."""
    if record.base is None:
        return revision(record.head)
    return join([revision(record.base), revision(record.head)], " → ")


def deployment_link(deployment_id: str | None) -> Html:
    if not deployment_id:
        return esc(None)
    return link(f"/deployments/{quote(deployment_id, safe='')}", code(deployment_id))


def service_link(name: str) -> Html:
    return link(f"/services/{quote(name, safe='')}", name)


def lock_text(lock: LockRecord | None) -> Html:
    """Who holds a lock and why; a lock without a lease is a manual one."""
    if lock is None:
        return esc(None)
    kind = "manual lock" if lock.expires_at is None else "deploying"
    reason = f": {lock.reason}" if lock.reason else ""
    return esc(f"{lock.holder} ({kind}{reason}, since {lock.acquired_at.strftime(TIME_FORMAT)})")


def progress(record: DeploymentRecord) -> Html:
    """A progress bar of finished steps, and the steps running now."""
    done = sum(step.state not in (StepState.PENDING, StepState.RUNNING) for step in record.steps)
    total = len(record.steps)
    running = [step.id for step in record.steps if step.state is StepState.RUNNING]
    now = join([code(step) for step in running], ", ") if running else esc("waiting")
    return Html(
        f'<progress value="{done}" max="{max(total, 1)}"></progress> '
        f"{done}/{total} steps finished; running: {now}"
    )


# --- page bodies -----------------------------------------------------------------------------

DEPLOYMENT_HEADERS = [
    "deployment",
    "kind",
    "trigger",
    "requested by",
    "approved by",
    "state",
    "revisions",
    "services",
    "started",
    "finished",
    "took",
]


def deployment_row(record: DeploymentRecord) -> list[object]:
    return [
        deployment_link(record.id),
        record.kind.value,
        record.trigger,
        record.requested_by,
        record.approved_by,
        badge(record.state.value),
        revisions(record),
        join([service_link(name) for name in record.services], ", ") or esc(None),
        when(record.started_at or record.created_at),
        when(record.finished_at),
        duration(record.started_at, record.finished_at),
    ]


def deployments_table(records: Iterable[DeploymentRecord]) -> Html:
    return table(DEPLOYMENT_HEADERS, (deployment_row(r) for r in records), NO_DEPLOYMENTS)


def services_table(services: dict[str, ServiceRecord], locks: dict[str, LockRecord]) -> Html:
    rows = [
        [
            service_link(name),
            revision(record.revision),
            badge(record.last_health),
            when(record.health_at),
            code(record.system_path) if record.system_path else esc(None),
            deployment_link(record.last_deployment_id),
            lock_text(locks.get(name)),
        ]
        for name, record in services.items()
    ]
    headers = ["service", "revision", "health", "checked", "system", "last deployment", "lock"]
    return table(headers, rows, NO_SERVICES)


def other_locks(services: dict[str, ServiceRecord], locks: dict[str, LockRecord]) -> Html:
    """Locks on names that are not deployed services (global terraform roots, new services)."""
    rows = [[code(name), lock_text(lock)] for name, lock in locks.items() if name not in services]
    return section("Other locks", table(["name", "lock"], rows, "")) if rows else Html("")


def running_list(records: list[DeploymentRecord]) -> Html:
    rows = [
        [deployment_link(r.id), r.kind.value, r.trigger, r.requested_by, progress(r)]
        for r in records
    ]
    headers = ["deployment", "kind", "trigger", "requested by", "progress"]
    return table(headers, rows, NOTHING_RUNNING)


def rollback_info(record: DeploymentRecord) -> Html:
    """What was rolled back and to which system (empty when nothing was)."""
    lines: list[str] = []
    if record.kind is DeploymentKind.ROLLBACK:
        lines.append("This deployment rolled services back to an earlier state.")
    rolled = [step for step in record.steps if step.state is StepState.ROLLED_BACK]
    # the store's reason of a rolled-back step names the service and the system it went back to
    lines.extend(step.reason or f"rolled back after {step.id} failed" for step in rolled)
    if record.state is DeploymentState.ROLLED_BACK and not rolled:
        lines.append("The deployment ended rolled back.")
    if not lines:
        return Html("")
    items = "".join(f"<li>{esc(line)}</li>" for line in lines)
    return section("Rollback", Html(f"<ul>{items}</ul>"))


def step_output(step: StepRecord) -> Html:
    """The step's output (redacted by the runners) in a collapsible block; failures open."""
    if not step.output:
        return esc(None)
    opened = " open" if step.state in (StepState.FAILED, StepState.ROLLED_BACK) else ""
    lines = step.output.count("\n") + (not step.output.endswith("\n"))
    return Html(
        f"<details{opened}><summary>{lines} line{'s' if lines != 1 else ''}</summary>"
        f"<pre>{esc(step.output)}</pre></details>"
    )


def steps_table(record: DeploymentRecord) -> Html:
    rows = [
        [
            code(step.id),
            step.phase,
            service_link(step.service) if step.service else esc(None),
            badge(step.state.value),
            step.attempt or None,
            when(step.started_at),
            when(step.finished_at),
            step.reason,
            step_output(step),
        ]
        for step in record.steps
    ]
    headers = ["step", "phase", "service", "state", "attempt", "started", "finished", "reason"]
    return table([*headers, "output"], rows, "This deployment has no steps.")


def deployment_facts(record: DeploymentRecord) -> Html:
    return facts(
        [
            ("plan", summary(record.plan)),
            ("kind", record.kind.value),
            ("state", badge(record.state.value)),
            ("trigger", record.trigger),
            ("requested by", record.requested_by),
            ("approved by", record.approved_by),
            ("revisions", revisions(record)),
            ("scope", record.scope or ("all services" if record.steps else None)),
            ("plan digest", code(short_rev(record.digest)) if record.digest else None),
            ("created", when(record.created_at)),
            ("started", when(record.started_at)),
            ("finished", when(record.finished_at)),
            ("took", duration(record.started_at, record.finished_at)),
            ("note", record.note),
        ]
    )


# --- handlers --------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def store_guarded(handler: Handler) -> Handler:
    """A page whose store is unreachable says so (503) instead of failing with a 500."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("dashboard page %s failed", request.path)
            body = [Html(f"<p>{esc(STORE_DOWN)}</p>")]
            return html_response(document("Unavailable", body), status=503)

    return guarded


def context(request: web.Request) -> BotContext:
    return request.app[CONTEXT]


def wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "") or (
        request.query.get("format") == "json"
    )


def health_state(healthy: bool) -> str:
    return "healthy" if healthy else "unhealthy"


def drift_table(found: list[DriftRecord]) -> Html:
    rows = [
        [
            service_link(record.subject) if record.kind == "system" else code(record.subject),
            esc(record.kind),
            code(record.expected) if record.expected else esc(None),
            code(record.actual) if record.actual else esc(None),
            code(record.detail) if record.detail else esc(None),
            when(record.first_seen),
        ]
        for record in found
    ]
    headers = ["where", "kind", "expected", "actual", "detail", "since"]
    return table(headers, rows, NO_DRIFT)


def latest_check(check: HealthCheck | None) -> Html | None:
    """`unhealthy: liveness at <time> (since <time>)` for a service's facts."""
    if check is None:
        return None
    since = Html(f" (since {when(check.since)})") if check.since else Html("")
    return Html(
        f"{badge(health_state(check.healthy))} {esc(check.check)} at {when(check.checked_at)}"
        f"{since}"
    )


def health_history_table(checks: list[HealthCheck]) -> Html:
    rows = [
        [
            when(check.checked_at),
            badge(health_state(check.healthy)),
            esc(check.check),
            esc(check.source + (" (transition)" if check.transition else "")),
            code(check.output.splitlines()[-1]) if check.output.strip() else esc(None),
        ]
        for check in checks
    ]
    return table(["when", "health", "check", "by", "last output line"], rows, NO_HEALTH_HISTORY)


@store_guarded
async def overview(request: web.Request) -> web.StreamResponse:
    """Every service, what runs now and the last deployments."""
    store = context(request).require_store()
    services = await store.services.all()
    locks = {lock.service: lock for lock in await store.locks.all()}
    recent = await store.deployments.history(limit=RECENT)
    running = [record for record in recent if record.state in ACTIVE_STATES]
    body = [
        section("Services", services_table(services, locks)),
        other_locks(services, locks),
        section("Running", running_list(running)),
        section(f"Last {RECENT} deployments", deployments_table(recent)),
        section("Drift", drift_table(await store.health.active_drift())),
    ]
    return html_response(document("NixMox", body, refresh=True))


@store_guarded
async def deployment_detail(request: web.Request) -> web.StreamResponse:
    """One deployment: summary, rollback and every step with its output (or JSON)."""
    deployment_id = request.match_info["deployment_id"][:MAX_ID]
    record = await context(request).require_store().deployments.get(deployment_id)
    if record is None:
        if wants_json(request):
            return web.json_response({"error": f"no deployment {deployment_id}"}, status=404)
        return not_found(NO_DEPLOYMENT.format(id=deployment_id))
    if wants_json(request):
        return web.json_response(record.to_detail())
    body = [deployment_facts(record), rollback_info(record), section("Steps", steps_table(record))]
    active = record.state in ACTIVE_STATES
    return html_response(document(f"Deployment {record.id}", body, refresh=active))


@store_guarded
async def service_page(request: web.Request) -> web.StreamResponse:
    """One service's state, lock and deployment history."""
    name = request.match_info["name"][:MAX_ID]
    store = context(request).require_store()
    record = (await store.services.all()).get(name)
    lock = next((lock for lock in await store.locks.all() if lock.service == name), None)
    history = await store.deployments.history(service=name, limit=SERVICE_HISTORY)
    health = store.health
    checks = await health.history(name, limit=HEALTH_HISTORY)
    if record is None and lock is None and not history and not checks:
        return not_found(NO_SERVICE.format(name=name))
    latest = (await health.latest()).get(name)
    record = record or ServiceRecord(name=name)
    state = facts(
        [
            ("revision", revision(record.revision)),
            ("health", badge(record.last_health)),
            ("checked", when(record.health_at)),
            ("latest check", latest_check(latest)),
            ("system", code(record.system_path) if record.system_path else None),
            ("previous system", code(record.previous_system) if record.previous_system else None),
            ("last deployment", deployment_link(record.last_deployment_id)),
            ("lock", lock_text(lock)),
        ]
    )
    body = [
        state,
        section("Health history", health_history_table(checks)),
        section("Deployments", deployments_table(history)),
    ]
    return html_response(document(f"Service {name}", body))


class DashboardFrontEnd(BaseFrontEnd):
    """The dashboard pages (registered before any other `/deployments/{id}` route)."""

    name = "dashboard"

    @classmethod
    def create(cls, app: web.Application, ctx: BotContext) -> DashboardFrontEnd:
        return cls()

    def routes(self) -> Sequence[Route]:
        return (
            Route(Method.GET, "/", overview, name="dashboard"),
            Route(Method.GET, "/deployments/{deployment_id}", deployment_detail),
            Route(Method.GET, "/services/{name}", service_page),
        )


__all__ = ["DashboardFrontEnd"]

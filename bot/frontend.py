"""The one typed interface through which a front end (GitHub, Slack, the dashboard) joins the
application `bot.app.build_app` makes: its routes, its job handlers, its subscriber to every
deployment's events, its report of deployments a dead process left interrupted, and its
start and stop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from bot.jobs import JobHandler
from bot.limits import BodyLimits, BodyRule
from bot.request import DeploymentRequest
from state.deployments import DeploymentRecord
from state.events import Subscriber

if TYPE_CHECKING:
    from deployments.monitor import MonitorListener

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    """One HTTP route a front end serves."""

    method: Method
    path: str
    handler: Handler
    name: str | None = None
    # a webhook's own body size and time limits (others get `bot.limits.OTHER_ROUTES_LIMIT`)
    body: BodyRule | None = None


class Method(StrEnum):
    """The HTTP methods a front end's routes answer."""

    GET = "GET"
    POST = "POST"


class FrontEnd(Protocol):
    """A part of the bot that talks to people; registered once, in `build_app`."""

    @property
    def name(self) -> str:
        """Its name in logs and in the audit of an interrupted-deployment report."""
        ...

    def routes(self) -> Sequence[Route]: ...

    def job_handlers(self) -> Mapping[str, JobHandler]: ...

    async def subscriber_for(self, request: DeploymentRequest) -> Subscriber | None:
        """The subscriber reporting one deployment here (None: nothing to report)."""
        ...

    async def report_interrupted(self, record: DeploymentRecord) -> dict[str, Any] | None:
        """Report a deployment a dead process left interrupted; what was done (None: not
        reported here)."""
        ...

    def monitor_listener(self) -> MonitorListener | None:
        """Who hears about health transitions and drift here (None: nobody)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class BaseFrontEnd:
    """Defaults for the parts of `FrontEnd` a front end does not need."""

    name = "front end"

    def routes(self) -> Sequence[Route]:
        return ()

    def job_handlers(self) -> Mapping[str, JobHandler]:
        return {}

    async def subscriber_for(self, request: DeploymentRequest) -> Subscriber | None:
        return None

    async def report_interrupted(self, record: DeploymentRecord) -> dict[str, Any] | None:
        return None

    def monitor_listener(self) -> MonitorListener | None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def add_routes(app: web.Application, front_end: FrontEnd, limits: BodyLimits) -> None:
    """Mount a front end's routes on the application, with their body limits."""
    for route in front_end.routes():
        app.router.add_route(str(route.method), route.path, route.handler, name=route.name)
        if route.body is not None:
            limits.add(route.path, route.body)

"""HTTP Basic authentication of the bot's pages (dashboard, plans, metrics).

The pages share the listener with the webhooks, which GitHub and Slack must reach, and show
service addresses, step output, lock holders and who deployed what. With
`NIXMOX_DASHBOARD_PASSWORD` set, every GET (and HEAD) request except `/healthz` needs the user
`nixmox` and that password. Other methods are the webhooks (`POST /github/webhook`,
`POST /slack/events`): they are never asked for a password, each checks its own signature.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import SecretStr

from bot.config import Settings

log = logging.getLogger(__name__)

DASHBOARD_USER = "nixmox"
REALM = "nixmox"
PUBLIC_PATHS = frozenset({"/healthz"})  # load balancers and probes carry no credentials
PAGE_METHODS = frozenset({"GET", "HEAD"})
CHALLENGE = {"WWW-Authenticate": f'Basic realm="{REALM}"'}
UNAUTHORIZED = "Authentication required."
OPEN_DASHBOARD_WARNING = (
    "NIXMOX_DASHBOARD_PASSWORD is not set: the dashboard, plans and metrics are readable by "
    "anyone who can reach this port; set it, or bind to a private address"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def needs_password(request: web.Request) -> bool:
    """Whether a request is for a page (not a webhook, not the health check)."""
    return request.method in PAGE_METHODS and request.path not in PUBLIC_PATHS


def basic_credentials(header: str) -> tuple[bytes, bytes] | None:
    """User and password of an `Authorization: Basic …` header; None when it is not one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def credentials_match(header: str, password: SecretStr) -> bool:
    """Constant-time check of the header against `nixmox` and the password."""
    given = basic_credentials(header) or (b"", b"")
    # both compared every time, so the timing does not tell which one was wrong
    user_ok = hmac.compare_digest(given[0], DASHBOARD_USER.encode())
    password_ok = hmac.compare_digest(given[1], password.get_secret_value().encode())
    return user_ok and password_ok


def basic_auth_middleware(password: SecretStr) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware answering 401 with a Basic challenge to page requests without the password."""

    @web.middleware
    async def require_password(request: web.Request, handler: Handler) -> web.StreamResponse:
        if needs_password(request) and not credentials_match(
            request.headers.get("Authorization", ""), password
        ):
            return web.Response(status=401, text=UNAUTHORIZED, headers=CHALLENGE)
        return await handler(request)

    return require_password


async def _warn_open_dashboard(app: web.Application) -> None:
    log.warning(OPEN_DASHBOARD_WARNING)


def setup_dashboard_auth(app: web.Application, settings: Settings) -> None:
    """Protect the pages when a password is set; otherwise warn once when the app starts."""
    password = settings.dashboard_password
    if password is not None and password.get_secret_value():
        app.middlewares.append(basic_auth_middleware(password))
    else:
        app.on_startup.append(_warn_open_dashboard)


__all__ = ["DASHBOARD_USER", "basic_auth_middleware", "setup_dashboard_auth"]

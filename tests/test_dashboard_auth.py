"""`NIXMOX_DASHBOARD_PASSWORD`: Basic auth of the pages, never of the health check or webhooks."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pytest

from bot.app import build_app
from bot.auth import DASHBOARD_USER, OPEN_DASHBOARD_WARNING
from bot.config import Settings, load_settings
from bot.context import CONTEXT
from planner.plan import Plan, Step
from tests.fixtures_github import Payloads

PASSWORD = "dashboard-pw-never-shown-7f3a"
PAGES = ["/", "/deployments/x", "/services/x", "/plans/x", "/metrics"]


def basic(user: str, password: str) -> dict[str, str]:
    """The `Authorization` header a browser sends after the Basic prompt."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


RIGHT = basic(DASHBOARD_USER, PASSWORD)
WRONG = [
    {},
    basic(DASHBOARD_USER, "not-the-password"),
    basic("admin", PASSWORD),
    basic(DASHBOARD_USER, PASSWORD + "x"),
    basic(DASHBOARD_USER, ""),
    {"Authorization": "Bearer " + PASSWORD},
    {"Authorization": "Basic !!not-base64!!"},
    {"Authorization": "Basic bm9jb2xvbg=="},  # "nocolon"
]


def settings_for(tmp_path: Path, **values: Any) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        workdir=tmp_path / "work",
        **values,
    )


def saved_plan(app: Any) -> str:
    """A plan in the app's archive; its key names a page that exists."""
    step = Step(id="verify:gitea", phase="verify", service="gitea")
    return app[CONTEXT].plans.save(Plan(steps=[step], waves=[[step.id]], digest="ab" * 32))


async def test_without_a_password_pages_are_open_and_a_warning_is_logged(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="bot.auth")
    app = build_app(settings_for(tmp_path))
    client = await aiohttp_client(app)
    key = saved_plan(app)
    for path in ["/", "/metrics", f"/plans/{key}"]:
        assert (await client.get(path)).status == 200, path
    assert (await client.get("/deployments/x")).status == 404
    warnings = [r for r in caplog.records if r.getMessage() == OPEN_DASHBOARD_WARNING]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


async def test_the_password_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIXMOX_DASHBOARD_PASSWORD", PASSWORD)
    settings = load_settings()
    assert settings.dashboard_password is not None
    assert settings.dashboard_password.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings) and PASSWORD not in str(settings.model_dump())


@pytest.mark.parametrize("path", PAGES)
async def test_pages_without_or_with_wrong_credentials_get_401(
    aiohttp_client: Any, tmp_path: Path, path: str
) -> None:
    client = await aiohttp_client(build_app(settings_for(tmp_path, dashboard_password=PASSWORD)))
    for headers in WRONG:
        response = await client.get(path, headers=headers)
        assert response.status == 401, (path, headers)
        assert response.headers["WWW-Authenticate"] == 'Basic realm="nixmox"'
        assert PASSWORD not in await response.text()
    head = await client.head(path)
    assert head.status == 401


async def test_pages_with_the_right_credentials_are_served(
    aiohttp_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app = build_app(settings_for(tmp_path, dashboard_password=PASSWORD))
    client = await aiohttp_client(app)
    key = saved_plan(app)
    for path in ["/", "/metrics", f"/plans/{key}"]:
        response = await client.get(path, headers=RIGHT)
        assert response.status == 200, path
        assert PASSWORD not in await response.text()
    # past the password, missing things are the pages' own 404s
    assert (await client.get("/deployments/x", headers=RIGHT)).status == 404
    assert (await client.get("/services/x", headers=RIGHT)).status == 404
    assert (await client.get("/plans/" + "cd" * 32, headers=RIGHT)).status == 404
    assert OPEN_DASHBOARD_WARNING not in caplog.text
    assert PASSWORD not in caplog.text


async def test_healthz_needs_no_credentials(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(build_app(settings_for(tmp_path, dashboard_password=PASSWORD)))
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "store": "up"}


async def test_a_signed_github_ping_needs_no_credentials(
    make_bot: Any, payloads: Payloads, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bot = await make_bot(dashboard_password=PASSWORD)
    response = await bot.deliver("ping", payloads.ping())
    assert response.status == 200
    assert (await response.json())["status"] == "pong"
    # the webhook's own signature check still answers forgeries, not the password
    forged = await bot.deliver("ping", payloads.ping(), secret="wrong")
    assert forged.status == 401
    assert "WWW-Authenticate" not in forged.headers
    assert (await bot.client.get("/")).status == 401
    assert PASSWORD not in caplog.text

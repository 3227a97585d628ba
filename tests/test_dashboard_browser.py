"""The dashboard rendered by headless Chromium, served by the real app over a real simulated deploy."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import git
import pytest
from aiohttp import web

from bot.app import build_app
from bot.config import Settings
from state.events import DeploymentState, StepState
from state.store import Store
from tests.test_dashboard import FAILING_VERIFY, SECRET, cells, deploy, section

CHROMIUM_TIMEOUT = 60.0
CHROMIUM_MISSING = "chromium missing: run ./dev test"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# flags that let Chromium run headless as root with no network beyond the page it loads
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


def chromium_binary() -> str:
    """The Chromium executable; the test fails (not skips) when it is not installed."""
    found = shutil.which("chromium")
    if found:
        return found
    if Path("/usr/bin/chromium").exists():
        return "/usr/bin/chromium"
    pytest.fail(CHROMIUM_MISSING)


async def chromium(url: str, profile: Path, *extra: str) -> str:
    """Run headless Chromium on `url` and return its stdout (the server keeps serving meanwhile)."""
    profile.mkdir(parents=True)
    process = await asyncio.create_subprocess_exec(
        chromium_binary(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        *extra,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CHROMIUM_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"chromium did not finish {url} within {CHROMIUM_TIMEOUT} s")
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    return stdout.decode()


@pytest.fixture
async def base_url(store: Store, tmp_path: Path) -> AsyncIterator[str]:
    """The real app served on a free 127.0.0.1 port."""
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/state.db",
        workdir=tmp_path / "bot",
        github_webhook_secret=SECRET,
    )
    runner = web.AppRunner(
        build_app(settings, store=store, start_worker=False, start_monitor=False)
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def test_overview_renders_service_rows_and_deployments_in_chromium(
    base_url: str, store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    record = await deploy(store, repo, tmp_path, runner_config=FAILING_VERIFY)
    assert record.state is DeploymentState.ROLLED_BACK
    services = await store.services.all()
    assert services

    dom = await chromium(f"{base_url}/", tmp_path / "profile-dom", "--dump-dom")
    assert "<h2>Last 20 deployments</h2>" in dom
    for name, service in services.items():
        row = cells(dom, f'href="/services/{name}"')
        assert row[0] == name and service.system_path in row
    assert cells(dom, 'href="/services/postgresql"')[1:3] == [record.head[:12], "healthy"]
    assert cells(dom, 'href="/services/gitea"')[1] == "–"  # rolled back: not at the new head
    deployment = cells(section(dom, "Last 20 deployments"), record.id)
    assert deployment[5] == "rolled_back" and deployment[6] == record.head[:12]
    assert SECRET not in dom

    shot = tmp_path / "overview.png"
    await chromium(f"{base_url}/", tmp_path / "profile-shot", f"--screenshot={shot}")
    assert shot.read_bytes().startswith(PNG_SIGNATURE)
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank frame


async def test_deployment_page_renders_every_step_state_in_chromium(
    base_url: str, store: Store, repo: git.Repo, tmp_path: Path
) -> None:
    record = await deploy(store, repo, tmp_path, runner_config=FAILING_VERIFY)
    url = f"{base_url}/deployments/{record.id}"

    dom = await chromium(url, tmp_path / "profile", "--dump-dom")
    assert "<h2>Rollback</h2>" in dom
    assert {step.state for step in record.steps} >= {StepState.SUCCEEDED, StepState.ROLLED_BACK}
    for step in record.steps:
        row = cells(dom, f"<code>{step.id}</code>")
        assert row[3] == step.state.value and row[4] == str(step.attempt)
    assert "simulated failure of verify:gitea" in cells(dom, "<code>verify:gitea</code>")[-1]
    assert '<details open="">' in dom  # the failed step's output is unfolded in the browser too

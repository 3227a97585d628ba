"""The monitor: liveness checks between deployments on emulated hosts (local transport),
transitions after `retries` failures, no check during a deployment, alert reminders at most once
per `alert_repeat`; and `nixmox serve` checking every half second posting to the fake Slack
while `/metrics` shows `nixmox_service_up` go 0 then 1."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from bot.app import build_app
from bot.config import Settings
from bot.context import CONTEXT
from bot.slack import SLACK_BOT
from deployments import ExecutionOptions, GitSource, plan_for_deploy, start_deployment
from deployments.drift import DriftReport
from deployments.health import deployed_manifest
from deployments.monitor import ChangeKind, HealthChange, Monitor, MonitorOptions
from planner.models import Manifest
from runners.config import RunnerConfig, SimulateConfig
from runners.registry import RunnerKind, build_runners
from state.health import DriftRecord
from state.store import Store
from tests.fakes.slack import FakeSlack, Message
from tests.fixtures_github import ManifestRepo
from tests.fixtures_slack import (
    APPROVER,
    CHANNEL,
    PROGRESS_INTERVAL,
    REQUESTER,
    SlackDriver,
    slack_process_env,
    slack_settings,
)
from tests.homelab import Homelab
from tests.test_serve import Server


@dataclass
class Heard:
    """A listener that keeps what the monitor told it."""

    changes: list[HealthChange] = field(default_factory=list)
    ups: list[tuple[str, bool | None]] = field(default_factory=list)
    drifts: list[tuple[list[DriftRecord], list[DriftRecord]]] = field(default_factory=list)

    async def checked(self, service: str, up: bool | None, at: datetime) -> None:
        self.ups.append((service, up))

    async def health_changed(self, change: HealthChange) -> None:
        self.changes.append(change)

    async def drift_changed(
        self, new: list[DriftRecord], cleared: list[DriftRecord], report: DriftReport
    ) -> None:
        self.drifts.append((new, cleared))


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=datetime.now().astimezone().tzinfo)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


async def open_monitor(lab: Homelab, heard: Heard, clock: Clock) -> tuple[Store, Monitor]:
    store = await Store.open(f"sqlite+aiosqlite:///{lab.root / 'state.db'}")
    config = RunnerConfig.from_toml(lab.config)
    monitor = Monitor(
        store,
        build_runners(RunnerKind.REAL, config),
        config,
        heard,
        MonitorOptions(alert_repeat=timedelta(minutes=30), drift=False),
        clock=clock,
    )
    return store, monitor


@asynccontextmanager
async def monitored(
    tmp_path: Path, **lab_options: Any
) -> AsyncIterator[tuple[Homelab, Heard, Clock, Store, Monitor, Manifest]]:
    """A deployed homelab, its store and a monitor on it, with the deployed manifest; closed after."""
    lab = Homelab(tmp_path, **lab_options)
    await asyncio.to_thread(lab.deploy)
    heard, clock = Heard(), Clock()
    store, monitor = await open_monitor(lab, heard, clock)
    try:
        manifest = await deployed_manifest(store)
        assert manifest is not None
        yield lab, heard, clock, store, monitor, manifest
    finally:
        await monitor.runners.close()
        await store.close()


def kinds(heard: Heard) -> list[tuple[str, ChangeKind]]:
    return [(change.check.service, change.kind) for change in heard.changes]


async def test_unhealthy_after_retries_failures_healthy_on_the_first_success(
    tmp_path: Path,
) -> None:
    async with monitored(tmp_path, retries=3) as (lab, heard, _clock, store, monitor, manifest):
        assert await monitor.check("gitea", manifest) is None  # healthy: the first state
        lab.set_up("gitea", False)
        assert await monitor.check("gitea", manifest) is None
        assert await monitor.check("gitea", manifest) is None
        down = await monitor.check("gitea", manifest)
        assert down is not None and down.kind is ChangeKind.DOWN and down.failures == 3
        assert down.check.check == "liveness"
        for _ in range(5):  # still failing: no alert storm
            assert await monitor.check("gitea", manifest) is None
        lab.set_up("gitea", True)
        up = await monitor.check("gitea", manifest)
        assert up is not None and up.kind is ChangeKind.UP and up.since == down.since
        assert kinds(heard) == [("gitea", ChangeKind.DOWN), ("gitea", ChangeKind.UP)]
        history = await store.health.history("gitea")
        assert [(h.healthy, h.transition) for h in history] == [
            (True, True),
            (False, True),
            (True, True),
        ]
        assert (await store.services.all())["gitea"].last_health == "healthy"


async def test_a_reminder_at_most_once_per_alert_repeat(tmp_path: Path) -> None:
    async with monitored(tmp_path, retries=1) as (lab, heard, clock, _store, monitor, manifest):
        lab.set_up("postgresql", False)
        down = await monitor.check("postgresql", manifest)
        assert down is not None and down.kind is ChangeKind.DOWN
        clock.now += timedelta(minutes=10)
        assert await monitor.check("postgresql", manifest) is None
        clock.now += timedelta(minutes=25)  # 35 minutes after the alert: one reminder
        reminder = await monitor.check("postgresql", manifest)
        assert reminder is not None and reminder.kind is ChangeKind.REMINDER
        assert await monitor.check("postgresql", manifest) is None
        assert kinds(heard) == [
            ("postgresql", ChangeKind.DOWN),
            ("postgresql", ChangeKind.REMINDER),
        ]


async def test_no_check_while_a_deployment_of_that_service_runs(tmp_path: Path) -> None:
    async with monitored(tmp_path, retries=1) as (lab, heard, _clock, store, monitor, manifest):
        lab.set_up("gitea", False)
        holder = f"deployment feedbeef ({os.uname().nodename}:{os.getpid()})"
        await store.locks.acquire(["gitea"], holder, lease=timedelta(minutes=1))
        assert await monitor.check("gitea", manifest) is None
        assert heard.ups == [] and heard.changes == []
        await store.locks.release(holder)
        down = await monitor.check("gitea", manifest)
        assert down is not None and down.kind is ChangeKind.DOWN


UP_SAMPLE = re.compile(r'^nixmox_service_up\{service="gitea"\} (\S+)$', re.MULTILINE)
CHECKED_SAMPLE = re.compile(
    r'^nixmox_service_health_checked_timestamp_seconds\{service="gitea"\} (\S+)$', re.MULTILINE
)


def messages_about(fake: FakeSlack, text: str) -> list[Message]:
    return [m for m in fake.channel_messages(CHANNEL) if text in m.text]


async def test_serve_alerts_once_then_recovers_and_metrics_go_0_then_1(
    tmp_path: Path, fake_slack: FakeSlack
) -> None:
    lab = Homelab(tmp_path, interval=0, retries=2)  # the monitor checks every 0.5 s
    await asyncio.to_thread(lab.deploy)
    env = slack_process_env(fake_slack, NIXMOX_DRIFT_INTERVAL="1")
    server = Server(lab.config, env, tmp_path / "serve.log")
    seen: list[str] = []
    try:
        async with aiohttp.ClientSession() as session:
            await server.wait_ready(session)

            async def up_value() -> str | None:
                async with session.get(f"{server.url}/metrics") as response:
                    found = UP_SAMPLE.search(await response.text())
                value = found.group(1) if found else None
                if value is not None and (not seen or seen[-1] != value):
                    seen.append(value)
                return value

            async def checked_at() -> str | None:
                async with session.get(f"{server.url}/metrics") as response:
                    found = CHECKED_SAMPLE.search(await response.text())
                return found.group(1) if found else None

            async def wait_for_checks(count: int) -> None:
                times = [await checked_at()]
                for _ in range(300):
                    if len(times) > count:
                        return
                    await asyncio.sleep(0.1)
                    if (now := await checked_at()) != times[-1]:
                        times.append(now)
                raise AssertionError(f"gitea was checked only at {times}")

            async def wait_up(value: str) -> None:
                for _ in range(300):
                    if await up_value() == value:
                        return
                    await asyncio.sleep(0.1)
                raise AssertionError(
                    f"nixmox_service_up never {value}: {seen}\n" + server.log.read_text()
                )

            await wait_up("1.0")
            lab.set_up("gitea", False)
            await wait_up("0.0")
            await fake_slack.wait_for(lambda: messages_about(fake_slack, "*gitea* is unhealthy"))
            await wait_for_checks(3)  # three more failing checks: no second alert
            lab.set_up("gitea", True)
            await wait_up("1.0")
            await fake_slack.wait_for(
                lambda: messages_about(fake_slack, "*gitea* is healthy again")
            )

            lab.rebuild_by_hand("postgresql")
            drift = await fake_slack.wait_for(
                lambda: messages_about(fake_slack, "Drift on *postgresql*")
            )
            async with session.get(f"{server.url}/metrics") as response:
                metrics = await response.text()
    finally:
        server.stop()
    assert seen == ["1.0", "0.0", "1.0"]
    alerts = messages_about(fake_slack, "*gitea* is unhealthy")
    assert len(alerts) == 1
    assert "liveness check failed 2 time(s) in a row" in alerts[0].text
    assert len(messages_about(fake_slack, "*gitea* is healthy again")) == 1
    assert messages_about(fake_slack, "postgresql* is unhealthy") == []
    assert [b["text"]["text"] for b in drift[0].buttons()] == ["Redeploy"]
    assert 'nixmox_drift{kind="system",service="postgresql"} 1.0' in metrics
    assert 'nixmox_service_health_checked_timestamp_seconds{service="gitea"}' in metrics


async def test_the_dashboard_shows_health_history_and_a_drift_section(
    tmp_path: Path, aiohttp_client: Any
) -> None:
    async with monitored(tmp_path, retries=1) as (lab, heard, _clock, store, monitor, manifest):
        await monitor.check("gitea", manifest)
        lab.set_up("gitea", False)
        await monitor.check("gitea", manifest)
        lab.rebuild_by_hand("postgresql")
        monitor.options.drift = True
        report = await monitor.drift_round()
        assert report is not None and set(report.services) == {"postgresql"}
        assert [(r.subject, r.kind) for r in heard.drifts[0][0]] == [("postgresql", "system")]
        assert await monitor.drift_round() is not None and len(heard.drifts) == 1  # not new

        settings = Settings(database_url=f"sqlite+aiosqlite:///{lab.root / 'state.db'}",
                            workdir=lab.root / "bot")  # fmt: skip
        app = build_app(settings, store=store, start_worker=False, start_monitor=False)
        client = await aiohttp_client(app)
        page = await (await client.get("/services/gitea")).text()
        assert "<h2>Health history</h2>" in page
        assert page.count("monitor (transition)") == 2
        assert "<code>exit status 1</code>" in page  # the failing check's last output line
        assert "liveness at" in page  # the latest check and when it ran
        overview = await (await client.get("/")).text()
        drift_part = overview.split("<h2>Drift</h2>", 1)[1]
        assert "postgresql" in drift_part and "system" in drift_part
        assert f"{lab.systems}/postgresql-manual" in drift_part


async def test_the_redeploy_button_asks_for_a_deployment_through_the_approval_flow(
    aiohttp_client: Any, tmp_path: Path, fake_slack: FakeSlack, manifest_repo: ManifestRepo
) -> None:
    settings = slack_settings(tmp_path, fake_slack, manifest_repo.path)
    fast = RunnerConfig(simulate=SimulateConfig(scale=0.01))
    app = build_app(settings, runner_config=fast)
    app[SLACK_BOT].pacer.interval = PROGRESS_INTERVAL
    client = await aiohttp_client(app)
    driver = SlackDriver(client, fake_slack)
    ctx = app[CONTEXT]
    store = ctx.require_store()
    plan = await plan_for_deploy(store, manifest_repo.path, "main")
    source = GitSource(manifest_repo.path)
    options = ExecutionOptions(runner_kind=RunnerKind.SIMULATE, runner_config=fast)
    deployed = await start_deployment(store, plan, source, options=options)
    assert deployed is not None and deployed.state.value == "succeeded"
    # deployed at the head already: a plain `deploy gitea` has nothing to do
    assert not (await plan_for_deploy(store, manifest_repo.path, "main", service="gitea")).steps
    (slack,) = [f for f in ctx.front_ends if f.monitor_listener() is not None]
    listener = slack.monitor_listener()
    assert listener is not None
    record = DriftRecord("gitea", "system", "/nix/store/a", "/nix/store/b", None,
                         datetime.now().astimezone(), datetime.now().astimezone())  # fmt: skip
    await listener.drift_changed([record], [], DriftReport())
    drift = await fake_slack.wait_for(lambda: messages_about(fake_slack, "Drift on *gitea*"))
    sent = await driver.click(drift[0], "Redeploy", user=REQUESTER)
    assert sent.status == 200

    def request() -> Message | None:
        return next(
            (m for m in fake_slack.channel_messages(CHANNEL)
             if "Approve" in [b["text"]["text"] for b in m.buttons()]),
            None,
        )  # fmt: skip

    pending = await fake_slack.wait_for(request)
    assert "gitea" in pending.all_text()
    approve = next(b for b in pending.buttons() if b["text"]["text"] == "Approve")
    approval = await ctx.require_store().approvals.get(approve["value"].split(" ")[0])
    assert approval is not None
    assert (approval.kind, approval.service, approval.requested_by) == (
        "deploy",
        "gitea",
        f"slack:{REQUESTER}",
    )
    assert str(approval.state) == "pending"
    assert approval.args.get("redeploy") is True
    assert approval.plan is not None  # planned in full although its revision is deployed
    assert {"nix:service-config:gitea", "verify:gitea"} <= {step.id for step in approval.plan.steps}
    assert (await driver.click(pending, "Approve", user=APPROVER)).status == 200
    await fake_slack.wait_for(lambda: "Succeeded" in pending.text or "Failed" in pending.text)
    assert "Succeeded" in pending.text

"""`nixmox serve` end to end on a real port, and its refusal to start when misconfigured."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from cli.main import main
from tests.fakes.github import DEFAULT_TOKEN, FakeGitHub
from tests.fixtures_github import (
    TEST_REPO,
    WEBHOOK_SECRET,
    ManifestRepo,
    Payloads,
    add_port,
    delivery_headers,
)
from tests.fixtures_manifests import MANIFEST_PATH

NIXMOX = Path(sys.executable).parent / "nixmox"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}")


class Server:
    """`nixmox serve` in a subprocess; its log is kept for assertions."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = subprocess.Popen(
            [str(NIXMOX), "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--config", str(config)],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                async with session.get(f"{self.url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("nixmox serve did not become ready:\n" + self.log.read_text())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def write_config(tmp_path: Path, fake: FakeGitHub, remote: Path) -> Path:
    config = tmp_path / "nixmox.toml"
    config.write_text(
        f"""
repo = "{TEST_REPO}"
github_api_url = "{fake.url}"
git_remote = "{remote}"
database_url = "sqlite+aiosqlite:///{tmp_path / "serve.db"}"
runner = "simulate"
workdir = "{tmp_path / "work"}"
public_url = "https://nixmox.example"
manifest_path = "{MANIFEST_PATH}"

[runners.simulate]
scale = 0.001
"""
    )
    return config


def server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIXMOX_")}
    env.update(NIXMOX_GITHUB_WEBHOOK_SECRET=WEBHOOK_SECRET, NIXMOX_GITHUB_TOKEN=DEFAULT_TOKEN)
    return env


async def test_nixmox_serve_end_to_end(
    tmp_path: Path, fake_github: FakeGitHub, manifest_repo: ManifestRepo, payloads: Payloads
) -> None:
    fake = fake_github
    fake.permissions.update(mallory="read", carol="write")
    server = Server(
        write_config(tmp_path, fake, manifest_repo.path), server_env(), tmp_path / "log"
    )
    try:
        async with aiohttp.ClientSession() as session:
            await server.wait_ready(session)

            async def deliver(event: str, payload: dict[str, Any], **kw: Any) -> Any:
                body = json.dumps(payload).encode()
                headers = delivery_headers(event, body, **kw)
                async with session.post(
                    f"{server.url}/github/webhook", data=body, headers=headers
                ) as response:
                    return response.status, await response.json()

            # 1. a signed pull_request for a real repository: plan comment + nixmox/plan success
            base = manifest_repo.repo.heads.main.commit.hexsha
            head = manifest_repo.commit(add_port(manifest_repo.manifest()), "port", branch="f")
            fake.add_pull(7, head_sha=head, base_sha=base)
            opened = payloads.pull_request("opened", number=7, head_sha=head, base_sha=base)
            first_delivery = str(uuid.uuid4())
            started = time.perf_counter()
            status, answer = await deliver("pull_request", opened, delivery=first_delivery)
            ack_seconds = time.perf_counter() - started
            assert (status, answer["status"]) == (200, "accepted")
            assert ack_seconds < 5  # acknowledged before any planning (measured in bench/)

            def plan_state(sha: str) -> str | None:
                found = fake.last_status(sha, "nixmox/plan")
                return found["state"] if found and found["state"] != "pending" else None

            assert await until(lambda: plan_state(head), what="plan status") == "success"
            (comment,) = fake.comments_on(7)
            assert "nix:service-config:gitea" in comment["body"]
            target = fake.last_status(head, "nixmox/plan")["target_url"]
            assert target.startswith("https://nixmox.example/plans/")

            # 2. a second push edits the same comment
            text = add_port(manifest_repo.manifest(), 3002)
            second = manifest_repo.commit(add_port(text, 3003), "more ports", branch="f")
            fake.add_pull(7, head_sha=second, base_sha=base)
            sync = payloads.pull_request("synchronize", number=7, head_sha=second, base_sha=base)
            assert (await deliver("pull_request", sync))[0] == 200
            await until(lambda: plan_state(second), what="second plan")
            (edited,) = fake.comments_on(7)
            assert edited["id"] == comment["id"] and edited["_edits"] == 1
            assert second in edited["body"]

            # 3. a forged signature gets 401
            status, answer = await deliver("pull_request", opened, secret="forged")
            assert status == 401

            # 4. a redelivery does nothing
            calls = len(fake.requests)
            status, answer = await deliver("pull_request", opened, delivery=first_delivery)
            assert (status, answer["status"]) == (200, "duplicate")
            await asyncio.sleep(0.5)
            assert len(fake.requests) == calls

            # 5. /nixmox apply from a user without write permission is refused with the reason
            fake.add_review(7, "carol", "APPROVED")
            apply = payloads.issue_comment(number=7, body="/nixmox apply", user="mallory")
            assert (await deliver("issue_comment", apply))[0] == 200
            refusal = await until(
                lambda: [c for c in fake.comments_on(7) if "refused" in c["body"]],
                what="refusal",
            )
            assert "@mallory has `read` access" in refusal[0]["body"]
            assert fake.deployments == {}

            # 6. a merge push deploys with the simulate runner and sets the deploy statuses
            merged = manifest_repo.merge("f")
            assert (await deliver("push", payloads.push(before=base, after=merged)))[0] == 200

            def deploy_state() -> str | None:
                found = fake.last_status(merged, "nixmox/deploy")
                return found["state"] if found and found["state"] != "pending" else None

            assert await until(deploy_state, what="deploy status") == "success"
            assert fake.last_status(merged, "nixmox/deploy/gitea")["state"] == "success"
            (deployment,) = fake.deployments.values()

            def deployment_states() -> list[str] | None:
                # the Deployment's final status is posted just after `nixmox/deploy`
                states = [s["state"] for s in fake.deployment_statuses[deployment["id"]]]
                return states if len(states) >= 2 else None

            assert await until(deployment_states, what="deployment statuses") == [
                "in_progress",
                "success",
            ]
            counted = 'nixmox_deployments_total{state="succeeded",trigger="merge"} 1.0'
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # the job finishes just after the last status
                async with session.get(f"{server.url}/metrics") as response:
                    if counted in await response.text():
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the deployment was not counted in /metrics")
    finally:
        code = server.stop()
    log = server.log.read_text()
    assert code == 0, log
    assert WEBHOOK_SECRET not in log and DEFAULT_TOKEN not in log


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"NIXMOX_REPO": "o/r", "NIXMOX_GITHUB_TOKEN": "t"},
            "NIXMOX_GITHUB_WEBHOOK_SECRET is not set",
        ),
        ({"NIXMOX_GITHUB_WEBHOOK_SECRET": "s", "NIXMOX_GITHUB_TOKEN": "t"}, "NIXMOX_REPO"),
        ({"NIXMOX_GITHUB_WEBHOOK_SECRET": "s", "NIXMOX_REPO": "o/r"}, "needs credentials"),
        (
            {
                "NIXMOX_GITHUB_WEBHOOK_SECRET": "s",
                "NIXMOX_REPO": "o/r",
                "NIXMOX_GITHUB_APP_ID": "1",
            },
            "NIXMOX_GITHUB_APP_ID needs NIXMOX_GITHUB_PRIVATE_KEY",
        ),
        (
            {
                "NIXMOX_GITHUB_WEBHOOK_SECRET": "s",
                "NIXMOX_REPO": "o/r",
                "NIXMOX_GITHUB_TOKEN": "t",
                "NIXMOX_APPLY_REQUIREMENTS": "approved,green",
            },
            "unknown apply requirement 'green'",
        ),
        ({"NIXMOX_RUNNER": "yolo"}, "NIXMOX_RUNNER must be real or simulate"),
    ],
    ids=["no-secret", "no-repo", "no-credentials", "app-without-key", "bad-requirement", "runner"],
)
def test_serve_refuses_to_start_misconfigured(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for key in list(os.environ):
        if key.startswith("NIXMOX_") and key != "NIXMOX_TESTDATA":
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["serve", "--port", "1"])
    assert result.exit_code == 1
    assert "cannot start" in result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_serve_reports_a_missing_or_invalid_config_file(tmp_path: Path) -> None:
    missing = CliRunner().invoke(main, ["serve", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    bad = tmp_path / "bad.toml"
    bad.write_text("parallel = 'many'\n")
    invalid = CliRunner().invoke(main, ["serve", "--config", str(bad)])
    assert invalid.exit_code == 1 and "invalid configuration: parallel" in invalid.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[runners\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(broken)])
    assert result.exit_code == 1 and "Traceback" not in result.output

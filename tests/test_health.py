"""The health runner: startup then liveness, retries/interval/timeout with their fallbacks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from planner.models import Manifest
from planner.plan import Phase, Step, plan_full
from runners.base import Context
from runners.config import HealthConfig, SshConfig
from runners.health import CheckPolicy, HealthRunner, checks, policy
from runners.nixos import HostResolver
from runners.transport import LocalTransport, SshTransport
from tests.fixtures_manifests import lab_manifest


def manifest(health: dict[str, Any] | None, **top: Any) -> Manifest:
    svc: dict[str, Any] = {"ip": "10.20.0.3", "interface": {}}
    if health is not None:
        svc["interface"]["health"] = health
    return lab_manifest({"web": svc}, **top)


def counter(path: Path, succeed_at: int) -> str:
    """A command that fails until its `succeed_at`-th run."""
    return f"n=$(($(cat {path} 2>/dev/null || echo 0) + 1)); echo $n > {path}; test $n -ge {succeed_at}"


def test_policy_prefers_the_service_then_the_manifest_then_the_config() -> None:
    config = HealthConfig(timeout=30, retries=3, interval=5)
    own = manifest({"startup": "true", "timeout": 7, "retries": 2, "interval": 1}, retry_delay=9)
    assert policy("web", own, config) == CheckPolicy(7, 2, 1)
    top = manifest({"startup": "true"}, health_check_timeout=11, retry_attempts=4, retry_delay=2)
    assert policy("web", top, config) == CheckPolicy(11, 4, 2)
    assert policy("web", manifest({"startup": "true"}), config) == CheckPolicy(30, 3, 5)


async def test_startup_is_retried_then_liveness_runs(tmp_path: Path) -> None:
    seen = tmp_path / "order"
    m = manifest(
        {
            "startup": f"{counter(tmp_path / 'n', 3)} && echo startup >> {seen}",
            "liveness": f"echo liveness >> {seen}",
            "retries": 3,
            "interval": 0,
        }
    )
    runner = HealthRunner(HealthConfig(), LocalTransport())
    result = await runner.check("web", m)
    assert result.ok, result.output
    assert seen.read_text() == "startup\nliveness\n"
    assert result.output.splitlines() == [
        "startup attempt 1/3: exit status 1: no output",
        "startup attempt 2/3: exit status 1: no output",
        "web startup passed (attempt 3/3)",
        "web liveness passed (attempt 1/3)",
    ]


async def test_a_check_that_never_passes_fails_after_all_attempts_and_skips_liveness(
    tmp_path: Path,
) -> None:
    m = manifest(
        {"startup": "echo not yet; false", "liveness": f"touch {tmp_path / 'ran'}"},
        retry_attempts=2,
        retry_delay=0,
    )
    result = await HealthRunner(HealthConfig(), LocalTransport()).check("web", m)
    assert not result.ok
    assert result.output.splitlines()[-1] == "web startup failed after 2 attempt(s)"
    assert "startup attempt 2/2: exit status 1: not yet" in result.output
    assert not (tmp_path / "ran").exists()


async def test_each_attempt_is_bounded_by_the_timeout() -> None:
    m = manifest({"startup": "sleep 30", "timeout": 1, "retries": 1})
    started = time.monotonic()
    result = await HealthRunner(HealthConfig(), LocalTransport()).check("web", m)
    assert not result.ok
    assert "startup attempt 1/1: exit status 124: timed out after 1s" in result.output
    assert time.monotonic() - started < 10


async def test_a_service_without_checks_passes_with_a_note() -> None:
    result = await HealthRunner(HealthConfig(), LocalTransport()).check("web", manifest(None))
    assert result.ok
    assert result.output == "web defines no health checks (interface.health): nothing to verify"
    assert checks("web", manifest(None)) == []


def test_commands_are_the_exact_ssh_lines(tmp_path: Path) -> None:
    m = manifest(
        {"startup": "systemctl is-active --quiet web", "liveness": "curl -fsS http://localhost/"}
    )
    transport = SshTransport(SshConfig(control_dir=Path("/tmp/nixmox-cm")))
    runner = HealthRunner(HealthConfig(), transport, HostResolver())
    plan = plan_full(m)
    lines = runner.commands(
        Step(id="verify:web", phase=Phase.VERIFY, service="web"), Context("d", m, plan, tmp_path)
    )
    prefix = (
        "ssh -o BatchMode=yes -o ConnectTimeout=10 -o ControlMaster=auto "
        "-o ControlPath=/tmp/nixmox-cm/%C -o ControlPersist=60s root@10.20.0.3 --"
    )
    assert lines == [
        f"{prefix} 'systemctl is-active --quiet web'",
        f"{prefix} 'curl -fsS http://localhost/'",
    ]

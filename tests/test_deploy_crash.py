"""A deploying process killed with SIGKILL: the next start marks it interrupted and the lock
is reclaimed once its lease has run out (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from state.deployments import DeploymentRecord
from state.events import DeploymentState, StepState
from state.locks import LockBusy
from state.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
NIXMOX = Path(sys.executable).parent / "nixmox"
SMALL = REPO_ROOT / "manifests" / "small.nix"
LEASE_SECONDS = 2.0
# every phase takes 10 ms except gitea's NixOS switch, which takes 60 s: the kill lands there
SLOW = (
    "--runner",
    "simulate",
    "--simulate-scale",
    "0.01",
    "--simulate-duration",
    "nix:service-config=6000",
)
SLOW_STEP = "nix:service-config:gitea"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/state.db"
    return request.getfixturevalue("postgres_database")


def nixmox(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NIXMOX), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


async def wait_for_running_step(url: str, step_id: str, proc: subprocess.Popen[str]) -> str:
    """The id of the deployment once `step_id` is running in it (the process still alive)."""
    store = await Store.open(url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the deploying process ended early: {proc.stderr.read()}"  # type: ignore[union-attr]  # started with stderr=PIPE
            for record in await store.deployments.history():
                step = record.step(step_id)
                if step is not None and step.state is StepState.RUNNING:
                    return record.id
            await asyncio.sleep(0.05)
        raise AssertionError(f"{step_id} never started running")
    finally:
        await store.close()


async def test_sigkill_mid_deployment_is_interrupted_and_lock_reclaimed(
    db_url: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "NIXMOX_DATABASE_URL": db_url,
        "NIXMOX_LOCK_LEASE": str(LEASE_SECONDS),
    }
    proc = subprocess.Popen(
        [str(NIXMOX), "deploy", str(SMALL), *SLOW],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deployment_id = await wait_for_running_step(db_url, SLOW_STEP, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = time.monotonic()

    store = await Store.open(db_url)
    try:
        # right after the kill the lease still runs: the dead holder is named, nothing recovered
        with pytest.raises(LockBusy) as busy:
            await store.locks.acquire(["gitea"], "someone-else", lease=timedelta(seconds=30))
        assert (
            busy.value.holder == f"deployment {deployment_id} ({socket.gethostname()}:{proc.pid})"
        )
        assert await store.deployments.recover_interrupted() == []
        still = await store.deployments.get(deployment_id)
        assert still is not None and still.state is DeploymentState.RUNNING
    finally:
        await store.close()

    # wait out the lease (no process renews it any more), then start again
    await asyncio.sleep(max(0.0, LEASE_SECONDS + 0.5 - (time.monotonic() - killed_at)))
    status = nixmox(["status", "--json"], env, tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"warning: deployment {deployment_id} was interrupted" in status.stderr
    assert f"it stopped during {SLOW_STEP}" in status.stderr
    last = json.loads(status.stdout)["last_deployment"]
    assert (last["id"], last["state"]) == (deployment_id, "interrupted")
    assert json.loads(status.stdout)["locks"] == []

    store = await Store.open(db_url)
    try:
        record = await store.deployments.get(deployment_id)
        assert record is not None
        assert_stopped_where_it_was(record)
        assert await store.deployments.recover_interrupted() == []  # reported once
    finally:
        await store.close()

    # the lock is reclaimed: the next deployment runs
    again = nixmox(
        ["deploy", str(SMALL), "--runner", "simulate", "--simulate-scale", "0.005", "--json"],
        env,
        tmp_path,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["state"] == "succeeded"


def assert_stopped_where_it_was(record: DeploymentRecord) -> None:
    states = {step.id: step.state for step in record.steps}
    assert states == {
        "tf:infra": StepState.SUCCEEDED,
        "nix:core:postgresql": StepState.SUCCEEDED,
        "verify:postgresql": StepState.SUCCEEDED,
        SLOW_STEP: StepState.INTERRUPTED,
        "verify:gitea": StepState.SKIPPED,
    }
    stopped = record.step(SLOW_STEP)
    assert stopped is not None and stopped.finished_at is not None
    assert "stopped while running (attempt 1" in (stopped.reason or "")
    assert "the process running the deployment died" in (stopped.reason or "")
    skipped = record.step("verify:gitea")
    assert skipped is not None and skipped.reason == "not started: the deployment was interrupted"
    assert record.finished_at is not None

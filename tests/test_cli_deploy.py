"""`nixmox deploy / rollback / status / history / unlock` as a user runs them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import git
import pytest
from click.testing import CliRunner, Result

from cli.main import main
from state.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = REPO_ROOT / "manifests" / "small.nix"
MANIFEST = "nixos/service-manifest.nix"
SIMULATE = ("--runner", "simulate", "--simulate-scale", "0.005")
STEP_IDS = [
    "tf:infra",
    "nix:core:postgresql",
    "verify:postgresql",
    "nix:service-config:gitea",
    "verify:gitea",
]

T = TypeVar("T")


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every command in the test reads this store (NIXMOX_DATABASE_URL) and runs in tmp_path."""
    url = f"sqlite+aiosqlite:///{tmp_path}/state/state.db"
    monkeypatch.setenv("NIXMOX_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    return url


def nixmox(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def with_store(url: str, action: Callable[[Store], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await Store.open(url)
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(go())


def check_record_shape(data: dict[str, Any], kind: str) -> None:
    """The documented `--json` record: exactly these keys."""
    assert set(data) == {"id", "kind", "state", "steps"}
    assert data["kind"] == kind and isinstance(data["id"], str)
    for step in data["steps"]:
        assert set(step) == {"id", "state", "started_at", "finished_at"}
        assert step["state"] in {"succeeded", "failed", "skipped", "rolled_back", "interrupted"}


def test_deploy_with_the_simulate_runner_prints_the_record(db_url: str) -> None:
    result = nixmox("deploy", str(SMALL), *SIMULATE, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    check_record_shape(data, "deploy")
    assert data["state"] == "succeeded"
    assert [step["id"] for step in data["steps"]] == STEP_IDS
    assert all(step["started_at"] <= step["finished_at"] for step in data["steps"])
    # plain progress lines went to stderr, so stdout is only the JSON
    assert "verify:gitea: succeeded" in result.stderr
    record = with_store(db_url, lambda store: store.deployments.get(data["id"]))
    assert record is not None and record.requested_by


def test_deploy_failure_rollback_and_skips(db_url: str) -> None:
    rolled = nixmox("deploy", str(SMALL), *SIMULATE, "--json", "--simulate-fail", "verify:gitea")
    assert rolled.exit_code == 1
    data = json.loads(rolled.stdout)
    assert data["state"] == "rolled_back"
    assert {s["id"]: s["state"] for s in data["steps"]}["verify:gitea"] == "rolled_back"

    failed = nixmox("deploy", str(SMALL), *SIMULATE, "--simulate-fail", "nix:core:postgresql")
    assert failed.exit_code == 1
    assert "failed" in failed.stdout
    assert "verify:gitea skipped: needs nix:core:postgresql" in failed.stdout


def test_plain_progress_and_summary(db_url: str) -> None:
    result = nixmox("deploy", str(SMALL), *SIMULATE, "-v")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "2 services change, 5 steps in 5 waves"
    assert any(line.endswith("nix:core:postgresql: started") for line in lines)
    assert any("simulated switch of gitea" in line for line in lines)  # -v: step output
    assert lines[-1].startswith("deploy ") and "succeeded: 5 succeeded" in lines[-1]


def test_deploy_repo_twice_has_nothing_to_do_then_rollback(
    db_url: str, repo: git.Repo, tmp_path: Path
) -> None:
    args = ("deploy", "--repo", str(repo.working_tree_dir), "--ref", "main", *SIMULATE)
    first = nixmox(*args, "--json", "--manifest", MANIFEST)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["state"] == "succeeded"

    second = nixmox(*args, "--json", "--manifest", MANIFEST)
    assert second.exit_code == 0, second.output
    data = json.loads(second.stdout)
    assert data["id"] is None and data["steps"] == [] and data["state"] == "succeeded"
    assert data["note"].startswith("No deployment needed")
    text = nixmox(*args, "--manifest", MANIFEST)
    assert text.stdout.startswith("No deployment needed")

    manifest = Path(repo.working_tree_dir) / MANIFEST
    manifest.write_text(manifest.read_text().replace("ports = [ 3000 ]", "ports = [ 3001 ]"))
    repo.index.add([MANIFEST])
    repo.index.commit("gitea port")
    change = nixmox(*args, "--json", "--manifest", MANIFEST)
    assert change.exit_code == 0, change.output
    deployed = json.loads(change.stdout)
    assert [s["id"] for s in deployed["steps"]] == ["nix:service-config:gitea", "verify:gitea"]

    back = nixmox("rollback", "--runner", "simulate", "--simulate-scale", "0.005", "--json")
    assert back.exit_code == 0, back.output
    undone = json.loads(back.stdout)
    check_record_shape(undone, "rollback")
    assert undone["state"] == "succeeded"
    assert [s["id"] for s in undone["steps"]] == ["nix:service-config:gitea", "verify:gitea"]
    assert f"rollback: undo deployment {deployed['id']}: gitea back to" in back.stderr

    # rollback to a ref deploys that revision, recorded as kind rollback
    to_ref = nixmox(
        "rollback",
        "gitea",
        "--to",
        "main",
        "--repo",
        str(repo.working_tree_dir),
        "--manifest",
        MANIFEST,
        *SIMULATE,
        "--json",
    )
    assert to_ref.exit_code == 0, to_ref.output
    redo = json.loads(to_ref.stdout)
    check_record_shape(redo, "rollback")
    assert [s["id"] for s in redo["steps"]] == ["nix:service-config:gitea", "verify:gitea"]

    history = nixmox("history", "gitea", "--json")
    kinds = [(entry["kind"], entry["state"]) for entry in json.loads(history.stdout)]
    assert kinds == [
        ("rollback", "succeeded"),
        ("rollback", "succeeded"),
        ("deploy", "succeeded"),
        ("deploy", "succeeded"),
    ]


def test_rollback_to_a_deployment_id(db_url: str) -> None:
    first = json.loads(nixmox("deploy", str(SMALL), *SIMULATE, "--json").stdout)
    nixmox("deploy", str(SMALL), *SIMULATE, "--json")
    result = nixmox("rollback", "postgresql", "--to", first["id"], *SIMULATE, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [s["id"] for s in data["steps"]] == ["nix:core:postgresql", "verify:postgresql"]
    first_record = with_store(db_url, lambda store: store.deployments.get(first["id"]))
    services = with_store(db_url, lambda store: store.services.all())
    installed = first_record.step("nix:core:postgresql").new_system  # type: ignore[union-attr]  # a missing step fails the test
    assert services["postgresql"].system_path == installed


def test_rollback_with_nothing_recorded_is_a_clear_error(db_url: str) -> None:
    result = nixmox("rollback", *SIMULATE)
    assert result.exit_code == 1
    assert "no deployment recorded yet" in result.stderr


def test_status_history_and_unlock(db_url: str) -> None:
    empty = nixmox("status")
    assert empty.exit_code == 0
    assert empty.stdout.splitlines()[:2] == ["NixMox Service Status", "No deployment recorded yet."]
    deployed = json.loads(nixmox("deploy", str(SMALL), *SIMULATE, "--json").stdout)

    status = nixmox("status")
    assert status.exit_code == 0, status.output
    assert status.stdout.startswith("NixMox Service Status\n")
    assert f"Last deployment: {deployed['id']} deploy succeeded" in status.stdout
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[3:]}
    assert set(rows) >= {"gitea", "postgresql"}
    assert rows["gitea"][2] == "healthy"

    data = json.loads(nixmox("status", "--json").stdout)
    assert data["last_deployment"]["id"] == deployed["id"]
    assert {s["name"]: s["last_deployment_id"] for s in data["services"]} == {
        "gitea": deployed["id"],
        "postgresql": deployed["id"],
    }
    live = nixmox("status", "--check", "--runner", "simulate", "--json")
    assert live.exit_code == 0, live.output
    assert json.loads(live.stdout)["checked"]["gitea"]["healthy"] is True

    history = nixmox("history")
    assert history.stdout.splitlines()[0].split()[:3] == ["ID", "KIND", "STATE"]
    assert deployed["id"] in history.stdout
    assert nixmox("history", "caddy").stdout.strip() == "No deployments recorded for caddy."

    with_store(db_url, lambda store: store.locks.lock("gitea", "alice", "maintenance"))
    refused = nixmox("deploy", str(SMALL), *SIMULATE)
    assert refused.exit_code == 3
    assert "gitea is locked by alice (maintenance)" in refused.stderr
    unlocked = nixmox("unlock", "gitea")
    assert unlocked.exit_code == 0
    assert unlocked.stdout.strip() == "unlocked gitea (was held by alice)"
    assert nixmox("unlock", "gitea").exit_code == 1
    assert nixmox("deploy", str(SMALL), *SIMULATE).exit_code == 0
    [audit, *_] = with_store(db_url, lambda store: store.audit.entries())
    assert audit.action in {"deploy started", "unlock"}


def test_dry_run_changes_nothing(db_url: str) -> None:
    result = nixmox("deploy", str(SMALL), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "nixos-rebuild switch --flake" in result.stdout
    assert "root@10.20.0.3" in result.stdout
    assert with_store(db_url, lambda store: store.deployments.history()) == []


def test_bad_input_is_a_clear_error(db_url: str, tmp_path: Path) -> None:
    both = nixmox("deploy", str(SMALL), "--repo", ".")
    assert both.exit_code == 2 and "not both" in both.output
    neither = nixmox("deploy")
    assert neither.exit_code == 2 and "give a manifest PATH" in neither.output
    unknown = nixmox("deploy", str(SMALL), "--service", "nope", *SIMULATE)
    assert unknown.exit_code == 2 and 'no enabled service "nope"' in unknown.output
    not_git = nixmox("deploy", "--repo", str(tmp_path), *SIMULATE)
    assert not_git.exit_code == 2 and "is not a Git repository" in not_git.stderr
    bad_url = nixmox("status", "--database-url", "mysql://x@127.0.0.1/db")
    assert bad_url.exit_code == 1 and "unsupported database 'mysql'" in bad_url.output
    bad_duration = nixmox("deploy", str(SMALL), *SIMULATE, "--simulate-duration", "verify")
    assert bad_duration.exit_code == 2 and "PHASE=SECONDS" in bad_duration.output


def test_unlock_refuses_a_running_deployments_lock_without_force(db_url: str) -> None:
    holder = "deployment 3f2a9c1d (bot-1:4242)"
    with_store(
        db_url,
        lambda store: store.locks.acquire(["gitea"], holder, lease=timedelta(minutes=5)),
    )
    refused = nixmox("unlock", "gitea")
    assert refused.exit_code == 1
    assert f"gitea is locked by running {holder}" in refused.stderr
    assert "released when that deployment ends" in refused.stderr
    assert [lock.holder for lock in with_store(db_url, lambda store: store.locks.all())] == [holder]

    forced = nixmox("unlock", "gitea", "--force")
    assert forced.exit_code == 0, forced.output
    assert forced.stdout.strip() == f"unlocked gitea (was held by {holder})"
    assert with_store(db_url, lambda store: store.locks.all()) == []
    [audit, *_] = with_store(db_url, lambda store: store.audit.entries(action="unlock"))
    assert audit.detail == {"service": "gitea", "holder": holder, "force": True}

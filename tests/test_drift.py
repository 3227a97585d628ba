"""`nixmox drift`: a host switched by hand, undeployed commits on the default branch, terraform
changed outside the bot (real terraform, `terraform_data`), and nothing after a clean deploy."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import Result

from tests.homelab import Homelab


def drift(lab: Homelab, *extra: str) -> Result:
    return lab.nixmox("drift", "--repo", str(lab.repo_dir), "--config", str(lab.config), *extra)


def test_nothing_drifted_right_after_a_clean_deployment(tmp_path: Path) -> None:
    lab = Homelab(tmp_path)
    lab.deploy()
    result = drift(lab, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "services": {},
        "pending": None,
        "terraform": {"tf:infra": "in sync"},
    }
    text = drift(lab)
    assert text.exit_code == 0, text.output
    assert "✓ tf:infra: in sync" in text.stdout
    assert "No drift" in text.stdout


def test_a_host_whose_current_system_was_changed_by_hand(tmp_path: Path) -> None:
    lab = Homelab(tmp_path)
    lab.deploy()
    deployed = lab.running("gitea")
    manual = lab.rebuild_by_hand("gitea")
    result = drift(lab, "--json")
    assert result.exit_code == 1, result.output
    body = json.loads(result.stdout)
    assert body["services"] == {
        "gitea": [{"kind": "system", "expected": deployed, "actual": str(manual)}]
    }
    assert body["pending"] is None
    text = drift(lab)
    assert f"✗ gitea: system {manual} is running, {deployed} was deployed" in text.stdout


def test_pending_after_a_commit_to_the_default_branch(tmp_path: Path) -> None:
    lab = Homelab(tmp_path)
    lab.deploy()
    head = lab.commit_manifest_change("gitea listens on 3000")
    result = drift(lab, "--json")
    assert result.exit_code == 1, result.output
    pending = json.loads(result.stdout)["pending"]
    assert pending["revision"] == head
    assert pending["steps"] >= 2  # gitea's nix step and its verify, as the planner says
    text = drift(lab)
    assert f"✗ pending: {head[:12]} on the default branch is not deployed" in text.stdout

    lab.deploy()
    assert drift(lab).exit_code == 0


def test_terraform_drift_after_an_input_changed_outside_the_bot(tmp_path: Path) -> None:
    lab = Homelab(tmp_path)
    lab.deploy()
    lab.change_terraform_outside("changed-by-hand")
    result = drift(lab, "--json")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["terraform"] == {"tf:infra": "drifted"}
    text = drift(lab)
    assert "✗ tf:infra: drifted" in text.stdout
    assert "terraform_data.infra will be updated in-place" in text.stdout


def test_pending_after_a_rollback_is_said_to_be_expected(tmp_path: Path) -> None:
    lab = Homelab(tmp_path)
    lab.deploy()
    lab.commit_manifest_change("gitea listens on 3000")
    lab.deploy()
    rolled = lab.nixmox("rollback", "gitea", "--config", str(lab.config))
    assert rolled.exit_code == 0, rolled.output
    result = drift(lab)
    assert result.exit_code == 1, result.output
    assert "pending is expected after the rollback" in result.stderr
    assert "nothing redeploys by itself" in result.stderr

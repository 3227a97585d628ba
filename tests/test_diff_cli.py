"""`nixmox plan --repo DIR --base REF --head REF` as a user runs it (the console script)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import UPSTREAM
from tests.test_gitsource import GitRepo

NIXMOX = Path(sys.executable).parent / "nixmox"
MANIFEST = "nixos/service-manifest.nix"
OLD_UPSTREAM = 'upstream = "192.168.99.14:8080";'
NEW_UPSTREAM = 'upstream = "192.168.99.14:8081";'


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NIXMOX), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[GitRepo, dict[str, str]]:
    """Commits: base, proxy (vaultwarden's upstream), comment (a comment only), broken."""
    text = (UPSTREAM / "service-manifest.nix").read_text()
    repo = GitRepo(tmp_path_factory.mktemp("cli") / "repo")
    revs = {}
    repo.write(MANIFEST, text)
    revs["base"] = repo.commit("base")
    text = text.replace(OLD_UPSTREAM, NEW_UPSTREAM)
    repo.write(MANIFEST, text)
    revs["proxy"] = repo.commit("proxy")
    repo.write(MANIFEST, "# reviewed\n" + text)
    revs["comment"] = repo.commit("comment")
    repo.write(MANIFEST, text.replace("retry_delay = 15;", "retry_delay = ;"))
    revs["broken"] = repo.commit("broken")
    return repo, revs


def test_json_has_revisions_changes_and_steps(repo: tuple[GitRepo, dict[str, str]]) -> None:
    git_repo, revs = repo
    result = run(
        "plan", "--repo", str(git_repo.path), "--base", "HEAD~3", "--head", "HEAD~2",
        "--format", "json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["base"] == revs["base"] and data["head"] == revs["proxy"]
    assert data["changes"] == [
        {"service": "vaultwarden", "kind": "changed", "fields": ["interface.proxy.upstream"]}
    ]
    assert [step["id"] for step in data["steps"]] == ["nix:core:caddy", "verify:vaultwarden"]
    assert data["steps"][1]["reasons"] == ["services.vaultwarden.interface.proxy.upstream"]
    assert len(data["digest"]) == 64


def test_comment_only_change_needs_no_deployment(repo: tuple[GitRepo, dict[str, str]]) -> None:
    git_repo, revs = repo
    args = ["plan", "--repo", str(git_repo.path), "--base", revs["proxy"], "--head"]
    text = run(*args, revs["comment"])
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("No deployment needed: ")
    assert "comments" in text.stdout
    data = json.loads(run(*args, revs["comment"], "--format", "json").stdout)
    assert data["steps"] == [] and data["changes"] == []


def test_markdown_and_slack_formats(repo: tuple[GitRepo, dict[str, str]]) -> None:
    git_repo, revs = repo
    args = ["plan", "--repo", str(git_repo.path), "--base", revs["base"], "--head", revs["proxy"]]
    markdown = run(*args, "--format", "markdown")
    assert markdown.returncode == 0, markdown.stderr
    assert markdown.stdout.startswith("<!-- nixmox:plan -->\n### NixMox plan: 2 services change")
    slack = run(*args, "--format", "slack")
    assert slack.returncode == 0, slack.stderr
    blocks = json.loads(slack.stdout)["blocks"]
    assert blocks[0]["type"] == "header" and len(blocks) <= 50


def test_without_base_plans_the_full_deployment(repo: tuple[GitRepo, dict[str, str]]) -> None:
    git_repo, revs = repo
    result = run("plan", "--repo", str(git_repo.path), "--head", revs["proxy"], "--format", "json")
    data = json.loads(result.stdout)
    assert data["base"] is None and data["head"] == revs["proxy"]
    assert len(data["steps"]) == 31


def test_service_option_and_manifest_path(repo: tuple[GitRepo, dict[str, str]]) -> None:
    git_repo, revs = repo
    args = ["plan", "--repo", str(git_repo.path), "--base", revs["base"], "--head", revs["proxy"]]
    only = json.loads(run(*args, "--service", "forgejo", "--format", "json").stdout)
    assert [step["id"] for step in only["steps"]] == ["nix:core:caddy"]  # forgejo needs caddy
    missing = run(*args, "--manifest", "deploy/manifest.nix")
    assert missing.returncode == 1
    assert "deploy/manifest.nix does not exist" in missing.stderr


def test_invalid_head_exits_1_with_the_nix_error(repo: tuple[GitRepo, dict[str, str]]) -> None:
    git_repo, revs = repo
    result = run("plan", "--repo", str(git_repo.path), "--base", revs["base"], "--head", "HEAD")
    assert result.returncode == 1
    assert "nixos/service-manifest.nix" in result.stderr and "syntax error" in result.stderr
    assert "Traceback" not in result.stderr


def test_bot_failures_exit_2_and_usage_errors(
    repo: tuple[GitRepo, dict[str, str]], tmp_path: Path
) -> None:
    git_repo, _ = repo
    unknown = run("plan", "--repo", str(git_repo.path), "--base", "no-such-ref")
    assert unknown.returncode == 2
    assert "unknown revision 'no-such-ref'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    not_repo = run("plan", "--repo", str(tmp_path))
    assert not_repo.returncode == 2 and "not a Git repository" in not_repo.stderr
    both = run("plan", "manifest.nix", "--repo", str(git_repo.path))
    assert both.returncode == 2 and "not both" in both.stderr
    base_alone = run("plan", str(UPSTREAM / "service-manifest.nix"), "--base", "HEAD")
    assert base_alone.returncode == 2 and "--base needs --repo" in base_alone.stderr

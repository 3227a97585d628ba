"""Manifests at Git revisions: tree export, revisions, changed files, evaluation cache.

Every test builds a real Git repository with gitpython in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import git
import pytest

from planner.findings import ManifestError
from planner.source import (
    EvalCache,
    EvalLimits,
    EvaluationTimeout,
    EvaluatorMissing,
    PlanningError,
    UnknownRevision,
    changed_files,
    export_tree,
    load_manifest_at,
    read_file_at,
    resolve_revision,
    tree_id,
)

SMALL = """{
  network = { gateway = "10.20.0.1"; network_cidr = "10.20.0.0/24"; };
  core_services.postgresql = import ./services/postgresql.nix;
  services.gitea = {
    ip = "10.20.0.3"; depends_on = [ "postgresql" ];
    interface.health.liveness = "true";
  };
}
"""
POSTGRESQL = '{ ip = "10.20.0.2"; vmid = 302; interface.health.liveness = "pg_isready"; }\n'


class GitRepo:
    """A real repository in a temporary directory, with helpers to write and commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.repo = git.Repo.init(path, initial_branch="main")
        with self.repo.config_writer() as config:
            config.set_value("user", "name", "NixMox Test")
            config.set_value("user", "email", "test@example.invalid")

    def write(self, rel: str, text: str, *, executable: bool = False) -> None:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        if executable:
            target.chmod(0o755)

    def read(self, rel: str) -> str:
        return (self.path / rel).read_text()

    def commit(self, message: str = "change", *, allow_empty: bool = False) -> str:
        """Stage everything and commit with the git CLI (keeps modes and symlinks exact)."""
        self.repo.git.add("--all")
        args = ["-q", "-m", message] + (["--allow-empty"] if allow_empty else [])
        self.repo.git.commit(*args)
        return str(self.repo.head.commit.hexsha)


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    return GitRepo(tmp_path / "repo")


def test_export_tree_writes_files_modes_and_symlinks(repo: GitRepo, tmp_path: Path) -> None:
    repo.write("nixos/service-manifest.nix", SMALL)
    repo.write("nixos/services/postgresql.nix", POSTGRESQL)
    repo.write("scripts/deploy.sh", "#!/bin/sh\necho hi\n", executable=True)
    os.symlink("../nixos/service-manifest.nix", repo.path / "scripts" / "manifest-link")
    rev = repo.commit("first")

    dest = export_tree(repo.path, rev, tmp_path / "out")

    assert (dest / "nixos/service-manifest.nix").read_text() == SMALL
    assert (dest / "nixos/services/postgresql.nix").read_text() == POSTGRESQL
    assert os.stat(dest / "scripts/deploy.sh").st_mode & stat.S_IXUSR
    assert not os.stat(dest / "nixos/service-manifest.nix").st_mode & stat.S_IXUSR
    link = dest / "scripts/manifest-link"
    assert link.is_symlink()
    assert os.readlink(link) == "../nixos/service-manifest.nix"
    assert not (dest / ".git").exists()


def test_export_tree_reads_the_revision_not_the_working_copy(repo: GitRepo, tmp_path: Path) -> None:
    repo.write("nixos/service-manifest.nix", SMALL)
    repo.write("nixos/services/postgresql.nix", POSTGRESQL)
    first = repo.commit("first")
    repo.write("nixos/services/postgresql.nix", POSTGRESQL.replace("302", "399"))
    repo.commit("second")
    repo.write("nixos/services/postgresql.nix", "uncommitted edit")
    (repo.path / "untracked.txt").write_text("not in any revision")
    status_before = repo.repo.git.status("--porcelain")

    dest = export_tree(repo.path, first, tmp_path / "old")

    assert (dest / "nixos/services/postgresql.nix").read_text() == POSTGRESQL
    assert not (dest / "untracked.txt").exists()
    assert repo.read("nixos/services/postgresql.nix") == "uncommitted edit"
    assert repo.repo.git.status("--porcelain") == status_before


def test_resolve_revision_accepts_branches_tags_and_short_ids(repo: GitRepo) -> None:
    repo.write("a.txt", "a")
    first = repo.commit("first")
    repo.repo.create_tag("v1", message="annotated tag")
    repo.write("a.txt", "b")
    second = repo.commit("second")

    assert resolve_revision(repo.path, "main") == second
    assert resolve_revision(repo.path, "HEAD~1") == first
    assert resolve_revision(repo.path, "v1") == first
    assert resolve_revision(repo.path, first[:8]) == first
    for bad in ("no-such-branch", "0" * 40, "--output=/tmp/x", ""):
        with pytest.raises(UnknownRevision):
            resolve_revision(repo.path, bad)


def test_not_a_repository_is_a_planning_error(tmp_path: Path) -> None:
    with pytest.raises(PlanningError, match="not a Git repository"):
        resolve_revision(tmp_path, "HEAD")


def test_changed_files_lists_added_modified_deleted_and_renamed(repo: GitRepo) -> None:
    repo.write("keep.txt", "same")
    repo.write("modify.txt", "one")
    repo.write("delete.txt", "gone soon")
    repo.write("old/name.nix", "{ }\n" * 20)
    base = repo.commit("base")
    repo.write("modify.txt", "two")
    (repo.path / "delete.txt").unlink()
    (repo.path / "new").mkdir()
    (repo.path / "old/name.nix").rename(repo.path / "new/name.nix")
    repo.write("added.txt", "new")
    head = repo.commit("head")

    assert changed_files(repo.path, base, head) == [
        "added.txt",
        "delete.txt",
        "modify.txt",
        "new/name.nix",
        "old/name.nix",
    ]
    assert changed_files(repo.path, head, head) == []


def test_load_manifest_at_follows_imports_at_that_revision(repo: GitRepo) -> None:
    repo.write("nixos/service-manifest.nix", SMALL)
    repo.write("nixos/services/postgresql.nix", POSTGRESQL)
    first = repo.commit("first")
    repo.write("nixos/services/postgresql.nix", POSTGRESQL.replace("302", "399"))
    second = repo.commit("second")

    assert load_manifest_at(repo.path, first).core_services["postgresql"].vmid == 302
    assert load_manifest_at(repo.path, second).core_services["postgresql"].vmid == 399


def test_configurable_manifest_path(repo: GitRepo) -> None:
    repo.write("deploy/manifest.nix", SMALL.replace("./services", "../nixos/services"))
    repo.write("nixos/services/postgresql.nix", POSTGRESQL)
    rev = repo.commit()

    manifest = load_manifest_at(repo.path, rev, "deploy/manifest.nix")
    assert set(manifest.all_services()) == {"postgresql", "gitea"}
    with pytest.raises(ManifestError, match=r"nixos/service-manifest\.nix does not exist"):
        load_manifest_at(repo.path, rev)
    with pytest.raises(PlanningError, match="relative"):
        load_manifest_at(repo.path, rev, "../outside.nix")


def test_restricted_mode_at_a_revision_refuses_files_outside_the_tree(repo: GitRepo) -> None:
    repo.write("nixos/service-manifest.nix", "builtins.readFile /etc/hostname\n")
    repo.write("nixos/link.nix", "builtins.readFile ./secret\n")
    os.symlink("/etc/hostname", repo.path / "nixos" / "secret")
    rev = repo.commit()
    secret = Path("/etc/hostname").read_text().strip()

    for path in ("nixos/service-manifest.nix", "nixos/link.nix"):
        with pytest.raises(ManifestError) as caught:
            load_manifest_at(repo.path, rev, path)
        text = str(caught.value)
        assert "forbidden in restricted mode" in text
        assert secret not in text.replace("/etc/hostname", "")
        assert caught.value.findings[0].file == path


def test_cache_makes_a_seen_tree_cost_no_evaluation(
    repo: GitRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.write("nixos/service-manifest.nix", SMALL)
    repo.write("nixos/services/postgresql.nix", POSTGRESQL)
    first = repo.commit("first")
    same_tree = repo.commit("only the message differs", allow_empty=True)
    assert tree_id(repo.path, first) == tree_id(repo.path, same_tree)
    cache = EvalCache()

    manifest = load_manifest_at(repo.path, first, cache=cache)
    # With git but without nix-instantiate on PATH, only the cache can answer.
    git_only = tmp_path / "git-only"
    git_only.mkdir()
    git_path = shutil.which("git")
    assert git_path, "git must be installed"
    (git_only / "git").symlink_to(git_path)
    monkeypatch.setenv("PATH", str(git_only))
    assert load_manifest_at(repo.path, same_tree, cache=cache) is manifest
    assert (cache.hits, cache.misses) == (1, 1)

    repo.write("nixos/services/postgresql.nix", POSTGRESQL.replace("302", "399"))
    other = repo.commit("new tree")
    with pytest.raises(EvaluatorMissing) as caught:
        load_manifest_at(repo.path, other, cache=cache)
    assert isinstance(caught.value, PlanningError)


def test_cache_keeps_failures_and_is_bounded(repo: GitRepo) -> None:
    repo.write("nixos/service-manifest.nix", "{ network = ; }\n")
    broken = repo.commit("broken")
    cache = EvalCache(size=2)
    for _ in range(2):
        with pytest.raises(ManifestError, match=r"service-manifest\.nix"):
            load_manifest_at(repo.path, broken, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)

    revs = []
    for vmid in (1, 2, 3):
        repo.write("nixos/service-manifest.nix", f"{{ services.a = {{ vmid = {vmid}; }}; }}\n")
        revs.append(repo.commit(f"vmid {vmid}"))
        load_manifest_at(repo.path, revs[-1], cache=cache)
    assert len(cache) == 2


def test_evaluation_timeout_is_a_planning_error_and_not_cached(repo: GitRepo) -> None:
    slow = "builtins.length (builtins.filter (x: x == 0) (builtins.genList (x: x) 30000000))\n"
    repo.write("nixos/service-manifest.nix", slow)
    rev = repo.commit()
    cache = EvalCache()
    with pytest.raises(EvaluationTimeout) as caught:
        load_manifest_at(repo.path, rev, limits=EvalLimits(timeout=0.2), cache=cache)
    assert isinstance(caught.value, PlanningError)
    assert caught.value.evaluation_failed  # `nixmox validate` still exits 2 for it
    assert len(cache) == 0


def test_read_file_at(repo: GitRepo) -> None:
    repo.write(".nixmox.toml", "[paths]\n")
    rev = repo.commit()
    assert read_file_at(repo.path, rev, ".nixmox.toml") == b"[paths]\n"
    assert read_file_at(repo.path, rev, "missing.toml") is None


def test_works_on_a_bare_clone(repo: GitRepo, tmp_path: Path) -> None:
    repo.write("nixos/service-manifest.nix", SMALL)
    repo.write("nixos/services/postgresql.nix", POSTGRESQL)
    rev = repo.commit()
    bare = git.Repo.clone_from(str(repo.path), str(tmp_path / "bare.git"), bare=True)
    manifest = load_manifest_at(bare.git_dir, rev)
    assert manifest.services["gitea"].depends_on == ["postgresql"]


def test_export_tree_keeps_submodules_deep_directories_and_odd_names(
    repo: GitRepo, tmp_path: Path
) -> None:
    """The checked export still writes everything an honest tree holds."""
    deep = "/".join(f"d{i}" for i in range(40)) + "/leaf.txt"
    repo.write(deep, "deep")
    repo.write("weird name ü\n[x].txt", "odd but legal")
    repo.write(".github/workflows/ci.yml", "on: push\n")  # `.git` only as a whole name
    repo.write(".gitignore", "result\n")
    repo.write("a/.gitkeep", "")
    os.symlink("/nonexistent/target", repo.path / "dangling")
    repo.repo.git.add("--all")
    repo.repo.git.update_index("--add", "--cacheinfo", f"160000,{'ab' * 20},vendor/lib")
    repo.repo.git.commit("-q", "-m", "odd tree")
    rev = repo.repo.head.commit.hexsha

    dest = export_tree(repo.path, rev, tmp_path / "out")

    assert (dest / deep).read_text() == "deep"
    assert (dest / "weird name ü\n[x].txt").read_text() == "odd but legal"
    assert (dest / ".github/workflows/ci.yml").exists() and (dest / ".gitignore").exists()
    assert (dest / "a/.gitkeep").read_text() == ""
    assert os.readlink(dest / "dangling") == "/nonexistent/target"  # kept, never followed
    assert (dest / "vendor/lib").is_dir() and not any((dest / "vendor/lib").iterdir())


def test_export_tree_refuses_a_destination_that_is_a_symlink(repo: GitRepo, tmp_path: Path) -> None:
    repo.write("a.txt", "a")
    rev = repo.commit()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PlanningError, match=r"cannot export into .*/out"):
        export_tree(repo.path, rev, tmp_path / "out")
    assert list((tmp_path / "elsewhere").iterdir()) == []

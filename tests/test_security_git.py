"""Crafted Git trees (issue 9, part 1): an export never writes outside its directory or through
a link, fetches check objects, and a manifest symlinked out of the tree is never read.

The crafted trees are built as the review built them: raw tree bytes written with
`git hash-object -t tree --literally -w --stdin`, then `git commit-tree`, in real repositories.
"""

from __future__ import annotations

import os
import subprocess
import sys
from io import BytesIO
from pathlib import Path
from typing import Any

import git
import pytest
from gitdb import IStream

from bot.gitcache import GitCache, GitFetchError, Remote
from planner.gitexport import UnsafeTree
from planner.revisions import plan_revisions
from planner.source import EvalCache, PlanningError, export_tree
from tests.fakes.slack import FakeSlack
from tests.fixtures_github import ManifestRepo
from tests.test_slack_flow import start_bot

NIXMOX = Path(sys.executable).parent / "nixmox"
SECRET = "s3cret-value-from-outside-the-tree"
IDENTITY = {
    "GIT_AUTHOR_NAME": "Attacker",
    "GIT_AUTHOR_EMAIL": "a@example.invalid",
    "GIT_COMMITTER_NAME": "Attacker",
    "GIT_COMMITTER_EMAIL": "a@example.invalid",
}


def git_raw(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    """Run git in `repo`; its raw stdout."""
    done = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=stdin,
        capture_output=True,
        check=True,
        env={**os.environ, **IDENTITY},
    )
    return done.stdout


def git_out(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    return git_raw(repo, *args, stdin=stdin).decode().strip()


def blob(repo: Path, content: bytes) -> str:
    return git_out(repo, "hash-object", "-w", "--stdin", stdin=content)


def entry(mode: str, name: str, sha: str) -> bytes:
    """One raw tree entry: `MODE NAME\\0<20-byte id>`."""
    return f"{mode} {name}".encode() + b"\0" + bytes.fromhex(sha)


def raw_tree(repo: Path, data: bytes) -> str:
    """Write tree bytes as they are (Git's own checks skipped, as an attacker does)."""
    return git_out(repo, "hash-object", "-t", "tree", "--literally", "-w", "--stdin", stdin=data)


def crafted_branch(repo: Path, extra: bytes, branch: str = "evil") -> str:
    """A commit on `branch` whose tree is main's entries followed by `extra` raw entries."""
    tree = raw_tree(repo, git_raw(repo, "cat-file", "tree", "main^{tree}") + extra)
    commit = git_out(repo, "commit-tree", tree, "-p", "main", "-m", "crafted tree")
    git_out(repo, "update-ref", f"refs/heads/{branch}", commit)
    return commit


def link_then_file(repo: Path, target: Path, content: bytes, name: str = "zz") -> bytes:
    """The review's attack: a symlink `name -> target`, then a blob of the same name."""
    return entry("120000", name, blob(repo, str(target).encode())) + entry(
        "100644", name, blob(repo, content)
    )


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """A file outside every export, which no test may ever create."""
    (tmp_path / "anywhere").mkdir()
    return tmp_path / "anywhere" / "file"


def test_cli_plan_of_a_duplicate_entry_tree_writes_nothing_outside(
    manifest_repo: ManifestRepo, target: Path
) -> None:
    crafted_branch(manifest_repo.path, link_then_file(manifest_repo.path, target, b"pwned"))

    result = subprocess.run(
        [
            str(NIXMOX),
            "plan",
            "--repo",
            str(manifest_repo.path),
            "--base",
            "main",
            "--head",
            "evil",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert not target.exists()
    assert result.returncode == 2, result.stderr
    assert "the tree entry 'zz': its name appears twice in the same tree" in result.stderr
    assert "Traceback" not in result.stderr


def test_planner_api_refuses_the_duplicate_entry_tree(
    manifest_repo: ManifestRepo, target: Path
) -> None:
    evil = crafted_branch(manifest_repo.path, link_then_file(manifest_repo.path, target, b"x"))

    with pytest.raises(UnsafeTree, match=r"revision \w{12}: the tree entry 'zz': .* twice"):
        plan_revisions(manifest_repo.path, "main", "evil", cache=EvalCache())
    with pytest.raises(PlanningError, match="'zz'"):
        plan_revisions(manifest_repo.path, None, evil)
    assert not target.exists()


def test_a_symlinked_directory_then_a_tree_of_the_same_name_is_refused(
    manifest_repo: ManifestRepo, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    repo = manifest_repo.path
    sub = raw_tree(repo, entry("100644", "planted", blob(repo, b"x")))
    crafted_branch(
        repo, entry("120000", "d", blob(repo, str(outside).encode())) + entry("40000", "d", sub)
    )

    with pytest.raises(UnsafeTree, match="the tree entry 'd': its name appears twice"):
        export_tree(repo, "evil", tmp_path / "export")
    assert list(outside.iterdir()) == []


def test_two_blobs_of_the_same_name_are_refused(
    manifest_repo: ManifestRepo, tmp_path: Path
) -> None:
    repo = manifest_repo.path
    crafted_branch(
        repo, entry("100644", "zz", blob(repo, b"1")) + entry("100644", "zz", blob(repo, b"2"))
    )
    with pytest.raises(UnsafeTree, match="'zz': its name appears twice"):
        export_tree(repo, "evil", tmp_path / "export")


BAD_NAMES = [
    ("..", "names a directory itself"),
    (".", "names a directory itself"),
    ("", "has an empty name"),
    (".git", "is a .git entry"),
    (".GIT", "is a .git entry"),
    (".Git.", "is a .git entry"),
    ("GIT~1", "is a .git entry"),
    ("a/b", "holds a '/'"),
    ("/etc/cron.d/x", "holds a '/'"),
]


@pytest.mark.parametrize("nested", [False, True], ids=["top", "nested"])
@pytest.mark.parametrize(("name", "why"), BAD_NAMES, ids=[repr(n) for n, _ in BAD_NAMES])
def test_entries_that_leave_the_export_or_reach_git_are_refused_before_writing(
    manifest_repo: ManifestRepo, tmp_path: Path, name: str, why: str, nested: bool
) -> None:
    repo = manifest_repo.path
    if "/" in name:  # a path, not a name: a blob
        bad = entry("100644", name, blob(repo, b"x"))
    else:  # a directory that would hold a file outside the export or in `.git`
        bad = entry("40000", name, raw_tree(repo, entry("100644", "escaped", blob(repo, b"x"))))
    crafted_branch(repo, entry("40000", "sub", raw_tree(repo, bad)) if nested else bad)
    dest = tmp_path / "work" / "export"

    with pytest.raises(UnsafeTree) as refused:
        export_tree(repo, "evil", dest)

    rel = f"sub/{name}" if nested else name
    assert f"the tree entry {rel!r}: " in str(refused.value)
    assert why in str(refused.value)
    assert not dest.exists()  # checked before anything is written
    assert not (tmp_path / "work" / "escaped").exists()


def test_a_file_entry_that_points_at_a_tree_object_is_refused(
    manifest_repo: ManifestRepo, tmp_path: Path
) -> None:
    repo = manifest_repo.path
    tree = git_out(repo, "rev-parse", "main^{tree}")
    crafted_branch(repo, entry("100644", "zz", tree))
    with pytest.raises(UnsafeTree, match="'zz': it is a tree, not a blob"):
        export_tree(repo, "evil", tmp_path / "export")


def test_directories_nested_without_end_are_refused(
    manifest_repo: ManifestRepo, tmp_path: Path
) -> None:
    odb = git.Repo(manifest_repo.path).odb
    inner = entry("100644", "leaf", blob(manifest_repo.path, b"x"))
    for _ in range(300):
        data = inner
        inner = entry(
            "40000", "d", odb.store(IStream(b"tree", len(data), BytesIO(data))).hexsha.decode()
        )
    crafted_branch(manifest_repo.path, inner)
    with pytest.raises(UnsafeTree, match=r"'d(/d)+': directories nest deeper than 256"):
        export_tree(manifest_repo.path, "evil", tmp_path / "export")


def test_the_export_never_writes_through_a_link_already_in_its_directory(
    manifest_repo: ManifestRepo, target: Path, tmp_path: Path
) -> None:
    """Even without a crafted tree: files are created with O_EXCL|O_NOFOLLOW."""
    (manifest_repo.path / "zz").write_text("plain content")
    manifest_repo.repo.index.add(["zz"])
    manifest_repo.repo.index.commit("a plain file zz")
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "zz").symlink_to(target)

    with pytest.raises(PlanningError, match="cannot export 'zz'"):
        export_tree(manifest_repo.path, "main", dest)
    assert not target.exists()


async def test_a_fetch_refuses_a_remote_holding_a_duplicate_entry_tree(
    manifest_repo: ManifestRepo, target: Path, tmp_path: Path
) -> None:
    evil = crafted_branch(manifest_repo.path, link_then_file(manifest_repo.path, target, b"x"))
    cache = GitCache(tmp_path / "cache.git")

    with pytest.raises(GitFetchError) as refused:
        await cache.fetch(Remote(str(manifest_repo.path)), [evil], refs=["refs/heads/evil"])

    message = str(refused.value)
    assert f"could not fetch {evil[:12]}" in message
    assert "fail Git's checks (fsck)" in message and "duplicateEntries" in message
    assert not cache.has_commit(evil)
    # the honest main branch still fetches
    main = manifest_repo.repo.heads.main.commit.hexsha
    await cache.fetch(Remote(str(manifest_repo.path)), [main])
    assert cache.has_commit(main)


async def test_slack_plan_of_a_crafted_ref_is_refused_and_writes_nothing(
    aiohttp_client: Any,
    tmp_path: Path,
    fake_slack: FakeSlack,
    manifest_repo: ManifestRepo,
    target: Path,
) -> None:
    """The review's second route: a signed `/nixmox plan all --ref evil` from any member."""
    bot = await start_bot(aiohttp_client, tmp_path, fake_slack, manifest_repo)
    crafted_branch(manifest_repo.path, link_then_file(manifest_repo.path, target, b"pwned"))

    sent = await bot.driver.command("plan all --ref evil")
    assert sent.status == 200
    [response] = await fake_slack.wait_for(lambda: fake_slack.responses)
    await bot.settled()

    assert "duplicateEntries" in response.all_text()
    assert not target.exists()


def commit_link(repo: ManifestRepo, link: str, points_to: Path) -> None:
    """Commit a symlink `link` (relative to the repository) pointing at `points_to`."""
    path = repo.path / link
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(points_to)
    repo.repo.git.add(link)
    repo.repo.git.commit("-q", "-m", f"link {link}")


@pytest.mark.parametrize("suffix", ["json", "nix"])
def test_a_manifest_symlinked_out_of_the_tree_is_never_read(
    manifest_repo: ManifestRepo, tmp_path: Path, suffix: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / f"secret.{suffix}"
    if suffix == "json":
        secret.write_text(f'{{"services": {{"{SECRET}": {{"ip": "10.0.0.9"}}}}}}')
    else:
        secret.write_text(f'{{ services.x = {{ ip = "10.0.0.9"; hostname = "{SECRET}"; }}; }}')
    commit_link(manifest_repo, f"nixos/m.{suffix}", secret)

    result = subprocess.run(
        [
            str(NIXMOX),
            "plan",
            "--repo",
            str(manifest_repo.path),
            "--head",
            "main",
            "--manifest",
            f"nixos/m.{suffix}",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1, result.stderr
    output = result.stdout + result.stderr
    assert "symbolic link (or lies under one) leading out of the tree" in output
    assert f"nixos/m.{suffix}" in output
    assert SECRET not in output
    assert str(outside) not in output


def test_a_manifest_under_a_symlinked_directory_out_of_the_tree_is_refused(
    manifest_repo: ManifestRepo, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "m.json").write_text(f'{{"network": {{"domain": "{SECRET}"}}}}')
    commit_link(manifest_repo, "conf", outside)

    commit_link(manifest_repo, "nixos/gone.json", outside / "missing.json")

    plan = plan_revisions(manifest_repo.path, None, "main", manifest_path="conf/m.json")
    missing = plan_revisions(manifest_repo.path, None, "main", manifest_path="nixos/gone.json")

    assert not plan.ok and not missing.ok
    text = "\n".join(f.render() for f in plan.errors)
    assert "leading out of the tree" in text and SECRET not in text
    # a missing target says the same: the bot's files cannot be probed this way
    assert [f.message.split(": ", 1)[1] for f in missing.errors] == [
        f.message.split(": ", 1)[1] for f in plan.errors
    ]


def test_a_manifest_symlinked_inside_the_tree_still_works(manifest_repo: ManifestRepo) -> None:
    commit_link(manifest_repo, "nixos/link.nix", Path("service-manifest.nix"))
    plan = plan_revisions(manifest_repo.path, None, "main", manifest_path="nixos/link.nix")
    assert plan.ok, [f.render() for f in plan.errors]
    assert {step.service for step in plan.steps} >= {"gitea", "postgresql"}

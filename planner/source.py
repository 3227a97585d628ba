"""Reading manifests: the planner's only I/O (Nix evaluation, JSON files, Git revisions)."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from planner.errors import PlanningError as PlanningError  # re-exported: callers import it here
from planner.findings import Finding, ManifestError, error
from planner.gitexport import GIT_MODE_SYMLINK, read_checked_tree, write_tree
from planner.models import Manifest
from planner.nesting import TooDeep, loads_bounded
from planner.perf import gc_paused
from planner.positions import (
    POSITIONS_NIX,
    apply_positions,
    parse_positions,
    positions_input,
    wanted_paths,
)

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
DEFAULT_MEMORY_LIMIT = 2 * 1024 * 1024 * 1024
NIX_ERROR_LINES = 40
MANIFEST_LEAVES_TREE = "the manifest is a symbolic link (or lies under one) leading out of the tree"
MANIFEST_LEAVES_TREE_HINT = "commit the manifest itself, or a link to a file inside the repository"


@dataclass(frozen=True)
class EvalLimits:
    """Bounds for one Nix evaluation of an untrusted manifest."""

    timeout: float = DEFAULT_TIMEOUT
    max_output: int = DEFAULT_MAX_OUTPUT
    memory_limit: int = DEFAULT_MEMORY_LIMIT


def nix_command(path: Path, include_dir: Path, *more_includes: Path) -> list[str]:
    """The restricted, no-build evaluation command for a manifest."""
    includes = [arg for extra in more_includes for arg in ("-I", str(extra))]
    return [
        "nix-instantiate",
        "--eval",
        "--strict",
        "--json",
        "--option",
        "restrict-eval",
        "true",
        "--option",
        "allow-import-from-derivation",
        "false",
        "-I",
        str(include_dir),
        *includes,
        str(path),
    ]


def _limit_child(limits: EvalLimits) -> None:
    """Runs in the evaluator child: bound memory and output size."""
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_limit, limits.memory_limit))
    cap = limits.max_output + 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))


def _scrubbed_env(home: str) -> dict[str, str]:
    """The evaluator sees no secrets of ours: only PATH and a throwaway HOME."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "NIX_PATH": ""}


def _nix_error(stderr: str, path: Path) -> str:
    """Nix's own message (with file:line:column), trimmed to something readable."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("warning: ")]
    lines = [line for line in lines if "--show-trace" not in line]
    if lines and lines[0].startswith("error: "):
        lines[0] = lines[0].removeprefix("error: ")
    if not lines:
        return f"nix-instantiate failed on {path} without a message"
    return "\n".join(lines[:NIX_ERROR_LINES])


def _run_to_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for `proc` with a deadline and return its exit status; kill it past the deadline.

    `Popen.wait(timeout)` polls with sleeps that double up to 50 ms, which adds up to 30 ms to
    a 35 ms evaluation; a pidfd (Linux >= 5.3) wakes the moment the child exits.
    """
    try:
        exited = _pidfd_wait(proc.pid, timeout)
    except OSError:  # no pidfd here (old kernel, other OS): Python's polling wait
        exited = None
    try:
        if exited is False:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _pidfd_wait(pid: int, timeout: float) -> bool:
    """Whether process `pid` exited within `timeout` seconds, woken by its pidfd."""
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


def evaluate_nix(
    path: Path,
    include_dir: Path | None = None,
    limits: EvalLimits | None = None,
    *more_includes: Path,
) -> Any:
    """Evaluate a `.nix` manifest to JSON in restricted mode; never parse partial output."""
    limits = limits or EvalLimits()
    path = path.resolve()
    include_dir = (include_dir or path.parent).resolve()
    with tempfile.TemporaryDirectory(prefix="nixmox-eval-") as tmp:
        out_path, err_path = Path(tmp, "out.json"), Path(tmp, "err.txt")
        with out_path.open("wb") as out, err_path.open("wb") as err:
            try:
                returncode = _run_to_exit(
                    subprocess.Popen(
                        nix_command(path, include_dir, *more_includes),
                        stdout=out,
                        stderr=err,
                        stdin=subprocess.DEVNULL,
                        env=_scrubbed_env(tmp),
                        cwd=tmp,
                        preexec_fn=lambda: _limit_child(limits),
                    ),
                    limits.timeout,
                )
            except FileNotFoundError as exc:
                raise _eval_failure(
                    "nix-instantiate is not installed",
                    "install Nix (Debian: apt-get install nix-bin) or run ./dev run",
                    EvaluatorMissing,
                ) from exc
            except subprocess.TimeoutExpired as exc:
                raise _eval_failure(
                    f"evaluating {path.name} took longer than {limits.timeout:g} s",
                    "look for infinite recursion or very large generated lists",
                    EvaluationTimeout,
                ) from exc
        # the kernel stops a write past RLIMIT_FSIZE with SIGXFSZ before anything is written
        if out_path.stat().st_size > limits.max_output or returncode == -signal.SIGXFSZ:
            raise _eval_failure(
                f"evaluating {path.name} printed more than {limits.max_output} bytes",
                "a manifest should describe services, not generate huge data",
            )
        if returncode != 0:
            message = _nix_error(err_path.read_text(errors="replace"), path)
            raise _eval_failure(message, "fix the Nix error above (file:line:column)")
        return parse_json(out_path.read_bytes(), path.name)


def _eval_failure(
    message: str, hint: str, kind: type[ManifestError] = ManifestError
) -> ManifestError:
    return kind([error("evaluation", message, hint=hint)], evaluation_failed=True)


def _stays_inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink followed, is under `root` (a loop is not)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def read_manifest_data(
    path: Path, include_dir: Path | None = None, limits: EvalLimits | None = None
) -> Any:
    """Raw manifest data from a `.nix` (evaluated) or `.json` file.

    With `include_dir` (a repository tree), a manifest reached through a symlink that leads
    out of that tree is refused: its content is never read.
    """
    if include_dir is not None and not _stays_inside(path, include_dir.resolve()):
        raise _eval_failure(MANIFEST_LEAVES_TREE, MANIFEST_LEAVES_TREE_HINT)
    if not path.exists():
        raise _eval_failure(f"{path} does not exist", "check the manifest path")
    if path.suffix == ".json":
        return parse_json(path.read_bytes(), path.name)
    return evaluate_nix(path, include_dir, limits)


def parse_json(raw: bytes, name: str) -> Any:
    """Manifest data from JSON text (a `.json` file or Nix's output), nesting bounded."""
    try:
        return loads_bounded(raw)
    except TooDeep as exc:
        raise ManifestError([_too_deep_finding(exc)]) from None
    except UnicodeDecodeError as exc:
        raise _eval_failure(
            f"{name}: byte {exc.start} is not UTF-8", "save the manifest as UTF-8"
        ) from None
    except json.JSONDecodeError as exc:
        raise _eval_failure(
            f"{name}:{exc.lineno}:{exc.colno}: {exc.msg}", "fix the JSON syntax"
        ) from None


def _too_deep_finding(exc: TooDeep) -> Finding:
    parts = exc.path.split(".")
    in_service = len(parts) > 1 and parts[0] in ("services", "core_services")
    return error(
        "too-deep",
        f"nested deeper than {exc.limit} levels",
        service=parts[1].split("[")[0] if in_service else None,
        field=exc.path,
        hint=f"a manifest holds at most {exc.limit} levels of attribute sets and lists",
    )


def parse_manifest(data: Any, file: str | None = None) -> Manifest:
    """Validate raw data against the schema; type errors become findings with their paths."""
    if not isinstance(data, dict):
        raise ManifestError(
            [
                error(
                    "not-an-attrset",
                    f"the manifest evaluates to {type(data).__name__}, not an attribute set",
                    hint="the file must evaluate to { network = ...; core_services = ...; services = ...; }",
                ).model_copy(update={"file": file})
            ]
        )
    try:
        with gc_paused():
            return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(
            [
                _type_finding(item, file)
                for item in exc.errors(include_url=False, include_input=False)
            ]
        ) from None


def _type_finding(item: Any, file: str | None) -> Any:
    loc = [str(part) for part in item["loc"]]
    service = loc[1] if len(loc) > 1 and loc[0] in ("services", "core_services") else None
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"])
    field = field.removeprefix(".")
    return error(
        "type",
        item["msg"],
        service=service,
        field=field,
        hint=f"give {field} a value of the right type",
    ).model_copy(update={"file": file})


def load_manifest(
    path: Path | str, include_dir: Path | None = None, limits: EvalLimits | None = None
) -> Manifest:
    """Read, evaluate and parse a manifest file."""
    path = Path(path)
    try:
        return parse_manifest(read_manifest_data(path, include_dir, limits), path.name)
    except ManifestError as exc:
        for finding in exc.findings:
            finding.file = finding.file or path.name
        raise


def locate(
    findings: list[Finding],
    manifest: Path,
    root: Path | None = None,
    limits: EvalLimits | None = None,
) -> None:
    """Give findings the file:line:column of their fields (`builtins.unsafeGetAttrPos`, in
    restricted mode like the manifest itself); files are named relative to `root`.

    Best effort: a manifest that cannot be evaluated again leaves the findings as they are.
    """
    paths = wanted_paths(findings)
    if not paths or manifest.suffix != ".nix" or not manifest.is_file():
        return
    root = (root or manifest.parent).resolve()
    with tempfile.TemporaryDirectory(prefix="nixmox-positions-") as tmp:
        query = Path(tmp, "positions.nix")
        query.write_text(POSITIONS_NIX)
        Path(tmp, "positions.json").write_text(json.dumps(positions_input(manifest, paths)))
        try:
            answer = evaluate_nix(query, root, limits, Path(tmp))
        except ManifestError:
            return
    apply_positions(findings, parse_positions(answer, paths, root))


# --- Git revisions ------------------------------------------------------------------------

DEFAULT_MANIFEST_PATH = "nixos/service-manifest.nix"
REPO_CONFIG_FILE = ".nixmox.toml"
DEFAULT_CACHE_SIZE = 32


class UnknownRevision(PlanningError):
    """A ref or commit id that the repository does not have."""


class EvaluationTimeout(ManifestError, PlanningError):
    """Nix ran out of time: the bot's failure (exit 2 in the CLI), not a manifest finding."""


class EvaluatorMissing(ManifestError, PlanningError):
    """nix-instantiate is not installed on the bot's machine."""


def _open_repo(repo_dir: Path | str) -> Any:
    """The gitpython Repo at `repo_dir` (bare or not); a planning error when it is not one."""
    import git

    try:
        return git.Repo(repo_dir)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise PlanningError(f"{repo_dir} is not a Git repository") from exc


def _commit(repo: Any, ref: str) -> Any:
    """The commit a ref, tag or (abbreviated) commit id names."""
    import git

    if not ref or ref.startswith("-"):
        raise UnknownRevision(f"not a revision: {ref!r}")
    try:
        obj = repo.rev_parse(ref)
        repo.odb.info(obj.binsha)  # a full-length id parses without existing: look it up
        while obj.type == "tag":
            obj = obj.object
    except (git.BadName, git.BadObject, ValueError, git.GitCommandError) as exc:
        raise UnknownRevision(f"unknown revision {ref!r} in {repo.git_dir}") from exc
    if obj.type != "commit":
        raise UnknownRevision(f"{ref!r} names a {obj.type}, not a commit")
    return obj


def resolve_revision(repo_dir: Path | str, ref: str) -> str:
    """The full commit id that `ref` names (branch, tag, abbreviated id, `HEAD~1`, ...)."""
    return str(_commit(_open_repo(repo_dir), ref).hexsha)


def tree_id(repo_dir: Path | str, rev: str) -> str:
    """The id of a revision's root tree: equal trees evaluate to equal manifests."""
    return str(_commit(_open_repo(repo_dir), rev).tree.hexsha)


def changed_files(repo_dir: Path | str, base: str, head: str) -> list[str]:
    """Paths added, removed, modified or renamed (both names) between two revisions, sorted."""
    import git

    repo = _open_repo(repo_dir)
    base_commit, head_commit = _commit(repo, base), _commit(repo, head)
    try:
        diffs = base_commit.diff(head_commit)
    except git.GitCommandError as exc:
        raise PlanningError(f"git diff {base}..{head} failed: {exc.stderr.strip()}") from exc
    paths = {path for item in diffs for path in (item.a_path, item.b_path) if path}
    return sorted(paths)


def export_tree(repo_dir: Path | str, rev: str, dest: Path) -> Path:
    """Write a revision's whole tree (files, executable bits, symlinks) into `dest`.

    Reads Git objects only: the working copy and the index are never touched. Every entry is
    checked first (no `..`, `/`, `.git` or duplicate names); files are then created relative
    to directory descriptors, never through a symlink and never over an existing file.
    """
    repo = _open_repo(repo_dir)
    commit = _commit(repo, rev)
    entries = read_checked_tree(repo, commit.hexsha, commit.tree.binsha)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    write_tree(repo, commit.hexsha, entries, dest)
    return dest


def read_file_at(repo_dir: Path | str, rev: str, path: str) -> bytes | None:
    """One file's content at a revision, or None when the revision has no such file."""
    commit = _commit(_open_repo(repo_dir), rev)
    try:
        blob = commit.tree / path
    except KeyError:
        return None
    if blob.type != "blob":
        return None
    return bytes(blob.data_stream.read())


class EvalCache:
    """Evaluated manifests by (root tree id, manifest path): re-planning a seen tree is free.

    In-memory and least-recently-used; a bot process shares one across requests. Failed
    evaluations are kept too (the same tree fails the same way), timeouts are not.
    """

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        from collections import OrderedDict

        self.size = size
        self._lock = threading.Lock()  # base and head are evaluated in parallel
        self._items: OrderedDict[tuple[str, str], Manifest | ManifestError] = OrderedDict()
        # analyses of the manifests handed out (never mutate a cached manifest)
        from planner.plan.changes import AnalysisMemo  # diff planning only: not for a full plan

        self.analyses = AnalysisMemo(size)
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str]) -> Manifest | ManifestError | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return found

    def put(self, key: tuple[str, str], value: Manifest | ManifestError) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _check_manifest_path(manifest_path: str) -> str:
    """A relative path inside the repository (no `..`, not absolute)."""
    parts = Path(manifest_path).parts
    if not parts or Path(manifest_path).is_absolute() or ".." in parts:
        raise PlanningError(f"the manifest path {manifest_path!r} must be relative to the repo")
    return Path(manifest_path).as_posix()


def load_manifest_at(
    repo_dir: Path | str,
    rev: str,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    *,
    limits: EvalLimits | None = None,
    cache: EvalCache | None = None,
) -> Manifest:
    """The manifest as it is at `rev`, evaluated from an exported copy of that revision's tree.

    Raises ManifestError for problems in the manifest (missing, Nix error, wrong types) and
    PlanningError for failures of the bot (unknown revision, Git, evaluation timeout).
    """
    manifest_path = _check_manifest_path(manifest_path)
    repo = _open_repo(repo_dir)
    commit = _commit(repo, rev)
    key = (str(commit.tree.hexsha), manifest_path)
    cached = cache.get(key) if cache is not None else None
    if cached is None:
        cached = _evaluate_at(repo_dir, commit.hexsha, manifest_path, limits)
        if cache is not None:
            cache.put(key, cached)
    if isinstance(cached, ManifestError):
        raise ManifestError(cached.findings, evaluation_failed=cached.evaluation_failed)
    return cached


def locate_at(
    repo_dir: Path | str,
    rev: str,
    manifest_path: str,
    findings: list[Finding],
    limits: EvalLimits | None = None,
) -> None:
    """`locate` in an exported copy of `rev`: files named by their path in the repository."""
    if not wanted_paths(findings):
        return
    manifest_path = _check_manifest_path(manifest_path)
    with tempfile.TemporaryDirectory(prefix="nixmox-tree-") as tmp:
        root = export_tree(repo_dir, rev, Path(tmp))
        locate(findings, root / manifest_path, root, limits)


def _evaluate_at(
    repo_dir: Path | str, rev: str, manifest_path: str, limits: EvalLimits | None
) -> Manifest | ManifestError:
    """Export the tree to a temporary directory and evaluate the manifest there."""
    with tempfile.TemporaryDirectory(prefix="nixmox-tree-") as tmp:
        root = export_tree(repo_dir, rev, Path(tmp)).resolve()
        path = root / manifest_path
        if not _stays_inside(path, root):  # before any stat: nothing outside is even probed
            return _eval_failure(
                f"{manifest_path} at revision {rev[:12]}: {MANIFEST_LEAVES_TREE}",
                MANIFEST_LEAVES_TREE_HINT,
            )
        if not path.is_file():
            return _eval_failure(
                f"{manifest_path} does not exist at revision {rev[:12]}",
                "check the manifest path (--manifest, NIXMOX_MANIFEST_PATH)",
            )
        try:
            return load_manifest(path, include_dir=root, limits=limits)
        except PlanningError:
            raise
        except ManifestError as exc:
            for finding in exc.findings:
                if finding.file == path.name:
                    finding.file = manifest_path
                # Nix names the temporary copy; say the path in the repository instead
                finding.message = finding.message.replace(f"{root}/", "")
            return exc


def directory_reader(
    repo_dir: Path | str, rev: str, suffixes: tuple[str, ...]
) -> Callable[[str], dict[str, str]]:
    """A function: directory -> {path: text} of its files ending in `suffixes`, at `rev`.

    Only the files directly in the directory (a terraform module is one directory); a missing
    directory reads as empty. Opens the repository once for every directory asked for.
    """
    tree = _commit(_open_repo(repo_dir), rev).tree

    def read(directory: str) -> dict[str, str]:
        try:
            folder = tree / directory if directory else tree
        except KeyError:
            return {}
        if folder.type != "tree":
            return {}
        return {
            blob.path: blob.data_stream.read().decode("utf-8", "replace")
            for blob in folder.blobs
            if blob.name.endswith(suffixes) and blob.mode != GIT_MODE_SYMLINK
        }

    return read


def read_files_at(repo_dir: Path | str, rev: str, paths: list[str]) -> dict[str, str]:
    """The text of each of `paths` that exists as a file at `rev` (missing ones left out)."""
    tree = _commit(_open_repo(repo_dir), rev).tree
    found: dict[str, str] = {}
    for path in paths:
        try:
            blob = tree / path
        except KeyError:
            continue
        if blob.type == "blob":
            found[path] = blob.data_stream.read().decode("utf-8", "replace")
    return found

"""Planning between two Git revisions: the entry point the bots and the CLI call.

I/O goes through `planner.source` (Git objects, Nix evaluation), logic through
`planner.plan.changes.plan_changes`.
"""

from __future__ import annotations

import posixpath
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from planner.diff import PathsConfig, is_ignored
from planner.findings import Finding, ManifestError, error, warning
from planner.models import Manifest
from planner.perf import gc_paused
from planner.plan import Plan, PlanOptions, invalid_plan
from planner.plan.changes import NOTE_BASE_INVALID, plan_changes
from planner.source import (
    DEFAULT_MANIFEST_PATH,
    REPO_CONFIG_FILE,
    EvalCache,
    EvalLimits,
    PlanningError,
    changed_files,
    directory_reader,
    load_manifest_at,
    locate_at,
    read_file_at,
    read_files_at,
    resolve_revision,
)
from planner.tfmodules import (
    MODULE_SUFFIXES,
    ModuleGraph,
    build_module_graph,
    may_concern_modules,
    parse_module_calls,
    root_directories,
)


class RepoConfigError(ValueError):
    """`.nixmox.toml` at the head revision is not valid."""


def load_paths_config(repo_dir: Path | str, rev: str) -> PathsConfig:
    """`[paths]` of the revision's `.nixmox.toml` (defaults when the file is absent)."""
    raw = read_file_at(repo_dir, rev, REPO_CONFIG_FILE)
    if raw is None:
        return PathsConfig()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
        return PathsConfig.from_toml(data)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise RepoConfigError(str(exc)) from exc


def plan_revisions(
    repo_dir: Path | str,
    base: str | None,
    head: str,
    *,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    service: str | None = None,
    options: PlanOptions | None = None,
    cache: EvalCache | None = None,
    limits: EvalLimits | None = None,
) -> Plan:
    """The plan of what going from `base` to `head` needs (`base=None`: a full deployment).

    An invalid head manifest (Nix error, wrong types, validation) gives a Plan carrying the
    errors. An unusable base gives the full plan of head, saying so. Only the bot's own
    failures raise `planner.source.PlanningError` (Git, unknown revision, evaluation timeout).
    """
    head_rev = resolve_revision(repo_dir, head)
    plan = _plan_revisions(repo_dir, base, head_rev, manifest_path, service, options, cache, limits)
    if plan.errors:
        # errors are rare: only then is the head evaluated again, for file:line:column
        locate_at(repo_dir, head_rev, manifest_path, [*plan.errors, *plan.warnings], limits)
    return plan


def _plan_revisions(
    repo_dir: Path | str,
    base: str | None,
    head_rev: str,
    manifest_path: str,
    service: str | None,
    options: PlanOptions | None,
    cache: EvalCache | None,
    limits: EvalLimits | None,
) -> Plan:
    with gc_paused():
        base_rev = resolve_revision(repo_dir, base) if base is not None else None
        revs = [head_rev] if base_rev is None else [head_rev, base_rev]
        loaded = load_manifests(repo_dir, revs, manifest_path, limits, cache)
        head_manifest = loaded[0]
        if isinstance(head_manifest, ManifestError):
            return invalid_plan(head_manifest.findings, base=base_rev, head=head_rev)
        try:
            paths_config = load_paths_config(repo_dir, head_rev)
        except RepoConfigError as exc:
            return invalid_plan([repo_config_finding(exc)], base=base_rev, head=head_rev)
        if base_rev is None:
            return plan_changes(
                None, head_manifest, service=service, options=options, head_rev=head_rev
            )
        base_manifest = loaded[1]
        usable = None if isinstance(base_manifest, ManifestError) else base_manifest
        files = changed_files(repo_dir, base_rev, head_rev)
        modules = None
        if usable is not None:
            modules = read_module_graph(
                repo_dir, (base_rev, head_rev), head_manifest, paths_config, options, files
            )
        plan = plan_changes(
            usable,
            head_manifest,
            changed_files=files,
            paths_config=paths_config,
            service=service,
            options=options,
            base_rev=base_rev,
            head_rev=head_rev,
            manifest_path=manifest_path,
            memo=cache.analyses if cache is not None else None,
            modules=modules,
        )
        if isinstance(base_manifest, ManifestError) and plan.ok:
            findings = base_manifest.findings
            plan = mark_base_unusable(plan, findings[0].render() if findings else "no detail")
        return plan


def read_module_graph(
    repo_dir: Path | str,
    revs: tuple[str, str],
    head: Manifest,
    paths_config: PathsConfig,
    options: PlanOptions | None,
    files: list[str],
) -> ModuleGraph | None:
    """The head's terraform module graph, when a changed file may concern a module (else None).

    Reads the roots' `.tf` files at head and follows local sources; the changed `.tf` files of
    those directories are also parsed at base, so a registry `version` or Git `ref` bump names
    itself in the reason.
    """
    options = options or PlanOptions()
    roots = root_directories(
        head,
        paths_config.infra_root or options.infra_root,
        paths_config.auth_root or options.auth_root,
    )
    relevant = [path for path in files if not is_ignored(path, paths_config)]
    if not roots or not may_concern_modules(relevant, roots):
        return None  # the common case costs nothing: no parser import, no Git reads
    base_rev, head_rev = revs
    graph = build_module_graph(roots, directory_reader(repo_dir, head_rev, MODULE_SUFFIXES))
    unparsed = {problem.file for found in graph.problems.values() for problem in found}
    in_graph = [
        path
        for path in relevant
        if path.endswith(MODULE_SUFFIXES)
        and posixpath.dirname(path) in graph.calls
        and path not in unparsed
    ]
    at_base = read_files_at(repo_dir, base_rev, in_graph)
    for path in in_graph:
        try:
            graph.base_calls[path] = parse_module_calls(path, at_base.get(path, ""))
        except ValueError:
            continue  # unparseable at base: the head's calls alone say nothing of a bump
    return graph


def load_manifests(
    repo_dir: Path | str,
    revs: list[str],
    manifest_path: str,
    limits: EvalLimits | None,
    cache: EvalCache | None,
) -> list[Manifest | ManifestError]:
    """The manifests at several revisions, evaluated in parallel (Nix runs outside the GIL).

    Problems in a manifest come back as its ManifestError; the bot's own failures
    (PlanningError: timeout, Git) raise.
    """

    def load(rev: str) -> Manifest | ManifestError:
        try:
            return load_manifest_at(repo_dir, rev, manifest_path, limits=limits, cache=cache)
        except PlanningError:
            raise
        except ManifestError as exc:
            return exc

    if len(revs) == 1:
        return [load(revs[0])]
    with ThreadPoolExecutor(max_workers=len(revs), thread_name_prefix="nixmox-eval") as pool:
        return list(pool.map(load, revs))


def repo_config_finding(exc: RepoConfigError) -> Finding:
    return error(
        "repo-config",
        f"{REPO_CONFIG_FILE} is invalid: {exc}",
        field="paths",
        hint="[paths] takes `global = [globs]` and `<service> = [globs]`",
    ).model_copy(update={"file": REPO_CONFIG_FILE})


def mark_base_unusable(plan: Plan, why: str) -> Plan:
    """Say on a full plan that it is one because the base manifest could not be read."""
    note = NOTE_BASE_INVALID.format(why=why)
    found = warning("base-invalid", note, hint="fix the manifest on the base branch")
    return plan.model_copy(update={"note": note, "warnings": [found, *plan.warnings]})

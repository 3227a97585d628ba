"""Planning between two Git revisions: the entry point the bots and the CLI call.

I/O goes through `planner.source` (Git objects, Nix evaluation), logic through
`planner.plan.plan_changes`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from planner.diff import PathsConfig
from planner.findings import ManifestError, error, warning
from planner.plan import NOTE_BASE_INVALID, Plan, PlanOptions, invalid_plan, plan_changes
from planner.source import (
    DEFAULT_MANIFEST_PATH,
    REPO_CONFIG_FILE,
    EvalCache,
    EvalLimits,
    PlanningError,
    changed_files,
    load_manifest_at,
    read_file_at,
    resolve_revision,
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
    base_rev = resolve_revision(repo_dir, base) if base is not None else None
    try:
        head_manifest = load_manifest_at(
            repo_dir, head_rev, manifest_path, limits=limits, cache=cache
        )
    except PlanningError:
        raise  # a timeout is the bot's failure, not a finding about the manifest
    except ManifestError as exc:
        return invalid_plan(exc.findings, base=base_rev, head=head_rev)
    try:
        paths_config = load_paths_config(repo_dir, head_rev)
    except RepoConfigError as exc:
        finding = error(
            "repo-config",
            f"{REPO_CONFIG_FILE} is invalid: {exc}",
            field="paths",
            hint="[paths] takes `global = [globs]` and `<service> = [globs]`",
        ).model_copy(update={"file": REPO_CONFIG_FILE})
        return invalid_plan([finding], base=base_rev, head=head_rev)
    if base_rev is None:
        return plan_changes(
            None, head_manifest, service=service, options=options, head_rev=head_rev
        )
    files = changed_files(repo_dir, base_rev, head_rev)
    base_problem: str | None = None
    try:
        base_manifest = load_manifest_at(
            repo_dir, base_rev, manifest_path, limits=limits, cache=cache
        )
    except PlanningError:
        raise
    except ManifestError as exc:
        base_manifest = None
        base_problem = exc.findings[0].render() if exc.findings else "it did not evaluate"
    plan = plan_changes(
        base_manifest,
        head_manifest,
        changed_files=files,
        paths_config=paths_config,
        service=service,
        options=options,
        base_rev=base_rev,
        head_rev=head_rev,
        manifest_path=manifest_path,
        memo=cache.analyses if cache is not None else None,
    )
    if base_problem is not None and plan.ok:
        plan = mark_base_unusable(plan, base_problem)
    return plan


def mark_base_unusable(plan: Plan, why: str) -> Plan:
    """Say on a full plan that it is one because the base manifest could not be read."""
    note = NOTE_BASE_INVALID.format(why=why)
    found = warning("base-invalid", note, hint="fix the manifest on the base branch")
    return plan.model_copy(update={"note": note, "warnings": [found, *plan.warnings]})

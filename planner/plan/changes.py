"""Diff-aware planning: the plan of exactly what going from a base to a head manifest needs.

A change selects steps of the head's full plan, each with the reasons that caused it; each
selected step then needs its nearest selected ancestors in the full plan (computed on demand
by FullPlanNeeds), which keeps the full plan's order. Removals add `tf:destroy` steps, which
no plan of the head contains.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from planner.diff import (
    DiffKind,
    FileHit,
    ManifestDiff,
    PathsConfig,
    ServiceDiff,
    diff_manifests,
    dump,
    field_effects,
    match_files,
    root_effects,
)
from planner.findings import warning
from planner.models import Manifest
from planner.plan import full
from planner.plan.destroys import destroy_before_reuse, destroy_steps, replacements
from planner.plan.files import explain_files, unparseable_roots
from planner.plan.model import (
    Change,
    ChangeKind,
    Phase,
    Plan,
    PlanOptions,
    Step,
    finalize,
    invalid_plan,
    manifest_digest,
    step_id,
)
from planner.plan.selection import (
    ChangeContext,
    Selection,
    apply_effects,
    hit_services,
    keep_only,
    reverify_dependents,
    select_added,
    select_global,
    select_removed,
)
from planner.tfmodules import ModuleGraph

NOTE_SAME_MANIFEST = "the manifest evaluates to the same services and settings"
NOTE_NO_FILES = "no changed file belongs to a service"
NOTE_DISABLED_ONLY = "only disabled services changed ({names})"
NOTE_BASE_INVALID = "the base manifest could not be used ({why}); this is the full plan of head"
ANALYSIS_MEMO_SIZE = 8


class AnalysisMemo:
    """Analyses of manifest objects already seen (a bot re-plans the same revisions).

    Keyed by object identity, so only hand it manifests that are not mutated afterwards, such
    as those `planner.source.EvalCache` returns (it owns one of these for that reason).
    """

    def __init__(self, size: int = ANALYSIS_MEMO_SIZE) -> None:
        self.size = size
        # id -> (the manifest, kept alive so its id stays its own; analysis; errors only?)
        self._items: dict[int, tuple[Manifest, full.Analysis, bool]] = {}
        self._dumps: dict[int, tuple[Manifest, dict[str, Any]]] = {}

    def analyse(self, manifest: Manifest, *, warnings: bool = True) -> full.Analysis:
        """The manifest's analysis; `warnings=False` may skip the warning checks (base)."""
        found = self._items.pop(id(manifest), None)
        if found is None or found[0] is not manifest or (warnings and found[2]):
            analysis = full.analyse(manifest) if warnings else full.analyse_errors(manifest)
            found = (manifest, analysis, not warnings)
        self._items[id(manifest)] = found
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))
        return found[1]

    def dump(self, manifest: Manifest) -> dict[str, Any]:
        """The manifest's JSON-like data for the diff (a base was usually a head before)."""
        found = self._dumps.pop(id(manifest), None)
        if found is None or found[0] is not manifest:
            found = (manifest, dump(manifest))
        self._dumps[id(manifest)] = found
        while len(self._dumps) > self.size:
            self._dumps.pop(next(iter(self._dumps)))
        return found[1]


def changes_of(diff: ManifestDiff) -> list[Change]:
    """The JSON `changes` list: per service, and one global entry (`service: null`)."""
    changes = [
        Change(service=item.service, kind=ChangeKind(item.kind.value), fields=list(item.fields))
        for item in diff.services
    ]
    if diff.global_fields:
        changes.append(
            Change(service=None, kind=ChangeKind.CHANGED, fields=list(diff.global_fields))
        )
    return changes


def empty_note(diff: ManifestDiff, files: list[str], service: str | None) -> str:
    """Why a change needs no deployment, in plain words."""
    if service is not None and (not diff.empty or files):
        return f"nothing that {service} needs has changed"
    parts: list[str] = []
    if diff.empty:
        parts.append(NOTE_SAME_MANIFEST + " (only comments or formatting changed, if anything)")
    else:
        names = ", ".join(sorted({item.service for item in diff.services}))
        parts.append(NOTE_DISABLED_ONLY.format(names=names))
    if files:
        count = len(files)
        parts.append(f"{NOTE_NO_FILES} ({count} file{'s' if count != 1 else ''} changed)")
    return "; ".join(parts)


def plan_changes(
    base: Manifest | None,
    head: Manifest,
    *,
    changed_files: Iterable[str] = (),
    paths_config: PathsConfig | None = None,
    service: str | None = None,
    options: PlanOptions | None = None,
    base_rev: str | None = None,
    head_rev: str | None = None,
    manifest_path: str | None = None,
    memo: AnalysisMemo | None = None,
    modules: ModuleGraph | None = None,
) -> Plan:
    """The plan of exactly what going from `base` to `head` needs (pure; no base: full plan).

    `changed_files` are repository paths changed between the revisions; `manifest_path` (the
    manifest file itself) is left to the semantic diff. `modules` (the head's terraform module
    graph) makes a file under a module directory count for every root using it. An invalid
    head gives a plan carrying the errors; an invalid base gives the full plan of head, with a
    warning saying so.
    """
    changed = list(dict.fromkeys(changed_files))
    plan, hits = _plan_changes(
        base,
        head,
        files=[path for path in changed if path != manifest_path],
        paths_config=paths_config,
        service=service,
        options=options or PlanOptions(),
        base_rev=base_rev,
        head_rev=head_rev or manifest_digest(head),
        memo=memo or AnalysisMemo(),
        modules=modules,
    )
    if hits is not None:  # a diff was planned (not a full plan)
        plan.files = explain_files(changed, manifest_path, hits, plan.steps, paths_config, service)
    return plan


def _plan_changes(
    base: Manifest | None,
    head: Manifest,
    *,
    files: list[str],
    paths_config: PathsConfig | None,
    service: str | None,
    options: PlanOptions,
    base_rev: str | None,
    head_rev: str,
    memo: AnalysisMemo,
    modules: ModuleGraph | None,
) -> tuple[Plan, list[FileHit] | None]:
    if base is None:
        return full_plan_as_change(head, service, options, base_rev, head_rev), None
    analysis = memo.analyse(head)
    if analysis.errors:
        return invalid_plan(analysis.findings, base=base_rev, head=head_rev), None
    base_analysis = memo.analyse(base, warnings=False)
    if base_analysis.errors:
        why = f"{len(base_analysis.errors)} validation error(s), first: "
        why += base_analysis.errors[0].render()
        plan = full_plan_as_change(head, service, options, base_rev, head_rev, base_problem=why)
        return plan, None
    if service is not None:
        full.check_service(analysis, service)

    diff = diff_manifests(base, head, base_data=memo.dump(base), head_data=memo.dump(head))
    provider = full.auth_provider(head, options)
    sel = Selection(head, provider)
    ctx = ChangeContext(base, head, options, provider)
    needs_full = select_global(sel, ctx, diff.global_fields)
    removed: list[ServiceDiff] = []
    for change in diff.services:
        if change.kind is DiffKind.REMOVED:
            removed.append(change)
            select_removed(sel, ctx, change)
        elif change.kind is DiffKind.ADDED:
            select_added(sel, ctx, change)
        elif change.enabled_in_head:
            for path in change.fields:
                apply_effects(
                    sel, ctx, change.service, field_effects(path), change.path(path), path
                )
    hits = match_files(
        files,
        head,
        paths_config,
        infra_root=options.infra_root,
        auth_root=options.auth_root,
        modules=modules,
    )
    warnings = list(analysis.warnings)
    if modules is not None:
        roots = root_effects(head, paths_config, options.infra_root, options.auth_root)
        fallback, unparseable = unparseable_roots(modules, roots)
        hits.extend(fallback)
        warnings.extend(unparseable)
    for hit in hits:
        for name in [hit.service] if hit.service else hit_services(sel, ctx, hit):
            apply_effects(sel, ctx, name, hit.effects, hit.reason)
    reverify_dependents(sel, analysis.graph)
    if service is not None:
        removed = []  # a one-service plan never destroys other services
        keep_only(sel, full.required_services(analysis, service))

    steps = selected_steps(sel, analysis, options, needs_full)
    replaced = replacements(ctx, diff, removed)
    steps.update(destroy_steps(steps, removed, base_analysis.graph, replaced))
    destroy_before_reuse(steps, sel, replaced)
    plan = finalize(
        steps,
        base=base_rev,
        head=head_rev,
        changes=changes_of(diff),
        warnings=warnings,
        note=None if steps else empty_note(diff, files, service),
    )
    plan.dependencies = full.dependency_infos(analysis, set(plan.services()))
    return plan, hits


def selected_steps(
    sel: Selection, analysis: full.Analysis, options: PlanOptions, needs_full: bool
) -> dict[str, Step]:
    """The selected steps, each needing its nearest selected steps in the full plan's order."""
    if not sel.reasons:
        return {}
    if needs_full:
        return full.restrict(full.full_steps(analysis, analysis.graph.nodes, options), sel.reasons)
    needs_of = full.FullPlanNeeds(analysis, options)
    memo: dict[str, set[str]] = {}
    steps: dict[str, Step] = {}
    for sid, reasons in sel.reasons.items():
        phase, service = needs_of.parse(sid)
        needs = sorted(full.nearest_selected(needs_of, sel.reasons, sid, memo))
        steps[sid] = Step(id=sid, phase=phase, service=service, needs=needs, reasons=reasons)
    infra = steps.get(step_id(Phase.TF_INFRA))
    if infra is not None:
        infra.targets = sorted(sel.infra_targets)
    return steps


def full_plan_as_change(
    head: Manifest,
    service: str | None,
    options: PlanOptions,
    base_rev: str | None,
    head_rev: str,
    *,
    base_problem: str | None = None,
) -> Plan:
    """The full plan of head, reported as every enabled service being added."""
    plan = full.plan_full(head, service=service, options=options, base=base_rev, head=head_rev)
    if not plan.ok:
        return plan
    plan.changes = [Change(service=name, kind=ChangeKind.ADDED) for name in sorted(head.enabled())]
    if base_problem is not None:
        plan.note = NOTE_BASE_INVALID.format(why=base_problem)
        plan.warnings = [
            warning("base-invalid", plan.note, hint="fix the base branch's manifest"),
            *plan.warnings,
        ]
    return plan

"""Changed files in a diff plan: the unparseable-terraform fallback and the per-file account."""

from __future__ import annotations

from collections.abc import Iterable

from planner.diff import FileHit, PathsConfig, RootEffects, is_ignored
from planner.findings import Finding, warning
from planner.plan.model import FileNote, Step
from planner.tfmodules import ModuleGraph

NO_STEP_IGNORED = "no step: ignored by [paths] ignore"
NO_STEP_UNUSED = "no step: not used by any root or service"
NO_STEP_SERVICE = "no step: {service} does not need what it selects"
NO_STEP_MANIFEST = "no step: the manifest's services and settings need none"
UNPARSEABLE_REASON = "not parseable; {roots} planned as changed"
UNPARSEABLE_MESSAGE = "terraform file not parseable ({message}); planning {roots} as changed"
UNPARSEABLE_HINT = "fix the HCL syntax (`terraform fmt` points at the line)"


def unparseable_roots(
    modules: ModuleGraph, roots: RootEffects
) -> tuple[list[FileHit], list[Finding]]:
    """Every root reading an unparseable file counts as changed, with one warning per file."""
    users: dict[str, list[str]] = {}
    messages: dict[str, str] = {}
    for root in modules.roots:
        for problem in modules.root_problems(root):
            users.setdefault(problem.file, []).append(root)
            messages[problem.file] = problem.message
    hits: list[FileHit] = []
    found: list[Finding] = []
    for path in sorted(users):
        names = ", ".join(sorted(users[path]))
        for root in sorted(users[path]):
            hits.extend(roots.hits(path, root, UNPARSEABLE_REASON.format(roots=root)))
        message = UNPARSEABLE_MESSAGE.format(message=messages[path], roots=names)
        found.append(warning("terraform-unparseable", message, file=path, hint=UNPARSEABLE_HINT))
    return hits, found


def explain_files(
    changed: Iterable[str],
    manifest_path: str | None,
    hits: Iterable[FileHit],
    steps: Iterable[Step],
    config: PathsConfig | None,
    service: str | None,
) -> list[FileNote]:
    """Each changed file with the steps it selected and why, or why it selected none."""
    config = config or PathsConfig()
    reasons: dict[str, set[str]] = {}
    for hit in hits:
        reasons.setdefault(hit.path, set()).add(hit.reason)
    file_reasons = {reason for found in reasons.values() for reason in found}
    steps = list(steps)
    by_reason: dict[str, list[int]] = {}  # reason -> positions of the steps carrying it
    for index, step in enumerate(steps):
        for reason in step.reasons:
            by_reason.setdefault(reason, []).append(index)
    notes: list[FileNote] = []
    for path in sorted(set(changed)):
        if path == manifest_path:
            notes.append(manifest_note(path, steps, file_reasons))
        elif is_ignored(path, config):
            notes.append(FileNote(path=path, note=NO_STEP_IGNORED))
        else:
            notes.append(file_note(path, reasons.get(path, set()), steps, by_reason, service))
    return notes


def file_note(
    path: str,
    reasons: set[str],
    steps: list[Step],
    by_reason: dict[str, list[int]],
    service: str | None,
) -> FileNote:
    """One file's steps (those carrying one of its reasons, in plan order) and reasons."""
    used = sorted(reason for reason in reasons if reason in by_reason)
    positions = sorted({index for reason in used for index in by_reason[reason]})
    if positions:
        return FileNote(path=path, steps=[steps[i].id for i in positions], reasons=used)
    if reasons and service is not None:
        return FileNote(path=path, note=NO_STEP_SERVICE.format(service=service))
    return FileNote(path=path, note=NO_STEP_UNUSED)


def manifest_note(path: str, steps: list[Step], file_reasons: set[str]) -> FileNote:
    """The manifest: the steps its field changes selected, with those fields."""
    own = [[r for r in step.reasons if r not in file_reasons] for step in steps]
    selected = [step.id for step, mine in zip(steps, own, strict=True) if mine]
    reasons = sorted({r for mine in own for r in mine})
    if not selected:
        return FileNote(path=path, note=NO_STEP_MANIFEST)
    return FileNote(path=path, steps=selected, reasons=reasons)

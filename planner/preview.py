"""What a deployment changes on each host, as data: parsers for the tools' output, and the plan
completed from the built systems.

Pure: the runners (`runners.preview`) run `nix store diff-closures`, `switch-to-configuration
dry-activate` and the boot-file check on the host; this module only reads their text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import Field

from planner.models import Manifest
from planner.output import Output
from planner.plan import (
    NIX_PHASES,
    Phase,
    Plan,
    PlanOptions,
    Step,
    analyse,
    finalize,
    nearest_selected,
    step_id,
)
from planner.plan.full import FullPlanNeeds
from planner.plan.model import nix_phase
from planner.words import plural

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# `name: 1.0 → 1.1, +12.3 KiB`; either part may be missing
SIZE_TAIL = re.compile(r"(?:^|,\s*)([+-]\d+(?:\.\d+)?)\s*KiB$")
ABSENT = "∅"
EMPTY_VERSION = "ε"
KIB = 1024
# the standard lines of NixOS `switch-to-configuration dry-activate`, and the unit list each has
UNIT_LINES: dict[str, str] = {
    "would stop the following units:": "stop",
    "would NOT stop the following changed units:": "not_stopped",
    "would reload the following units:": "reload",
    "would restart the following units:": "restart",
    "would start the following units:": "start",
}
RESTART_SYSTEMD = "would restart systemd"
# files of a NixOS system whose change needs a reboot to take effect
BOOT_FILES = ("kernel", "initrd", "kernel-params")
SYSTEM_CHANGES = "its system changes ({count})"


class PackageChange(Output):
    """One package of the closure: versions before and after (None: absent), size change."""

    name: str
    old: str | None = None
    new: str | None = None
    size_delta: int | None = None  # bytes; None when diff-closures shows no size change


class UnitChanges(Output):
    """The units dry-activate lists, per action."""

    stop: list[str] = Field(default_factory=list)
    not_stopped: list[str] = Field(default_factory=list)
    reload: list[str] = Field(default_factory=list)
    restart: list[str] = Field(default_factory=list)
    start: list[str] = Field(default_factory=list)

    def count(self) -> int:
        return sum(len(units) for units in self.model_dump().values())


class HostPreview(Output):
    """What deploying the head changes on one host (or why that could not be found out)."""

    current: str | None = None
    new: str | None = None
    unchanged: bool = False
    packages: list[PackageChange] = Field(default_factory=list)
    units: UnitChanges = Field(default_factory=UnitChanges)
    restart_systemd: bool = False
    reboot: bool = False
    error: str | None = None

    @property
    def changes(self) -> bool:
        """The host's system really changes (known, and not equal to the current one)."""
        return self.error is None and not self.unchanged and self.new is not None


def _versions(text: str) -> str | None:
    text = text.strip()
    if not text or text == ABSENT:
        return None
    return "" if text == EMPTY_VERSION else text


def parse_diff_closures(text: str) -> list[PackageChange]:
    """The lines of `nix store diff-closures OLD NEW` (`vaultwarden: 1.30.0 → 1.30.1, +1.2 KiB`)."""
    packages: list[PackageChange] = []
    for raw in ANSI.sub("", text).splitlines():
        line = raw.strip()
        name, sep, rest = line.partition(": ")
        if not sep or not name:
            continue
        size: int | None = None
        if match := SIZE_TAIL.search(rest):
            size = round(float(match.group(1)) * KIB)
            rest = rest[: match.start()]
        old, arrow, new = rest.partition("→")
        if not arrow and size is None:
            continue
        packages.append(
            PackageChange(
                name=name,
                old=_versions(old) if arrow else None,
                new=_versions(new) if arrow else None,
                size_delta=size,
            )
        )
    return packages


def _units(text: str) -> list[str]:
    return [unit.strip() for unit in text.split(",") if unit.strip()]


def parse_dry_activate(text: str) -> tuple[UnitChanges, bool]:
    """The units dry-activate would stop, keep, reload, restart, start; and systemd's restart."""
    units = UnitChanges()
    restart_systemd = False
    for raw in ANSI.sub("", text).splitlines():
        line = raw.strip()
        if line.startswith(RESTART_SYSTEMD):
            restart_systemd = True
            continue
        for prefix, action in UNIT_LINES.items():
            if line.startswith(prefix):
                getattr(units, action).extend(_units(line[len(prefix) :]))
                break
    return units, restart_systemd


def parse_boot_files(text: str) -> bool:
    """Lines `FILE<TAB>CURRENT<TAB>NEW` (what each boot file resolves to): any differs → reboot."""
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] in BOOT_FILES and parts[1] != parts[2]:
            return True
    return False


def host_preview(
    current: str, new: str, diff: str = "", dry_activate: str = "", boot: str = ""
) -> HostPreview:
    """One host's preview from its current and new system and the three tools' output."""
    if current == new:
        return HostPreview(current=current, new=new, unchanged=True)
    units, restart_systemd = parse_dry_activate(dry_activate)
    return HostPreview(
        current=current,
        new=new,
        packages=parse_diff_closures(diff),
        units=units,
        restart_systemd=restart_systemd,
        reboot=parse_boot_files(boot),
    )


def changed_hosts(previews: Mapping[str, HostPreview]) -> list[str]:
    """The hosts whose system really changes, sorted."""
    return sorted(name for name, preview in previews.items() if preview.changes)


def preview_json(previews: Mapping[str, HostPreview]) -> dict[str, object]:
    """The `"preview"` object of `nixmox plan --format json`."""
    return {name: previews[name].model_dump(mode="json") for name in sorted(previews)}


def system_changes_reason(preview: HostPreview) -> str:
    """`its system changes (3 packages)`."""
    return SYSTEM_CHANGES.format(count=plural(len(preview.packages), "package"))


def complete_plan(
    plan: Plan,
    manifest: Manifest,
    previews: Mapping[str, HostPreview],
    options: PlanOptions | None = None,
) -> Plan:
    """The plan plus the nix step and verify of every host whose built system changes although
    no rule selected it (reason: `its system changes (N packages)`)."""
    planned = {step.service for step in plan.steps if step.phase in NIX_PHASES and step.service}
    added = {
        name: previews[name]
        for name in changed_hosts(previews)
        if name not in planned and name in manifest.enabled()
    }
    if not added or not plan.ok:
        return plan
    selected: dict[str, list[str]] = {step.id: list(step.reasons) for step in plan.steps}
    for name, preview in added.items():
        reason = system_changes_reason(preview)
        for sid in (step_id(nix_phase(manifest, name), name), step_id(Phase.VERIFY, name)):
            selected.setdefault(sid, []).append(reason)
    full_needs = FullPlanNeeds(analyse(manifest), options or PlanOptions())
    known = plan.by_id()

    def needs_of(sid: str) -> list[str]:
        try:
            return full_needs(sid)
        except (ValueError, KeyError):  # not a step of the head's full plan (a destroy)
            return known[sid].needs

    memo: dict[str, set[str]] = {}
    steps: dict[str, Step] = {}
    for sid, reasons in selected.items():
        needs = sorted(nearest_selected(needs_of, selected, sid, memo))
        if sid in known:
            steps[sid] = known[sid].model_copy(update={"needs": needs, "reasons": reasons})
        else:
            phase, service = full_needs.parse(sid)
            steps[sid] = Step(id=sid, phase=phase, service=service, needs=needs, reasons=reasons)
    completed = finalize(
        steps, base=plan.base, head=plan.head, changes=plan.changes, warnings=plan.warnings
    )
    completed.dependencies, completed.files = plan.dependencies, plan.files
    return completed

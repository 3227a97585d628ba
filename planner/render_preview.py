"""The "What changes on the hosts" section of a plan's renderings (text and Markdown)."""

from __future__ import annotations

from collections.abc import Mapping

from planner.escape import md_code, md_fence, md_text, plain_lines, plain_text
from planner.preview import HostPreview, PackageChange
from planner.words import plural

SUMMARY_END = "</summary>\n\n"
DETAILS_TAIL = "\n\n</details>"


HOSTS_TITLE = "What changes on the hosts"
UNIT_ACTIONS = (
    ("stop", "stop"),
    ("not_stopped", "not stopped (changed)"),
    ("reload", "reload"),
    ("restart", "restart"),
    ("start", "start"),
)


def package_line(package: PackageChange) -> str:
    """`vaultwarden 1.30.0 → 1.30.1 (+12.3 KiB)`; `∅` for a package added or removed."""
    line = package.name
    if package.old is not None or package.new is not None:
        line += f" {package.old if package.old is not None else '∅'} → "
        line += package.new if package.new is not None else "∅"
    if package.size_delta is not None:
        line += f" ({package.size_delta / 1024:+.1f} KiB)"
    return line


def host_headline(name: str, preview: HostPreview) -> str:
    """`vaultwarden: 2 packages, 1 unit restarts, reboot needed`."""
    if preview.error is not None:
        return f"{name}: preview failed"
    if preview.unchanged:
        return f"{name}: unchanged"
    parts = [plural(len(preview.packages), "package")]
    restarts = len(preview.units.restart) + len(preview.units.stop)
    if restarts:
        parts.append(f"{plural(restarts, 'unit')} restart{'s' if restarts == 1 else ''}")
    if preview.restart_systemd:
        parts.append("systemd restarts")
    if preview.reboot:
        parts.append("reboot needed")
    return f"{name}: " + ", ".join(parts)


def _unit_lines(preview: HostPreview) -> list[tuple[str, list[str]]]:
    return [
        (label, getattr(preview.units, action))
        for action, label in UNIT_ACTIONS
        if getattr(preview.units, action)
    ]


def md_host_previews(previews: Mapping[str, HostPreview] | None) -> list[str]:
    """A "What changes on the hosts" heading, then one collapsible block per host."""
    if previews is None:
        return []
    blocks = [f"#### {HOSTS_TITLE}"]
    for name in sorted(previews):
        preview = previews[name]
        lines: list[str] = []
        if preview.error is not None:
            lines.append(md_fence(preview.error))
        elif preview.unchanged:
            lines.append(f"Already runs {md_code(preview.current or '')}: no switch.")
        else:
            lines.extend(f"- {md_code(package_line(p))}" for p in preview.packages)
            for label, units in _unit_lines(preview):
                lines.append(f"- {md_text(label)}: " + ", ".join(md_code(u) for u in units))
            if preview.restart_systemd:
                lines.append("- systemd restarts")
            if preview.reboot:
                lines.append("- :warning: reboot needed (kernel, initrd or kernel parameters)")
            lines = lines or ["_No package or unit changes._"]
        title = md_text(host_headline(name, preview))
        body = "\n".join(lines)
        blocks.append(f"<details><summary>{title}{SUMMARY_END}{body}{DETAILS_TAIL}")
    return blocks


def text_host_previews(previews: Mapping[str, HostPreview]) -> list[str]:
    """The same section for a terminal."""
    lines = [f"{HOSTS_TITLE}:"]
    for name in sorted(previews):
        preview = previews[name]
        lines.append(f"  {plain_text(host_headline(name, preview))}")
        if preview.error is not None:
            lines.extend(f"      {line}" for line in plain_lines(preview.error).splitlines())
            continue
        lines.extend(f"      {plain_text(package_line(p))}" for p in preview.packages)
        for label, units in _unit_lines(preview):
            lines.append(f"      {label}: {plain_text(', '.join(units))}")
        if preview.reboot:
            lines.append("      reboot needed")
    return lines

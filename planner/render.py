"""Renderings of one Plan: terminal text, JSON, Markdown PR comments, Slack Block Kit."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from planner.escape import (
    md_code,
    md_text,
    mermaid_label,
    plain_lines,
    plain_text,
    slack_code,
    slack_text,
)
from planner.plan import Change, ChangeKind, DependencyInfo, Plan, Step
from planner.preview import HostPreview, changed_hosts
from planner.render_preview import md_host_previews, text_host_previews
from planner.words import plural

NO_DEPLOYMENT = "No deployment needed"


def summary(plan: Plan, previews: Mapping[str, HostPreview] | None = None) -> str:
    """One line: how much work the plan is."""
    return plan_summary(plan, previews)


def render_text(plan: Plan, previews: Mapping[str, HostPreview] | None = None) -> str:
    """The plan for a terminal: summary, then each wave with its steps and reasons."""
    lines = [plain_text(summary(plan, previews))]
    if plan.base is not None:
        lines.append(
            f"base {plain_text(short_rev(plan.base))} → head {plain_text(short_rev(plan.head))}"
        )
    if plan.note and plan.steps:
        lines.append(f"note: {plain_text(plan.note)}")
    for finding in plan.errors:
        lines.append(f"  error: {plain_lines(finding.render())}")
    if plan.changes and plan.base is not None:
        lines.append("changes:")
        lines.extend(
            f"  {plain_text(change.service or GLOBAL_ROW)}: {plain_text(change_text(change))}"
            for change in plan.changes
        )
    by_id = plan.by_id()
    for number, wave in enumerate(plan.waves, 1):
        lines.append(f"wave {number}:")
        for sid in wave:
            step = by_id[sid]
            needs = f"  (after {plain_text(', '.join(step.needs))})" if step.needs else ""
            lines.append(f"  {plain_text(sid)}{needs}")
            for reason in step.reasons:
                lines.append(f"      because {plain_text(reason)}")
    if plan.dependencies:
        lines.append("dependencies:")
        lines.extend(f"  {plain_text(dependency_line(dep))}" for dep in plan.dependencies)
    if previews is not None:
        lines.extend(text_host_previews(previews))
    for finding in plan.warnings:
        lines.append(f"warning: {plain_lines(finding.render())}")
    return "\n".join(lines)


def dependency_line(dep: DependencyInfo) -> str:
    """`a → b (inferred from interface.db.host)` or `a → b (depends_on)`."""
    origin = f"inferred from {dep.field}" if dep.inferred else "depends_on"
    if not dep.orders:
        origin += "; set up by tf:auth-core"
    return f"{dep.service} → {dep.target} ({origin})"


def render_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2)


# --- shared pieces ---------------------------------------------------------------------------

PLAN_MARKER = "<!-- nixmox:plan -->"
GITHUB_COMMENT_LIMIT = 65_536
DEFAULT_APPLY_COMMANDS = (
    "Comment `/nixmox apply` on this pull request to deploy this plan (digest {digest}).",
    "Or merge it: the default branch deploys on merge when apply-on-merge is on.",
)
MAX_FIELDS_SHOWN = 6
MAX_REASONS_SHOWN = 8
MERMAID_MAX_EDGES = 400  # Mermaid refuses more than 500 edges by default
MERMAID_MAX_CHARS = 40_000  # and text over 50,000 characters
SLACK_MAX_BLOCKS = 50
SLACK_SECTION_TEXT = 3000
SLACK_FIELD_TEXT = 2000
SLACK_FIELDS_PER_SECTION = 10
SLACK_HEADER_TEXT = 150
SLACK_FALLBACK_TEXT = 3000
GLOBAL_ROW = "(global)"


def short_rev(rev: str | None) -> str:
    """A commit id's first 12 characters; content digests stay recognisable."""
    if rev is None:
        return "none"
    return rev[:19] if rev.startswith("sha256:") else rev[:12]


def plan_summary(plan: Plan, previews: Mapping[str, HostPreview] | None = None) -> str:
    """One line: `3 services change, 7 steps in 4 waves` (or why nothing or no plan); with
    previews, how many hosts really change: `; 2 of 3 hosts change`."""
    if not plan.ok:
        return f"Invalid manifest: {plural(len(plan.errors), 'error')}"
    if not plan.steps:
        return f"{NO_DEPLOYMENT}: {plan.note}" if plan.note else NO_DEPLOYMENT
    services = len(plan.services())
    verb = "changes" if services == 1 else "change"
    line = (
        f"{plural(services, 'service')} {verb}, "
        f"{plural(len(plan.steps), 'step')} in {plural(len(plan.waves), 'wave')}"
    )
    if previews:
        changing = len(changed_hosts(previews))
        verb = "changes" if changing == 1 and len(previews) == 1 else "change"
        line += f"; {changing} of {plural(len(previews), 'host')} {verb}"
    return line


def shown(items: list[str], limit: int) -> tuple[list[str], int]:
    """At most `limit` items, and how many were left out."""
    return items[:limit], max(0, len(items) - limit)


@dataclass
class ServiceRow:
    """One service (or the global row) as the tables show it."""

    name: str
    change: str
    steps: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def change_text(change: Change) -> str:
    """`changed: interface.proxy.upstream, ...`, `added`, `removed`."""
    if not change.fields or change.kind is not ChangeKind.CHANGED:
        extra = f" ({', '.join(change.fields)})" if change.fields else ""
        return f"{change.kind.value}{extra}"
    fields, more = shown(change.fields, MAX_FIELDS_SHOWN)
    tail = f" (+{more} more)" if more else ""
    return f"changed: {', '.join(fields)}{tail}"


def service_rows(plan: Plan) -> list[ServiceRow]:
    """Rows for every service that changed or has steps, global first, then by name."""
    rows: dict[str, ServiceRow] = {}
    for change in plan.changes:
        name = change.service or GLOBAL_ROW
        rows[name] = ServiceRow(name, change_text(change))
    for step in plan.steps:
        name = step.service or GLOBAL_ROW
        row = rows.setdefault(name, ServiceRow(name, ""))
        phase = str(step.phase)
        if step.service is None and step.targets:
            phase += f" ({plural(len(step.targets), 'container')})"
        row.steps.append(phase)
        row.reasons.extend(r for r in step.reasons if r not in row.reasons)
    for row in rows.values():
        if not row.change:
            reasons, more = shown(row.reasons, 3)
            row.change = "because " + ", ".join(reasons) + (f" (+{more} more)" if more else "")
    return sorted(rows.values(), key=lambda row: (row.name != GLOBAL_ROW, row.name))


# --- Markdown (GitHub PR comments) -----------------------------------------------------------


def _md_header(plan: Plan, previews: Mapping[str, HostPreview] | None = None) -> list[str]:
    lines = [f"### NixMox plan: {md_text(plan_summary(plan, previews))}"]
    revs = f"base {md_code(short_rev(plan.base))} → head {md_code(short_rev(plan.head))}"
    if plan.digest:
        revs += f" · digest {md_code(plan.digest[:12])}"
    lines.append(revs)
    if plan.note and plan.steps:
        lines.append("")
        lines.append(f"> {md_text(plan.note)}")
    return lines


def _md_errors(plan: Plan) -> list[str]:
    if not plan.errors:
        return []
    lines = ["", f"**{plural(len(plan.errors), 'error')}** (nothing can be deployed):", ""]
    lines.extend(f"- :x: {md_text(finding.render())}" for finding in plan.errors)
    return ["\n".join(lines)]


TABLE_HEAD = "| Service | Change | Steps |\n| --- | --- | --- |"
SUMMARY_END = "</summary>\n\n"
DETAILS_TAIL = "\n\n</details>"
MERMAID_HEAD = "```mermaid\ngraph TD\n"
FENCE_TAIL = "\n```"


def _md_table_blocks(plan: Plan, rows_per_block: int) -> list[str]:
    rows = service_rows(plan)
    if not rows:
        return []
    head = TABLE_HEAD
    lines = [
        f"| {md_code(row.name, in_table=True)} | {md_text(row.change)} | "
        f"{md_text(' → '.join(row.steps)) if row.steps else '—'} |"
        for row in rows
    ]
    return [
        head + "\n" + "\n".join(lines[i : i + rows_per_block])
        for i in range(0, len(lines), rows_per_block)
    ]


def _md_step_line(step: Step) -> str:
    line = f"- {md_code(step.id)}"
    if step.needs:
        needs, more = shown(step.needs, MAX_REASONS_SHOWN)
        line += " after " + ", ".join(md_code(n) for n in needs) + (f" +{more}" if more else "")
    if step.targets and step.service is None:
        targets, more = shown(step.targets, MAX_REASONS_SHOWN)
        line += " on " + ", ".join(md_code(t) for t in targets) + (f" +{more}" if more else "")
    if step.reasons:
        reasons, more = shown(step.reasons, MAX_REASONS_SHOWN)
        line += " — because " + ", ".join(md_code(r) for r in reasons)
        line += f" (+{more} more)" if more else ""
    return line


def _md_wave_blocks(plan: Plan, steps_per_block: int) -> list[str]:
    by_id = plan.by_id()
    blocks: list[str] = []
    for number, wave in enumerate(plan.waves, 1):
        chunks = [wave[i : i + steps_per_block] for i in range(0, len(wave), steps_per_block)]
        for index, chunk in enumerate(chunks):
            title = f"Wave {number}: {plural(len(wave), 'step')}"
            if len(chunks) > 1:
                title += f" (part {index + 1} of {len(chunks)})"
            body = "\n".join(_md_step_line(by_id[sid]) for sid in chunk)
            blocks.append(f"<details><summary>{title}{SUMMARY_END}{body}{DETAILS_TAIL}")
    return blocks


def mermaid_graph(plan: Plan) -> str | None:
    """A Mermaid `graph TD` of the step DAG, or None when Mermaid could not draw it."""
    edges = sum(len(step.needs) for step in plan.steps)
    if not plan.steps or edges > MERMAID_MAX_EDGES:
        return None
    ids = {step.id: f"s{index}" for index, step in enumerate(plan.steps)}
    lines = ["```mermaid", "graph TD"]
    for step in plan.steps:
        lines.append(f'  {ids[step.id]}["{mermaid_label(step.id)}"]')
    for step in plan.steps:
        lines.extend(f"  {ids[need]} --> {ids[step.id]}" for need in step.needs)
    lines.append("```")
    text = "\n".join(lines)
    return text if len(text) <= MERMAID_MAX_CHARS else None


def _md_graph_block(plan: Plan) -> list[str]:
    if not plan.steps:
        return []
    graph = mermaid_graph(plan)
    if graph is None:
        edges = sum(len(step.needs) for step in plan.steps)
        return [
            f"_Step graph not drawn: {plural(len(plan.steps), 'step')} and "
            f"{plural(edges, 'dependency')} are more than Mermaid draws; the waves above "
            "give the order._"
        ]
    return [f"<details><summary>Step graph{SUMMARY_END}{graph}{DETAILS_TAIL}"]


def md_changed_files(plan: Plan, files_per_block: int = 150) -> list[str]:
    """Collapsible "Changed files" sections: each file with the steps it selected and why."""
    lines = []
    for note in plan.files:
        if note.steps:
            steps, more = shown(note.steps, MAX_REASONS_SHOWN)
            what = ", ".join(md_code(s) for s in steps) + (f" +{more}" if more else "")
            what += " — because " + ", ".join(md_code(r) for r in note.reasons)
        else:
            what = md_text(note.note or "")
        lines.append(f"- {md_code(note.path)}: {what}")
    chunks = [lines[i : i + files_per_block] for i in range(0, len(lines), files_per_block)]
    blocks = []
    for index, chunk in enumerate(chunks):
        title = f"Changed files: {plural(len(lines), 'file')}"
        if len(chunks) > 1:
            title += f" (part {index + 1} of {len(chunks)})"
        blocks.append(
            f"<details><summary>{title}</summary>\n\n" + "\n".join(chunk) + "\n\n</details>"
        )
    return blocks


def _md_warning_blocks(plan: Plan, per_block: int) -> list[str]:
    lines = [f"- :warning: {md_text(finding.render())}" for finding in plan.warnings]
    return [
        f"**{plural(len(plan.warnings), 'warning')}**:\n\n" + "\n".join(lines[i : i + per_block])
        for i in range(0, len(lines), per_block)
    ]


def _md_footer(plan: Plan, commands: Iterable[str]) -> str:
    if not plan.ok or not plan.steps:
        return "---\n_Nothing to apply._"
    digest = md_code(plan.digest[:12])
    return "---\n" + "\n".join(f"- {line.format(digest=digest)}" for line in commands)


def render_markdown(
    plan: Plan,
    *,
    limit: int = GITHUB_COMMENT_LIMIT,
    commands: Iterable[str] = DEFAULT_APPLY_COMMANDS,
    previews: Mapping[str, HostPreview] | None = None,
) -> list[str]:
    """The PR comment(s): one string, or several when the plan is longer than `limit`.

    Every comment starts with the hidden marker (so the bot finds and edits its own comments),
    is valid Markdown on its own (no table, list or `<details>` is cut), and fits `limit` bytes
    of UTF-8 (GitHub counts characters; bytes are never fewer).
    """
    commands = list(commands)
    head = _md_header(plan, previews)
    blocks = [
        *_md_errors(plan),
        *_md_table_blocks(plan, rows_per_block=200),
        *md_host_previews(previews),
        *_md_wave_blocks(plan, steps_per_block=150),
        *_md_graph_block(plan),
        *md_changed_files(plan, files_per_block=150),
        *_md_warning_blocks(plan, per_block=100),
    ]
    footer = _md_footer(plan, commands)
    single = "\n\n".join([PLAN_MARKER + "\n" + "\n".join(head), *blocks, footer])
    if _size(single) <= limit:
        return [single]
    return _split_comments(plan, head, blocks, footer, limit, previews)


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _split_comments(
    plan: Plan,
    head: list[str],
    blocks: list[str],
    footer: str,
    limit: int,
    previews: Mapping[str, HostPreview] | None = None,
) -> list[str]:
    """Pack whole blocks into comments; each gets the marker and a part header."""
    title = f"### NixMox plan: {md_text(plan_summary(plan, previews))}"
    reserve = _size(PLAN_MARKER) + _size(title) + 64  # marker, part line, separators
    budget = limit - reserve
    parts: list[list[str]] = [["\n".join(head[1:])]]
    for block in [*_fit(blocks, budget), footer]:
        current = parts[-1]
        if _size("\n\n".join([*current, block])) > budget:
            parts.append([block])
        else:
            current.append(block)
    total = len(parts)
    return [
        "\n\n".join([f"{PLAN_MARKER}\n{title} (part {index} of {total})", *[b for b in part if b]])
        for index, part in enumerate(parts, 1)
    ]


def _frame(block: str) -> tuple[str, str, str]:
    """A block as (head, body, tail): a `<details>` keeps its summary, a table its header."""
    if block.startswith("<details><summary>") and block.endswith(DETAILS_TAIL):
        head, _, body = block.partition(SUMMARY_END)
        head, body, tail = head + SUMMARY_END, body.removesuffix(DETAILS_TAIL), DETAILS_TAIL
        if body.startswith(MERMAID_HEAD) and body.endswith(FENCE_TAIL):  # each piece a graph
            body = body.removeprefix(MERMAID_HEAD).removesuffix(FENCE_TAIL)
            head, tail = head + MERMAID_HEAD, FENCE_TAIL + tail
        return head, body, tail
    if block.startswith(TABLE_HEAD + "\n"):
        return TABLE_HEAD + "\n", block.removeprefix(TABLE_HEAD + "\n"), ""
    return "", block, ""


def _fit(blocks: list[str], budget: int) -> list[str]:
    """Blocks no longer than `budget`; an oversized one is cut at line ends, never mid-line.

    Each piece of a cut `<details>` block or table is whole again: it repeats the summary or
    the header and closes what it opens.
    """
    fitted: list[str] = []
    for block in blocks:
        if _size(block) <= budget:
            fitted.append(block)
            continue
        head, body, tail = _frame(block)
        room = max(budget - _size(head) - _size(tail), budget // 2)
        current: list[str] = []
        for line in body.splitlines():
            if current and _size("\n".join([*current, line])) > room:
                fitted.append(head + "\n".join(current) + tail)
                current = []
            current.append(line[: room // 4])
        fitted.append(head + "\n".join(current) + tail)
    return fitted


# --- Slack Block Kit -------------------------------------------------------------------------


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mrkdwn(text: str, limit: int = SLACK_SECTION_TEXT) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": _clip(text, limit)}


def render_slack(
    plan: Plan, *, title: str = "NixMox plan", max_blocks: int = SLACK_MAX_BLOCKS
) -> dict[str, Any]:
    """A Slack message (`text` fallback and `blocks`) within Block Kit's limits.

    At most `max_blocks` blocks (pass fewer to leave room for buttons), section text at most
    3,000 characters, at most 10 fields of at most 2,000 characters per section.
    """
    summary_line = plan_summary(plan)
    revs = f"base {slack_code(short_rev(plan.base))} → head {slack_code(short_rev(plan.head))}"
    if plan.digest:
        revs += f" · digest {slack_code(plan.digest[:12])}"
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _clip(title, SLACK_HEADER_TEXT)}},
        {"type": "section", "text": _mrkdwn(f"*{slack_text(summary_line)}*\n{revs}")},
    ]
    if plan.errors:
        lines = [f"• {slack_text(f.render())}" for f in plan.errors]
        blocks.append({"type": "section", "text": _mrkdwn("*Errors*\n" + "\n".join(lines))})
    elif plan.note and plan.steps:
        blocks.append({"type": "context", "elements": [_mrkdwn(slack_text(plan.note))]})
    tail = _slack_tail(plan)
    room = max_blocks - len(blocks) - len(tail)
    blocks.extend(_slack_service_sections(plan, max(room, 1)))
    blocks.extend(tail)
    fallback = _clip(slack_text(summary_line), SLACK_FALLBACK_TEXT)
    return {"text": fallback, "blocks": blocks[:max_blocks]}


def _slack_field(row: ServiceRow) -> dict[str, Any]:
    steps = " → ".join(row.steps) if row.steps else "—"
    text = f"*{slack_text(row.name)}*\n{slack_text(row.change)}\n_{slack_text(steps)}_"
    return _mrkdwn(text, SLACK_FIELD_TEXT)


def _slack_service_sections(plan: Plan, room: int) -> list[dict[str, Any]]:
    """Sections of up to 10 service fields; the last one says how many did not fit."""
    rows = service_rows(plan)
    per = SLACK_FIELDS_PER_SECTION
    sections = [rows[i : i + per] for i in range(0, len(rows), per)]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "fields": [_slack_field(row) for row in chunk]}
        for chunk in sections[:room]
    ]
    if len(sections) > room:
        left = len(rows) - per * (room - 1)
        blocks[-1] = {
            "type": "section",
            "text": _mrkdwn(
                f"…and {plural(left, 'more service')}: see the pull request comment "
                "or `nixmox plan` for the whole plan."
            ),
        }
    return blocks


def _slack_tail(plan: Plan) -> list[dict[str, Any]]:
    if not plan.warnings:
        return []
    lines = [f"• {slack_text(f.render())}" for f in plan.warnings[:10]]
    if len(plan.warnings) > 10:
        lines.append(f"…and {plural(len(plan.warnings) - 10, 'more warning')}")
    return [{"type": "context", "elements": [_mrkdwn("\n".join(lines))]}]

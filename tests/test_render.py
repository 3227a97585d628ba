"""Renderings of one Plan: Markdown PR comments (and their split), Slack Block Kit, text."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from markdown_it import MarkdownIt

from planner.findings import warning
from planner.models import Manifest
from planner.plan import Plan, plan_full
from planner.plan.changes import plan_changes
from planner.render import (
    GITHUB_COMMENT_LIMIT,
    PLAN_MARKER,
    render_markdown,
    render_slack,
    render_text,
)
from planner.source import load_manifest, parse_manifest
from planner.synthetic import synthetic_manifest

TABLE_HEADER = "| Service | Change | Steps |"
SLACK_BLOCK_TYPES = {"header", "section", "context", "divider", "actions"}


@pytest.fixture(scope="module")
def upstream(upstream_manifest: Path) -> Manifest:
    return load_manifest(upstream_manifest)


@pytest.fixture(scope="module")
def proxy_plan(upstream: Manifest) -> Plan:
    head = upstream.model_copy(deep=True)
    head.services["vaultwarden"].interface.proxy.upstream = "192.168.99.14:8081"  # type: ignore[union-attr]  # the fixture gives vaultwarden a proxy
    return plan_changes(upstream, head, base_rev="a" * 40, head_rev="b" * 40)


@pytest.fixture(scope="module")
def huge_plan() -> Plan:
    """The full plan of 5,000 services: far beyond one comment and one Slack message."""
    return plan_full(parse_manifest(synthetic_manifest(5000)), head="c" * 40)


# the assertions look at blocks only (tables, fences): inline parsing would double the time
BLOCKS = MarkdownIt("commonmark").enable("table").disable("inline")


def parse(markdown: str) -> list[Any]:
    """The block tokens of CommonMark with tables (their inline content left unparsed)."""
    return BLOCKS.parse(markdown)


def assert_self_contained(part: str, limit: int) -> None:
    """One comment: marker first, within the limit, no cut table, details or code fence."""
    assert part.split("\n", 1)[0] == PLAN_MARKER
    assert len(part.encode()) <= limit
    assert part.count("<details>") == part.count("</details>")
    assert part.count("```") % 2 == 0
    lines = part.splitlines()
    for index, line in enumerate(lines):
        starts_table = line.startswith("| ") and not lines[index - 1].startswith("|")
        if starts_table:
            assert line == TABLE_HEADER, "every table chunk repeats its header"
    tokens = parse(part)
    tables = [t for t in tokens if t.type == "table_open"]
    assert len(tables) == sum(1 for line in lines if line == TABLE_HEADER)


def test_markdown_comment_for_a_proxy_change(proxy_plan: Plan) -> None:
    [comment] = render_markdown(proxy_plan)
    lines = comment.splitlines()
    assert lines[0] == PLAN_MARKER
    assert lines[1] == "### NixMox plan: 2 services change, 2 steps in 2 waves"
    assert "base `aaaaaaaaaaaa` → head `bbbbbbbbbbbb`" in lines[2]
    assert TABLE_HEADER in lines
    assert "| `vaultwarden` | changed: interface.proxy.upstream | verify |" in lines
    assert "| `caddy` | because services.vaultwarden.interface.proxy.upstream | nix:core |" in lines
    assert "<details><summary>Wave 1: 1 step</summary>" in lines
    assert "<details><summary>Wave 2: 1 step</summary>" in lines
    assert (
        "- `verify:vaultwarden` after `nix:core:caddy` — because "
        "`services.vaultwarden.interface.proxy.upstream`" in lines
    )
    fences = [t for t in parse(comment) if t.type == "fence"]
    assert [t.info for t in fences] == ["mermaid"]
    assert fences[0].content.splitlines()[0] == "graph TD"
    assert '  s0["nix:core:caddy"]' in fences[0].content
    assert "  s0 --> s1" in fences[0].content
    assert "`/nixmox apply`" in comment and proxy_plan.digest[:12] in comment
    assert_self_contained(comment, GITHUB_COMMENT_LIMIT)


def test_markdown_shows_warnings_and_escapes_them(proxy_plan: Plan) -> None:
    noisy = proxy_plan.model_copy(
        update={"warnings": [warning("unknown-key", "odd key <script>a|b</script>")]}
    )
    [comment] = render_markdown(noisy)
    assert "**1 warning**:" in comment
    assert "odd key &lt;script&gt;a\\|b&lt;/script&gt;" in comment
    assert "<script>" not in comment


def test_markdown_of_an_invalid_plan_lists_errors(upstream: Manifest) -> None:
    head = upstream.model_copy(deep=True)
    head.services["forgejo"].ip = head.services["openbao"].ip
    plan = plan_changes(upstream, head)
    [comment] = render_markdown(plan)
    assert "Invalid manifest: 1 error" in comment
    assert ":x: services.openbao.ip: ip 192.168.99.20 is also used by forgejo" in comment
    assert "Nothing to apply" in comment


def test_markdown_of_an_empty_plan_says_why(upstream: Manifest) -> None:
    plan = plan_changes(upstream, upstream.model_copy(deep=True))
    [comment] = render_markdown(plan)
    assert comment.splitlines()[1].startswith("### NixMox plan: No deployment needed: ")
    assert "only comments or formatting" in comment
    assert "```mermaid" not in comment


def test_huge_plan_splits_into_self_contained_comments(huge_plan: Plan) -> None:
    parts = render_markdown(huge_plan)
    assert len(parts) > 1
    for index, part in enumerate(parts, 1):
        assert_self_contained(part, GITHUB_COMMENT_LIMIT)
        assert f"(part {index} of {len(parts)})" in part.splitlines()[1]
    text = "\n".join(parts)
    listed = re.findall(r"^- `([^`]+)`", text, flags=re.MULTILINE)
    assert sorted(listed) == sorted(step.id for step in huge_plan.steps), "nothing lost"
    assert "Step graph not drawn" in text  # Mermaid cannot draw 15,000 steps
    assert "`/nixmox apply`" in parts[-1]


def test_small_limit_splits_a_small_plan(proxy_plan: Plan, upstream: Manifest) -> None:
    full = plan_full(upstream)
    parts = render_markdown(full, limit=2500)
    assert len(parts) >= 3
    for part in parts:
        assert_self_contained(part, 2500)


def assert_slack_limits(message: dict[str, Any], max_blocks: int = 50) -> None:
    json.dumps(message)
    assert message["text"] and len(message["text"]) <= 3000
    blocks = message["blocks"]
    assert 0 < len(blocks) <= max_blocks
    for block in blocks:
        assert block["type"] in SLACK_BLOCK_TYPES
        if block["type"] == "header":
            assert block["text"]["type"] == "plain_text"
            assert len(block["text"]["text"]) <= 150
        if block["type"] == "section":
            assert "text" in block or "fields" in block
            if "text" in block:
                assert len(block["text"]["text"]) <= 3000
            fields = block.get("fields", [])
            assert len(fields) <= 10
            assert all(len(f["text"]) <= 2000 for f in fields)
        if block["type"] == "context":
            assert len(block["elements"]) <= 10
            assert all(len(e["text"]) <= 3000 for e in block["elements"])


def test_slack_message_for_a_proxy_change(proxy_plan: Plan) -> None:
    message = render_slack(proxy_plan)
    assert_slack_limits(message)
    assert message["text"] == "2 services change, 2 steps in 2 waves"
    fields = [f["text"] for b in message["blocks"] for f in b.get("fields", [])]
    assert "*vaultwarden*\nchanged: interface.proxy.upstream\n_verify_" in fields


def test_slack_message_for_a_huge_plan_stays_within_limits(huge_plan: Plan) -> None:
    for max_blocks in (50, 45):
        message = render_slack(huge_plan, max_blocks=max_blocks)
        assert_slack_limits(message, max_blocks)
        assert "more services" in json.dumps(message)


def test_slack_escapes_control_characters(proxy_plan: Plan) -> None:
    noisy = proxy_plan.model_copy(update={"warnings": [warning("x", "<!channel> & co")]})
    text = json.dumps(render_slack(noisy))
    assert "<!channel>" not in text and "&lt;!channel&gt; &amp; co" in text


def test_text_rendering(proxy_plan: Plan, upstream: Manifest) -> None:
    text = render_text(proxy_plan)
    assert text.splitlines()[:2] == [
        "2 services change, 2 steps in 2 waves",
        "base aaaaaaaaaaaa → head bbbbbbbbbbbb",
    ]
    assert "  vaultwarden: changed: interface.proxy.upstream" in text
    assert "      because services.vaultwarden.interface.proxy.upstream" in text
    head = upstream.model_copy(deep=True)
    head.services["vaultwarden"].interface.health.liveness = "true"  # type: ignore[union-attr]  # the fixture gives vaultwarden health checks
    single = render_text(plan_changes(upstream, head))
    assert single.splitlines()[0] == "1 service changes, 1 step in 1 wave"

"""Hostile text in every rendering: it cannot hide plan steps, forge markup, link or mention.

The names bypass validation (the plan is built from models), the way a domain, a field path, a
warning, a Nix error message or terraform output can carry anything.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from markdown_it import MarkdownIt
from markdown_it.token import Token

from bot.github.comments import finished_text
from bot.slack.asks import Ask
from bot.slack.blocks import RequestStatus, RequestView, request_blocks, request_text
from bot.slack.progress import (
    Byline,
    Failure,
    Progress,
    RollbackView,
    failure_blocks,
    progress_blocks,
    progress_text,
    rollback_blocks,
)
from bot.slack.status import service_status_line
from cli.main import main
from cli.render import write_files
from deployments.views import ServiceRow
from planner.escape import (
    WORD_JOINER,
    html_text,
    md_code,
    md_fence,
    md_text,
    mermaid_label,
    one_line,
    plain_text,
    slack_text,
)
from planner.findings import error, warning
from planner.models import Manifest
from planner.plan import Change, ChangeKind, Phase, Plan, Step, finalize
from planner.render import PLAN_MARKER, mermaid_graph, render_markdown, render_slack, render_text
from planner.validate import check_service_names
from runners.base import Context
from runners.config import TerraformConfig
from runners.paths import PathEscapeError, contained
from runners.terraform import TerraformRunner
from state.deployments import DeploymentRecord, StepRecord
from state.events import DeploymentKind, DeploymentState, StepState

FENCE_AND_FORGERY = "x\n```\n</details><img src=x> @octocat **FORGED**\n```"
HOSTILE = [
    "a\n\n<!--",
    FENCE_AND_FORGERY,
    "back`tick``s```",
    "`",
    "pipe|cell|break",
    "line\nbreak\r\nand\u2028more",
    "-->",
    "<!--",
    "</details>",
    "@user",
    "[x](http://a)",
    "![x](http://a)",
    "<!channel>",
    "<@U123ABC> <#C1|general> <http://evil|click>",
    "www.evil.example and user@example.com and #12",
    "$x^2$ ~~gone~~ _em_ \\| \\",
    "# heading",
    "1. list",
    "\x1b[2Kwave 9:",
]
LAST = "zz-destroy-everything"
NAMES = [*HOSTILE, LAST]
# the HTML the bot writes itself; nothing else may survive the Markdown parser
OWN_HTML = re.compile(r"<details><summary>[^<>]*</summary>|</details>|" + re.escape(PLAN_MARKER))
OWN_BOLD = re.compile(r"\d+ (warning|error)s?")
GITHUB_MENTION = re.compile(r"(?<![\w`])@[A-Za-z0-9]")
SLACK_CONTROL = re.compile(r"<[!@#]|<http", re.IGNORECASE)


def hostile_plan() -> Plan:
    """Every hostile text as a service name, field path, reason, target, warning and note."""
    steps: dict[str, Step] = {}
    infra = Step(id="tf:infra", phase=Phase.TF_INFRA, targets=list(NAMES), reasons=HOSTILE[:3])
    steps[infra.id] = infra
    for name in NAMES:
        nix = Step(
            id=f"nix:service-config:{name}",
            phase=Phase.NIX_SERVICE_CONFIG,
            service=name,
            needs=[infra.id],
            reasons=[f"services.{name}.interface.proxy.domain", name],
        )
        verify = Step(id=f"verify:{name}", phase=Phase.VERIFY, service=name, needs=[nix.id])
        steps[nix.id] = nix
        steps[verify.id] = verify
    destroy = Step(id=f"tf:destroy:{LAST}", phase=Phase.TF_DESTROY, service=LAST)
    steps[destroy.id] = destroy
    changes = [
        Change(service=name, kind=ChangeKind.CHANGED, fields=[f"services.{name}.ip", name])
        for name in NAMES
    ]
    warnings = [
        warning("unknown-key", f"unknown key {text}", field=text, service=text, hint=text)
        for text in HOSTILE
    ]
    return finalize(
        steps,
        base="a" * 40,
        head=FENCE_AND_FORGERY,
        changes=changes,
        warnings=warnings,
        note="note " + FENCE_AND_FORGERY,
    )


def invalid_plan() -> Plan:
    """A plan refused with Nix error messages and findings full of hostile text."""
    return Plan(
        errors=[error("nix", f"error: {text}", field=text, service=text) for text in HOSTILE],
        base="b" * 40,
        head="c" * 40,
    )


def shown(text: str) -> str:
    """What a reader sees of a text: one line, the invisible word joiners gone."""
    return one_line(text).replace(WORD_JOINER, "")


# --- Markdown --------------------------------------------------------------------------------


def parse(markdown: str) -> list[Token]:
    return MarkdownIt("commonmark").enable("table").parse(markdown)


def walk(tokens: list[Token]) -> Iterator[Token]:
    for token in tokens:
        yield token
        yield from walk(token.children or [])


def rendered_text(tokens: list[Token]) -> str:
    """The document as a reader sees it: text, code and fences, block by block."""
    parts = [
        token.content
        for token in walk(tokens)
        if token.type in {"text", "code_inline", "fence", "code_block"}
    ]
    return "\n".join(part.replace(WORD_JOINER, "") for part in parts)


def assert_safe_markdown(comment: str, bold: re.Pattern[str] = OWN_BOLD) -> list[Token]:
    tokens = parse(comment)
    for token in walk(tokens):
        assert token.type not in {"image", "link_open"}, token
        if token.type in {"html_block", "html_inline"}:
            assert OWN_HTML.fullmatch(token.content.strip()), token.content
        if token.type == "text":  # GitHub links and mentions in text, never in code
            assert not GITHUB_MENTION.search(token.content), token.content
            assert "://" not in token.content and "www." not in token.content, token.content
    strong = [
        children[index + 1].content
        for token in walk(tokens)
        if (children := token.children)
        for index, child in enumerate(children)
        if child.type == "strong_open"
    ]
    assert all(bold.fullmatch(text) for text in strong), strong
    html = [t.content.strip() for t in walk(tokens) if t.type in {"html_block", "html_inline"}]
    opened = sum(1 for block in html if block.startswith("<details>"))
    assert opened == html.count("</details>"), "no <details> block is closed early"
    return tokens


def test_markdown_shows_every_service_and_step_and_no_foreign_markup() -> None:
    plan = hostile_plan()
    [comment] = render_markdown(plan)
    tokens = assert_safe_markdown(comment)
    text = rendered_text(tokens)
    for name in NAMES:
        assert shown(name) in text, name
    for step in plan.steps:
        assert shown(step.id) in text, step.id
    code = {t.content for t in walk(tokens) if t.type == "code_inline"}
    assert {one_line(step.id) for step in plan.steps} <= code, "every step id as exact code"
    assert {one_line(name) for name in NAMES} <= code, "every service name as exact code"
    # the table is whole: a row per service (and the global row), three cells each
    rows = [t for t in tokens if t.type == "tr_open"]
    assert len(rows) == 1 + len(NAMES) + 1
    cells = sum(1 for t in tokens if t.type == "td_open")
    assert cells == 3 * (len(NAMES) + 1)
    # every step is one list item of a wave; the last one is still a <details> of its own
    items = sum(1 for t in tokens if t.type == "list_item_open")
    assert items == len(plan.steps) + len(plan.warnings) + 2  # + the two apply lines
    assert f"tf:destroy:{LAST}" in code


def test_markdown_of_hostile_errors_stays_one_item_each() -> None:
    [comment] = render_markdown(invalid_plan())
    tokens = assert_safe_markdown(comment)
    items = sum(1 for t in tokens if t.type == "list_item_open")
    assert items == len(HOSTILE)
    text = rendered_text(tokens)
    for hostile in HOSTILE:
        assert shown(f"error: {hostile}") in text


def test_markdown_split_comments_stay_safe() -> None:
    parts = render_markdown(hostile_plan(), limit=3000)
    assert len(parts) > 1
    text = ""
    for part in parts:
        text += rendered_text(assert_safe_markdown(part))
    for name in NAMES:
        assert shown(name) in text


@pytest.mark.parametrize("hostile", HOSTILE)
def test_markdown_escapers_render_as_the_text_itself(hostile: str) -> None:
    for markdown in (md_text(hostile), md_code(hostile)):
        tokens = parse(f"before {markdown} after")
        assert [t.type for t in tokens] == ["paragraph_open", "inline", "paragraph_close"]
        assert rendered_text(tokens).replace("\n", "") == f"before {shown(hostile)} after"
    row = f"| {md_code(hostile, in_table=True)} | {md_text(hostile)} |"
    tokens = parse("| a | b |\n| --- | --- |\n" + row)
    assert sum(1 for t in tokens if t.type == "td_open") == 2
    cells = [t for t in walk(tokens) if t.type in {"code_inline", "text"}][2:]
    assert [c.content.replace(WORD_JOINER, "") for c in cells] == [shown(hostile)] * 2


def test_a_fence_holds_any_text_verbatim() -> None:
    text = "ok\n```\n</details>\n````\nstill inside"
    tokens = parse(md_fence(text) + "\n\nafter")
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1 and fences[0].content == text + "\n"
    assert tokens[-2].content == "after"


def test_github_reply_of_a_finished_deployment_keeps_every_step_in_its_fence() -> None:
    steps = [
        StepRecord(f"verify:{name}", "verify", name, StepState.FAILED, reason=name)
        for name in NAMES
    ]
    record = DeploymentRecord(
        "d-1", DeploymentKind.DEPLOY, "pr_comment", DeploymentState.FAILED, Plan(), "", steps=steps
    )
    tokens = assert_safe_markdown(finished_text(record, "f" * 40), bold=re.compile("failed"))
    [fence] = [t for t in tokens if t.type == "fence"]
    assert [line.split(maxsplit=1)[1] for line in fence.content.splitlines()] == [
        f"verify:{one_line(name)}  ({one_line(name)})" for name in NAMES
    ]


# --- Mermaid ---------------------------------------------------------------------------------

MERMAID_LINE = re.compile(r'  s\d+\["[A-Za-z0-9 _.,:/+=()#;-]*"\]|  s\d+ --> s\d+|graph TD|```\w*')


def test_mermaid_labels_cannot_break_out() -> None:
    graph = mermaid_graph(hostile_plan())
    assert graph is not None
    lines = graph.splitlines()
    assert lines[0] == "```mermaid" and lines[-1] == "```"
    for line in lines:
        assert MERMAID_LINE.fullmatch(line), line
    assert sum(1 for line in lines if "```" in line) == 2
    assert mermaid_label('a"b`c<d>#e\nf') == "a#34;b#96;c#60;d#62;#35;e f"


# --- Slack -----------------------------------------------------------------------------------


def texts_of(value: Any) -> Iterator[str]:
    """Every string Slack parses as mrkdwn (plain_text objects are shown as they are)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict) and value.get("type") != "plain_text":
        for item in value.values():
            yield from texts_of(item)
    elif isinstance(value, list):
        for item in value:
            yield from texts_of(item)


def assert_safe_slack(message: Any) -> None:
    for text in texts_of(message):
        assert not SLACK_CONTROL.search(text), text
        outside_code = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
        assert "://" not in outside_code, "a bare URL Slack would link"
        assert outside_code.count("`") % 2 == 0, text
    json.dumps(message)


def test_slack_plan_message_escapes_every_field() -> None:
    message = render_slack(hostile_plan())
    assert_safe_slack(message)
    assert_safe_slack(render_slack(invalid_plan()))
    fields = [f["text"] for b in message["blocks"] for f in b.get("fields", [])]
    assert any("&lt;!channel&gt;" in field for field in fields)


def test_slack_progress_approval_and_status_escape_every_field() -> None:
    plan = hostile_plan()
    progress = Progress(
        FENCE_AND_FORGERY,
        plan,
        byline=Byline(requested_by="<!channel>", origin="<!here> from <@U1>"),
    )
    for index, name in enumerate(NAMES):
        progress.steps[f"verify:{name}"].state = (
            StepState.RUNNING if index % 2 else StepState.FAILED
        )
        rollback = RollbackView(name, f"verify:{name}", ok=index % 3 == 0, detail=None)
        progress.rollbacks[name] = rollback
        failure = Failure(f"verify:{name}", name, 2, name, f"terraform said {name}", [rollback])
        progress.failures.append(failure)
        assert_safe_slack(failure_blocks(failure))
        assert_safe_slack(rollback_blocks(RollbackView(name, "", ok=False, detail=name)))
        row = ServiceRow(name, "-", name, name, name, locked_by=name, lock_reason=name)
        assert_safe_slack(service_status_line(row))
    assert_safe_slack(progress_blocks(progress, progress.started_at or _now()))
    assert_safe_slack(progress_text(progress, _now()))
    view = RequestView(
        Ask(DeploymentKind.DEPLOY, "<!channel>", ref="<http://evil|main>"),
        requested_by="<!everyone>",
        head=FENCE_AND_FORGERY,
        error="<@U0> " + FENCE_AND_FORGERY,
        extra=[slack_text(name) for name in HOSTILE],
    )
    for status in RequestStatus:
        assert_safe_slack(request_blocks(view, status, plan))
        assert_safe_slack(request_text(view, status))


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


# --- terminal and HTML -----------------------------------------------------------------------


def test_text_rendering_keeps_one_line_per_item() -> None:
    text = render_text(hostile_plan())
    assert "\x1b" not in text and "\r" not in text
    assert not any(line.startswith("wave 9") for line in text.splitlines())
    waves = [line for line in text.splitlines() if re.fullmatch(r"wave \d+:", line)]
    assert len(waves) == len(hostile_plan().waves)
    assert plain_text("a\nb\x1b[0m") == "a b\ufffd[0m"


def test_html_text_makes_no_markup() -> None:
    for hostile in HOSTILE:
        escaped = html_text(hostile)
        assert "<" not in escaped and ">" not in escaped and '"' not in escaped


# --- names and paths -------------------------------------------------------------------------


def test_hostile_service_names_are_validation_errors() -> None:
    manifest = Manifest.model_validate(
        {"services": {name: {} for name in [*HOSTILE, "../../../escaped", "a" * 64, "ok-1"]}}
    )
    refused = {finding.service for finding in check_service_names(manifest)}
    assert refused == {*HOSTILE, "../../../escaped", "a" * 64}
    assert check_service_names(Manifest.model_validate({"services": {"A" + "b" * 62: {}}})) == []


def test_contained_refuses_paths_leaving_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert contained(root, "health", "a-health-check.sh") == root.resolve() / "health" / (
        "a-health-check.sh"
    )
    for parts in (("../x",), ("a", "../../x"), ("/etc/passwd",), ("health/../../../escaped",)):
        with pytest.raises(PathEscapeError, match="leaves"):
            contained(root, *parts)
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(PathEscapeError):
        contained(root, "link", "file")


def escaping_manifest(tmp_path: Path) -> Path:
    manifest = {
        "services": {
            "../../../escaped": {
                "ip": "10.20.0.3",
                "interface": {"terraform": {"modules": ["./terraform/app"]}},
            }
        }
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def files_outside(tmp_path: Path, *inside: Path) -> list[Path]:
    return [
        path
        for path in tmp_path.rglob("*")
        if path.is_file() and not any(path.is_relative_to(root) for root in inside)
    ]


def test_render_cannot_write_outside_out(tmp_path: Path) -> None:
    base = tmp_path / "a" / "b" / "c"
    root = base / "repo"
    (root / "terraform" / "app").mkdir(parents=True)
    (root / "terraform" / "app" / "main.tf").write_text("")
    out = base / "out"
    manifest = escaping_manifest(base)
    args = ["render", str(manifest), "--out", str(out), "--root", str(root)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "leaves" in result.output and "Traceback" not in result.output
    assert files_outside(tmp_path, root, manifest) == []
    with pytest.raises(PathEscapeError):
        write_files(out, {"health/ok.sh": "", "../../escaped.sh": ""})
    assert not out.exists(), "nothing is written when one path leaves"


async def test_terraform_cannot_write_outside_its_directories(tmp_path: Path) -> None:
    assert shutil.which("terraform"), "terraform is not on PATH: install terraform >= 1.5"
    base = tmp_path / "a" / "b" / "c"
    workdir = base / "work"
    (workdir / "terraform" / "app").mkdir(parents=True)
    (workdir / "terraform" / "app" / "main.tf").write_text("")
    runner = TerraformRunner(TerraformConfig(state_dir=base / "state", roots={}))
    for name, module in (
        ("../../../escaped", "./terraform/app"),
        ("../../../../../../../escaped", "./terraform/app"),
        ("app", "../../../escaped"),
    ):
        manifest = Manifest.model_validate(
            {"services": {name: {"interface": {"terraform": {"modules": [module]}}}}}
        )
        plan = finalize({})
        step = Step(id=f"tf:service-infra:{name}", phase=Phase.TF_SERVICE_INFRA, service=name)
        ctx = Context("dep", manifest, plan, workdir, revision="r1")
        result = await runner.run(step, ctx)
        assert not result.ok and "leaves" in result.output, result.output
        assert "leaves" in runner.commands(step, ctx)[0]
    assert files_outside(tmp_path, workdir) == []

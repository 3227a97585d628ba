"""Diff-aware plans from real Git repositories: every case of tests/data/diff/upstream.toml.

The base is the real NixMox manifest (read from ../shared, committed into a temporary
repository at test time only); the head changes one thing. Each case asserts the exact steps.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import networkx as nx
import pytest

from planner.findings import Severity
from planner.plan import Phase, Plan, plan_full
from planner.render import render_json, render_markdown, render_slack, render_text
from planner.revisions import plan_revisions
from planner.source import EvalCache, EvalLimits, PlanningError, UnknownRevision, load_manifest_at
from tests.conftest import UPSTREAM
from tests.test_gitsource import GitRepo

CASES_FILE = Path(__file__).parent / "data" / "diff" / "upstream.toml"
CASES: list[dict[str, Any]] = tomllib.loads(CASES_FILE.read_text())["case"]
MANIFEST = "nixos/service-manifest.nix"
BASES = {
    "upstream": UPSTREAM / "service-manifest.nix",
    "upstream-old": UPSTREAM / "service-manifest.ebf3bcb.nix",
}


def apply_edits(text: str, edits: list[dict[str, str]]) -> str:
    """Replace `old` by `new` once: inside `service`'s block, or where `old` is unique."""
    for edit in edits:
        old, new = edit["old"], edit["new"]
        if "service" in edit:
            start = text.index(f"\n    {edit['service']} = {{")
            end = text.index("\n    };\n", start)
            pos = text.index(old, start)
            assert pos < end, f"{old!r} is not inside {edit['service']}'s block"
        else:
            assert text.count(old) == 1, f"{old!r} must occur exactly once"
            pos = text.index(old)
        text = text[:pos] + new + text[pos + len(old) :]
    return text


@pytest.fixture(scope="module")
def cache() -> EvalCache:
    """One cache for all cases: equal base trees are evaluated once (tree ids are content)."""
    return EvalCache(size=64)


def build_case(case: dict[str, Any], root: Path) -> tuple[GitRepo, str, str]:
    """A repository with the case's base commit and head commit (head: the original + edits)."""
    base_file = BASES[case.get("base", "upstream")]
    assert base_file.exists(), f"missing {base_file}: ../shared must sit next to the checkout"
    original = base_file.read_text()
    base_text = apply_edits(original, case.get("base_edits", []))
    repo = GitRepo(root / "repo")
    repo.write(MANIFEST, base_text)
    repo.write("nixos/common/users/admins.nix", "{ }\n")
    base = repo.commit("base")
    repo.write(MANIFEST, apply_edits(original, case.get("edits", [])))
    for path, content in case.get("files", {}).items():
        repo.write(path, content)
    if "config" in case:
        repo.write(".nixmox.toml", case["config"])
    head = repo.commit("head", allow_empty=True)
    return repo, base, head


def assert_keeps_full_order(plan: Plan, full: Plan) -> None:
    """If the full plan runs a before b, so does this plan (transitively)."""
    full_graph, graph = full.graph(), plan.graph()
    kept = [s.id for s in plan.steps if s.phase is not Phase.TF_DESTROY]
    for sid in kept:
        before = nx.ancestors(full_graph, sid) & set(kept)
        assert before <= nx.ancestors(graph, sid), f"{sid} lost its order after {before}"


def renderings(plan: Plan) -> str:
    return "\n".join(
        [
            render_json(plan),
            render_text(plan),
            *render_markdown(plan),
            json.dumps(render_slack(plan)),
        ]
    )


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_upstream_case(case: dict[str, Any], tmp_path: Path, cache: EvalCache) -> None:
    repo, base, head = build_case(case, tmp_path)
    plan = plan_revisions(repo.path, base, head, service=case.get("service"), cache=cache)
    by_id = plan.by_id()
    assert plan.base == base
    assert plan.head == head

    if "errors_contain" in case:
        assert plan.errors, "an invalid head must give a plan carrying its errors"
        text = "\n".join(finding.render() for finding in plan.errors)
        for expected in case["errors_contain"]:
            assert expected in text
        assert all(f.severity is Severity.ERROR for f in plan.errors)
    else:
        assert plan.ok, [f.render() for f in plan.errors]

    if not plan.ok:
        assert plan.steps == [] and plan.to_json()["steps"] == []
        assert "tmp" not in "".join(f.render() for f in plan.errors), "paths are repo-relative"
        return
    head_manifest = load_manifest_at(repo.path, head, cache=cache)
    if case.get("full"):
        full = plan_full(head_manifest)
        assert [s.id for s in plan.steps] == [s.id for s in full.steps]
        assert {s.id: s.needs for s in plan.steps} == {s.id: s.needs for s in full.steps}
        assert by_id["tf:infra"].targets == sorted(head_manifest.enabled())
    if "steps" in case:
        assert sorted(by_id) == sorted(case["steps"])
    if plan.steps and not case.get("full"):
        assert_keeps_full_order(plan, plan_full(head_manifest))
    for step in plan.steps:
        assert step.reasons, f"{step.id} has no reason"
    if "targets" in case:
        assert by_id["tf:infra"].targets == case["targets"]
    for sid, needs in case.get("needs", {}).items():
        assert by_id[sid].needs == needs, sid
    for sid, reasons in case.get("reasons", {}).items():
        assert by_id[sid].reasons == reasons, sid
    if "changes" in case:
        expected = [
            {"service": c.get("service"), "kind": c["kind"], "fields": c["fields"]}
            for c in case["changes"]
        ]
        assert plan.to_json()["changes"] == expected
    for expected in case.get("note_contains", []):
        assert plan.note is not None and expected in plan.note
    warnings = "\n".join(finding.render() for finding in plan.warnings)
    for expected in case.get("warnings_contain", []):
        assert expected in warnings
    if case.get("steps") == []:
        assert plan.to_json()["steps"] == []
        assert render_text(plan).startswith("No deployment needed")
    text = renderings(plan)
    for secret in case.get("secret_absent", []):
        assert secret not in text


def test_no_op_revisions_need_no_deployment(tmp_path: Path, cache: EvalCache) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.write(MANIFEST, BASES["upstream"].read_text())
    base = repo.commit("base")
    empty = repo.commit("nothing changed", allow_empty=True)
    for head in (base, empty):
        plan = plan_revisions(repo.path, base, head, cache=cache)
        assert plan.ok
        assert plan.steps == [] and plan.changes == []
        assert "No deployment needed" in render_text(plan)
        assert "only comments or formatting" in (plan.note or "")


def test_without_base_it_is_the_full_plan(tmp_path: Path, cache: EvalCache) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.write(MANIFEST, BASES["upstream"].read_text())
    head = repo.commit("only commit")
    plan = plan_revisions(repo.path, None, head, cache=cache)
    full = plan_full(load_manifest_at(repo.path, head, cache=cache))
    assert [s.id for s in plan.steps] == [s.id for s in full.steps]
    assert plan.base is None and plan.head == head
    assert {c.service for c in plan.changes} == set(
        load_manifest_at(repo.path, head, cache=cache).enabled()
    )
    assert {c.kind.value for c in plan.changes} == {"added"}


def test_invalid_repo_config_is_a_plan_error(tmp_path: Path, cache: EvalCache) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.write(MANIFEST, BASES["upstream"].read_text())
    base = repo.commit("base")
    repo.write(".nixmox.toml", "[paths]\nvaultwarden = 'not a list'\n")
    head = repo.commit("bad config")
    plan = plan_revisions(repo.path, base, head, cache=cache)
    assert not plan.ok
    assert ".nixmox.toml" in plan.errors[0].render()
    assert "paths.vaultwarden must be a list" in plan.errors[0].render()


def test_replanning_a_seen_pair_costs_no_evaluation(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    text = BASES["upstream"].read_text()
    repo.write(MANIFEST, text)
    base = repo.commit("base")
    repo.write(MANIFEST, apply_edits(text, CASES[0]["edits"]))
    head = repo.commit("head")
    cache = EvalCache()
    first = plan_revisions(repo.path, base, head, cache=cache)
    assert cache.misses == 2
    again = plan_revisions(repo.path, base, head, cache=cache)
    assert cache.misses == 2 and cache.hits == 2
    assert again.digest == first.digest


def test_evaluation_timeout_raises_a_planning_error(tmp_path: Path) -> None:
    """A timeout is the bot's failure: it raises instead of blaming the manifest."""
    repo = GitRepo(tmp_path / "repo")
    repo.write(MANIFEST, BASES["upstream"].read_text())
    base = repo.commit("base")
    slow = "builtins.length (builtins.filter (x: x == 0) (builtins.genList (x: x) 30000000))\n"
    repo.write(MANIFEST, slow)
    head = repo.commit("slow head")
    with pytest.raises(PlanningError, match="took longer than"):
        plan_revisions(repo.path, base, head, limits=EvalLimits(timeout=0.2))
    with pytest.raises(UnknownRevision):
        plan_revisions(repo.path, "no-such-base", head)

"""Deep nesting in a manifest (issue 9, part 3): any depth is a clear error naming where it
gets too deep, from the CLI and on the Git/PR path, never a RecursionError or a
PydanticSerializationError; the depth is measured before any JSON parser runs."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from planner.findings import ManifestError
from planner.nesting import (
    MAX_NESTING,
    TooDeep,
    loads_bounded,
    nesting_depth,
    nests_deeper_than,
    too_deep_path,
)
from planner.plan import plan_full
from planner.revisions import plan_revisions
from planner.source import load_manifest
from tests.fixtures_github import ManifestRepo

NIXMOX = Path(sys.executable).parent / "nixmox"
# `services.x.interface.a` holds the chain: root, services, x, interface are 4 levels
PREFIX_LEVELS = 4
TOO_DEEP = "nested deeper than 64 levels"


def deep_json(levels: int, *, lists: bool = False) -> str:
    """A manifest whose brackets nest `levels` deep, the chain under services.x.interface.a."""
    chain = levels - PREFIX_LEVELS
    inner = (
        ("[" * chain + '"leaf"' + "]" * chain)
        if lists
        else ('{"k":' * chain + '"leaf"' + "}" * chain)
    )
    return '{"services":{"x":{"ip":"10.0.0.2","interface":{"a":' + inner + "}}}}"


def deep_nix(levels: int) -> str:
    """The same manifest in Nix, the chain built by the evaluator (no huge source file)."""
    chain = levels - PREFIX_LEVELS
    return (
        '{ services.x = { ip = "10.0.0.2"; interface.a = '
        f'builtins.foldl\' (acc: _: {{ k = acc; }}) "leaf" (builtins.genList (x: x) {chain}); }}; }}'
    )


def expected_path(components: int = MAX_NESTING) -> str:
    """The field path of the first object too deep: 64 keys from the top."""
    return "services.x.interface.a" + ".k" * (components - PREFIX_LEVELS)


def nixmox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NIXMOX), *args], capture_output=True, text=True, timeout=120, check=False
    )


def assert_clear_refusal(result: subprocess.CompletedProcess[str], name: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    # a .nix manifest's finding also gets the line and column where the field is written
    where = re.escape(name) + r"(:\d+:\d+)?: " + re.escape(f"{expected_path()}: {TOO_DEEP}")
    assert re.search(where, result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr


CLI_CASES = [
    ("validate", "json", 300),  # was PydanticSerializationError
    ("validate", "json", 1500),  # was RecursionError in the JSON parser
    ("plan", "json", 100_000),
    ("validate", "nix", 1500),
    ("plan", "nix", 300),
    ("plan", "nix", 50_000),  # Nix prints it; the JSON parser never sees it
]


@pytest.mark.parametrize(("command", "kind", "levels"), CLI_CASES)
def test_a_deep_manifest_is_refused_by_the_cli(
    tmp_path: Path, command: str, kind: str, levels: int
) -> None:
    path = tmp_path / f"deep.{kind}"
    path.write_text(deep_json(levels) if kind == "json" else deep_nix(levels))
    assert_clear_refusal(nixmox(command, str(path)), path.name)


def test_sixty_four_levels_are_fine_and_sixty_five_are_not(tmp_path: Path) -> None:
    ok = tmp_path / "ok.json"
    ok.write_text(deep_json(MAX_NESTING))
    plan = plan_full(load_manifest(ok))  # the digest serialises the whole manifest
    assert plan.ok and plan.head and plan.head.startswith("sha256:")

    too_deep = tmp_path / "too-deep.json"
    too_deep.write_text(deep_json(MAX_NESTING + 1))
    with pytest.raises(ManifestError) as refused:
        load_manifest(too_deep)
    [finding] = refused.value.findings
    assert not refused.value.evaluation_failed  # invalid (exit 1), not "could not evaluate"
    assert (finding.code, finding.service, finding.field) == ("too-deep", "x", expected_path())
    assert finding.render().startswith(f"too-deep.json: {expected_path()}: {TOO_DEEP}. Fix: ")


def test_lists_are_levels_too_and_show_their_indexes(tmp_path: Path) -> None:
    path = tmp_path / "lists.json"
    path.write_text(deep_json(2000, lists=True))
    with pytest.raises(ManifestError) as refused:
        load_manifest(path)
    field = refused.value.findings[0].field
    assert field == "services.x.interface.a" + "[0]" * (MAX_NESTING - PREFIX_LEVELS)


def test_a_deep_head_on_the_git_path_is_a_failing_plan(manifest_repo: ManifestRepo) -> None:
    deep = manifest_repo.commit(deep_nix(1500), "deep", branch="deep")

    plan = plan_revisions(manifest_repo.path, "main", "deep")

    assert not plan.ok and plan.head == deep
    [finding] = plan.errors
    assert finding.file == "nixos/service-manifest.nix"
    assert (finding.service, finding.field) == ("x", expected_path())
    assert TOO_DEEP in finding.render()


def test_a_deep_base_gives_the_full_plan_of_head_saying_why(manifest_repo: ManifestRepo) -> None:
    good = manifest_repo.repo.heads.main.commit.hexsha
    manifest_repo.commit(deep_nix(300), "deep", branch="deep")

    plan = plan_revisions(manifest_repo.path, "deep", good)

    assert plan.ok and plan.steps
    assert plan.note is not None and TOO_DEEP in plan.note


def reference_depth(value: Any) -> int:
    """Bracket depth of parsed JSON, the slow obvious way."""
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    return 0


TRICKY_STRINGS = [
    "",
    "[",
    "]]]]",
    "{{{",
    '"',
    '\\"[',
    "\\",
    "\\\\",
    '\\\\"',
    "a\\",
    "\\[\\{",
    "é[ü",
]


def random_value(rng: random.Random, depth: int) -> Any:
    choice = rng.random()
    if depth > 6 or choice < 0.3:
        return rng.choice([*TRICKY_STRINGS, 1, None, True, 2.5])
    if choice < 0.65:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(TRICKY_STRINGS) + str(i): random_value(rng, depth + 1) for i in range(3)}


def test_the_depth_count_ignores_brackets_quotes_and_backslashes_inside_strings() -> None:
    rng = random.Random(9)
    for _ in range(2000):
        value = random_value(rng, 0)
        for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, indent=1)):
            depth = reference_depth(value)
            assert nesting_depth(text.encode()) == depth, text
            for limit in (depth - 2, depth - 1, depth, depth + 1, 2 * depth):
                assert nests_deeper_than(text.encode(), limit) == (depth > limit), (text, limit)


def test_alternating_lists_and_objects_near_the_limit_are_counted_exactly() -> None:
    for depth in (1, 2, 63, 64, 65, 66, 129, 130):
        value: Any = "leaf"
        for level in range(depth):
            value = [value, "]}", 3] if level % 2 else {"k": value, "[": '{\\"[\\'}
        text = json.dumps(value).encode()
        assert reference_depth(value) == nesting_depth(text) == depth
        assert nests_deeper_than(text, MAX_NESTING) == (depth > MAX_NESTING)


def test_the_path_counts_keys_and_list_indexes_as_json_has_them() -> None:
    raw = b'{"a":[1,"[",{"b]":{"c":[[0,[{"d":{}}]]]}}]}'
    assert nesting_depth(raw) == 9
    assert too_deep_path(raw, limit=5) == "a[2].b].c[0]"
    with pytest.raises(TooDeep, match=r"^a\[2\]\.b\]\.c\[0\]\[1\]: nested deeper than 6 levels$"):
        loads_bounded(raw, limit=6)
    assert loads_bounded(raw, limit=9)["a"][1] == "["


def test_long_keys_are_shortened_in_the_path() -> None:
    key = "x" * 10_000
    raw = ('{"' + key + '":' + "[" * 70 + "]" * 70 + "}").encode()
    with pytest.raises(TooDeep) as refused:
        loads_bounded(raw)
    assert refused.value.path.startswith("x" * 39 + "…[0]")
    assert len(refused.value.path) < 300


def test_a_manifest_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "utf16.json"
    path.write_bytes(deep_json(10).encode("utf-16"))
    with pytest.raises(ManifestError, match=r"utf16\.json: byte 0 is not UTF-8"):
        load_manifest(path)

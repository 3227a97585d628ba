"""The layering rule and the absence of import cycles, checked over the source with `ast`.

Front ends (`bot`, `cli`) -> deployment core (`deployments`) -> `runners` and `state` ->
`planner`. Every import counts: module level, inside functions, under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
from click.testing import CliRunner

from cli.main import LAZY_COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("planner", "state", "runners", "deployments", "bot", "cli")

# what each top-level package may import of ours (itself included)
ALLOWED: dict[str, frozenset[str]] = {
    "planner": frozenset({"planner"}),
    "state": frozenset({"state", "planner"}),
    "runners": frozenset({"runners", "state", "planner"}),
    "deployments": frozenset({"deployments", "runners", "state", "planner"}),
    "bot": frozenset(PACKAGES) - {"cli"},
    "cli": frozenset(PACKAGES),
}

# Known cycles, each to be removed (the deployment core's rework of these two files).
KNOWN_CYCLES: list[frozenset[str]] = []  # none left; a new entry needs a reason beside it


@dataclass(frozen=True)
class Import:
    """`importer` imports `imported` (both our modules) at `line`."""

    importer: str
    imported: str
    line: int


def our_modules(root: Path) -> dict[str, Path]:
    """Every module of our packages by dotted name; packages that do not exist are skipped."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        directory = root / package
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    # `from pkg import name` loads `pkg.name` when that is a module, else `pkg` (owning_module)
    return [f"{base}.{alias.name}".lstrip(".") for alias in node.names]


def owning_module(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours a dotted name lives in (`bot.slack.SlackBot` -> `bot.slack`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(root: Path) -> list[Import]:
    """Every import between two of our modules, anywhere in a file."""
    modules = our_modules(root)
    found: set[Import] = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_names(node, module, path.name == "__init__.py"):
                target = owning_module(name, modules)
                if target is not None and target != module:
                    found.add(Import(module, target, node.lineno))
    return sorted(found, key=lambda i: (i.importer, i.imported, i.line))


def import_graph(imports: list[Import]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_edges_from((i.importer, i.imported) for i in imports)
    return graph


def cycles(graph: nx.DiGraph, known: list[frozenset[str]]) -> list[str]:
    """One cycle per strongly connected group of modules, as `a → b → a` (known ones left out)."""
    found: list[str] = []
    for group in nx.strongly_connected_components(graph):
        if len(group) < 2 or frozenset(group) in known:
            continue
        start = min(group)
        edges = nx.find_cycle(graph.subgraph(group), source=start)
        found.append(" → ".join([edges[0][0], *(edge[1] for edge in edges)]))
    return sorted(found)


def layer_violations(imports: list[Import], root: Path) -> list[str]:
    """Imports that point against the layering, as `file:line: a imports b`."""
    found: list[str] = []
    for item in imports:
        layer, target = item.importer.split(".")[0], item.imported.split(".")[0]
        if target not in ALLOWED[layer]:
            path = our_modules(root)[item.importer].relative_to(root)
            allowed = ", ".join(sorted(ALLOWED[layer]))
            found.append(
                f"{path}:{item.line}: {item.importer} imports {item.imported} "
                f"({layer} may import only {allowed})"
            )
    return found


# --- the checks on this repository --------------------------------------------------------------


def test_our_modules_import_each_other_in_no_cycle() -> None:
    found = cycles(import_graph(imports_of(ROOT)), KNOWN_CYCLES)
    assert not found, "import cycles:\n  " + "\n  ".join(found)


def test_every_import_follows_the_layering_rule() -> None:
    found = layer_violations(imports_of(ROOT), ROOT)
    assert not found, "imports against the layering:\n  " + "\n  ".join(found)


def test_the_known_cycle_exceptions_are_still_real() -> None:
    """An exception that no longer happens must be deleted from KNOWN_CYCLES, not kept."""
    graph = import_graph(imports_of(ROOT))
    groups = {frozenset(g) for g in nx.strongly_connected_components(graph) if len(g) > 1}
    stale = [sorted(known) for known in KNOWN_CYCLES if known not in groups]
    assert not stale, f"these KNOWN_CYCLES no longer exist, remove them: {stale}"


def test_the_graph_covers_every_package_that_exists() -> None:
    modules = our_modules(ROOT)
    present = {name.split(".")[0] for name in modules}
    expected = {p for p in PACKAGES if (ROOT / p).is_dir()}
    assert present == expected
    assert {"planner.plan", "cli.main", "bot.app", "runners.executor"} <= set(modules)


# --- what the planning commands load ----------------------------------------------------------

# libraries `validate` and `plan FILE` do not need; each costs 0.1-0.5 s at import
HEAVY_LIBRARIES = (
    "sqlalchemy",
    "aiohttp",
    "slack_bolt",
    "slack_sdk",
    "git",
    "gidgethub",
    "rich",
    "msgspec",
    "prometheus_client",
    "networkx",  # the step DAG only (the executor); planning uses planner.digraph
    "aiosqlite",
    "asyncpg",
)
LOADED_BY = """
import json, sys
from cli.main import main
try:
    main(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})), file=sys.stderr)
"""


def libraries_loaded_by(*args: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running `nixmox ARGS`."""
    result = subprocess.run(
        [sys.executable, "-c", LOADED_BY, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    loaded: list[str] = json.loads(result.stderr.strip().splitlines()[-1])
    return set(loaded)


def test_validate_and_plan_of_a_file_load_no_heavy_library() -> None:
    small = str(ROOT / "manifests" / "small.nix")
    for args in (("validate", small), ("plan", small), ("plan", small, "--format", "json")):
        loaded = libraries_loaded_by(*args)
        assert "planner" in loaded and "pydantic" in loaded, args  # the command did run
        assert not loaded & set(HEAVY_LIBRARIES), (
            f"nixmox {' '.join(args)}: {sorted(loaded & set(HEAVY_LIBRARIES))}"
        )


def test_help_still_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = {
        line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()
    }
    assert listed == {"validate", "plan", *LAZY_COMMANDS}


# --- the checker itself, on a planted tree ------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_through_a_function_level_import_is_named(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "cli/__init__.py": "",
            "cli/main.py": "from cli.render import render\n",
            "cli/render.py": "def render():\n    from cli.main import load\n",
            "planner/__init__.py": "",
        },
    )
    assert cycles(import_graph(imports_of(tmp_path)), []) == ["cli.main → cli.render → cli.main"]


def test_a_relative_and_type_checking_import_against_the_layers_is_reported(
    tmp_path: Path,
) -> None:
    _write(
        tmp_path,
        {
            "planner/__init__.py": "",
            "planner/plan.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from runners import store\n",
            "runners/__init__.py": "",
            "runners/store.py": "from .. import planner\nfrom . import base\n",
            "runners/base.py": "import bot.config\n",
            "bot/__init__.py": "",
            "bot/config.py": "from cli import main\n",
            "cli/__init__.py": "",
            "cli/main.py": "import bot.config, runners.store, planner.plan\n",
        },
    )
    found = layer_violations(imports_of(tmp_path), tmp_path)
    assert [line.split(" (")[0] for line in found] == [
        "bot/config.py:1: bot.config imports cli.main",
        "planner/plan.py:3: planner.plan imports runners.store",
        "runners/base.py:1: runners.base imports bot.config",
    ]


def test_a_known_cycle_is_left_out_and_others_are_not(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "bot/__init__.py": "",
            "bot/context.py": "import bot.jobs\n",
            "bot/jobs.py": "import bot.context\n",
            "bot/a.py": "import bot.b\n",
            "bot/b.py": "import bot.a\n",
        },
    )
    graph = import_graph(imports_of(tmp_path))
    known = [frozenset({"bot.context", "bot.jobs"})]
    assert cycles(graph, known) == ["bot.a → bot.b → bot.a"]

"""Sizes: no module of the application over 600 lines, no class over 400 (each holds one concern)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("planner", "state", "runners", "deployments", "bot", "cli")
MODULE_LIMIT = 600
CLASS_LIMIT = 400


def application_modules() -> list[Path]:
    """Every Python file of the application's packages."""
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def classes_of(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines) of every class in a module, nested ones included."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = f"{prefix}{child.name}"
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                found.append((name, lines))
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def test_the_application_has_modules_to_measure() -> None:
    modules = {path.relative_to(ROOT).parts[0] for path in application_modules()}
    assert modules == set(PACKAGES)


def test_no_module_is_over_the_limit() -> None:
    over = {
        str(path.relative_to(ROOT)): lines
        for path in application_modules()
        if (lines := len(path.read_text().splitlines())) > MODULE_LIMIT
    }
    assert over == {}, f"modules over {MODULE_LIMIT} lines (split along a real seam): {over}"


def test_no_class_is_over_the_limit() -> None:
    over = {
        f"{path.relative_to(ROOT)}:{name}": lines
        for path in application_modules()
        for name, lines in classes_of(path)
        if lines > CLASS_LIMIT
    }
    assert over == {}, f"classes over {CLASS_LIMIT} lines (split along a real seam): {over}"


def test_the_class_measure_counts_a_class_from_its_line_to_its_last(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "class A:\n    x = 1\n\n    class B:\n        y = 2\n\n\ndef f():\n    pass\n"
    )
    assert classes_of(module) == [("A", 5), ("A.B", 2)]

"""Where a finding's field is written: `builtins.unsafeGetAttrPos` positions, as data.

Pure: builds the Nix expression that asks for positions and reads its answer. Running it is
`planner.source.locate` (the planner's only I/O).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.findings import Finding

# `services.gitea.ports[0]` → the attribute `ports` of `services.gitea`
_INDEX = re.compile(r"\[[^\]]*\]")
# asks Nix where each attribute path's last attribute is defined; reads its input from a JSON
# file beside it, so no text of the manifest is ever spliced into Nix code
POSITIONS_NIX = """
let
  input = builtins.fromJSON (builtins.readFile ./positions.json);
  manifest = import (/. + input.manifest);
  at = set: key:
    if builtins.isAttrs set && builtins.hasAttr key set then builtins.getAttr key set else null;
  parent = path:
    builtins.foldl' at manifest (builtins.genList (builtins.elemAt path) (builtins.length path - 1));
  last = path: builtins.elemAt path (builtins.length path - 1);
  position = path:
    let set = parent path; in
    if builtins.isAttrs set && builtins.hasAttr (last path) set
    then builtins.unsafeGetAttrPos (last path) set
    else null;
in
map position input.paths
"""


@dataclass(frozen=True)
class Position:
    """A place in a file: 1-based line and column."""

    file: str
    line: int
    column: int


def attribute_path(field: str | None) -> list[str] | None:
    """The attribute names of a finding's field (list indexes dropped), or None."""
    if not field:
        return None
    parts = [part for part in _INDEX.sub("", field).split(".") if part]
    return parts or None


def wanted_paths(findings: Iterable[Finding]) -> list[list[str]]:
    """The distinct attribute paths the findings name, in a stable order."""
    seen: dict[tuple[str, ...], None] = {}
    for finding in findings:
        path = attribute_path(finding.field)
        if path is not None:
            seen.setdefault(tuple(path), None)
    return [list(path) for path in seen]


def positions_input(manifest: Path, paths: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The JSON the expression reads: the manifest's absolute path and the attribute paths."""
    return {"manifest": str(manifest.resolve()), "paths": [list(path) for path in paths]}


def parse_positions(
    answer: Any, paths: Sequence[Sequence[str]], root: Path
) -> dict[tuple[str, ...], Position]:
    """Nix's answer (a list of `{file, line, column}` or null), keyed by attribute path; files
    are named relative to `root` (the repository or the manifest's directory)."""
    found: dict[tuple[str, ...], Position] = {}
    if not isinstance(answer, list):
        return found
    for path, item in zip(paths, answer, strict=False):
        if not isinstance(item, dict):
            continue
        file, line, column = item.get("file"), item.get("line"), item.get("column")
        if not isinstance(file, str) or not isinstance(line, int) or not isinstance(column, int):
            continue
        found[tuple(path)] = Position(relative_name(Path(file), root), line, column)
    return found


def relative_name(file: Path, root: Path) -> str:
    """`file` relative to `root` when inside it, else its name alone (never a host path)."""
    try:
        return file.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return file.name


def apply_positions(findings: Iterable[Finding], found: dict[tuple[str, ...], Position]) -> None:
    """Give each finding the file, line and column where its field is written."""
    for finding in findings:
        path = attribute_path(finding.field)
        position = found.get(tuple(path)) if path is not None else None
        if position is not None:
            finding.file, finding.line, finding.column = (
                position.file,
                position.line,
                position.column,
            )

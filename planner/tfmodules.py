"""The terraform module graph: which roots use which local module directories.

Pure over text: `build_module_graph` gets the files of a directory from a reader callback
(`planner.source` reads them at a revision) and parses their `module` blocks with python-hcl2.
"""

from __future__ import annotations

import json
import posixpath
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from planner.models import Manifest

HCL_SUFFIX = ".tf"
JSON_SUFFIX = ".tf.json"
MODULE_SUFFIXES = (HCL_SUFFIX, JSON_SUFFIX)  # the files whose `module` blocks are read
# files that make a change "a terraform change" (the graph is read only then)
TERRAFORM_SUFFIXES = (HCL_SUFFIX, JSON_SUFFIX, ".tfvars", ".tfvars.json", ".tftpl")
LOCAL_PREFIXES = ("./", "../")
MAX_MESSAGE = 300

DirectoryReader = Callable[[str], Mapping[str, str]]  # directory -> {file path: text}


@dataclass(frozen=True)
class ModuleCall:
    """One `module "NAME" { source = ... }` block."""

    name: str
    source: str
    version: str | None
    file: str

    @property
    def local(self) -> bool:
        return self.source.startswith(LOCAL_PREFIXES)

    def ref(self) -> str | None:
        """The `?ref=` of a Git source."""
        values = parse_qs(urlsplit(self.source.removeprefix("git::")).query).get("ref")
        return values[0] if values else None


@dataclass(frozen=True)
class ParseProblem:
    """A terraform file the parser refused."""

    file: str
    message: str


@dataclass(frozen=True)
class Usage:
    """A root that uses the module directory a file lies under, and through which calls."""

    root: str
    chain: tuple[tuple[str, str], ...]  # (module name, calling directory), innermost first

    def describe(self) -> str:
        """`module "authentik_manifest" of terraform/authentik` (outer calls follow)."""
        return ", ".join(f'module "{name}" of {caller}' for name, caller in self.chain)


@dataclass
class ModuleGraph:
    """Module calls of every directory reachable from the roots, with the parse problems."""

    roots: tuple[str, ...]
    calls: dict[str, list[ModuleCall]] = field(default_factory=dict)
    problems: dict[str, list[ParseProblem]] = field(default_factory=dict)
    base_calls: dict[str, list[ModuleCall]] = field(default_factory=dict)  # file -> at base

    def edges(self, directory: str) -> list[tuple[ModuleCall, str]]:
        """The local calls of a directory, each with the directory it resolves to."""
        found = []
        for call in self.calls.get(directory, []):
            target = resolve_source(directory, call.source) if call.local else None
            if target is not None:
                found.append((call, target))
        return found

    def callers(self) -> dict[str, list[tuple[str, str]]]:
        """Module directory -> [(calling directory, module name)]."""
        found: dict[str, list[tuple[str, str]]] = {}
        for directory in sorted(self.calls):
            for call, target in self.edges(directory):
                found.setdefault(target, []).append((directory, call.name))
        return found

    def users(self, path: str) -> list[Usage]:
        """Roots using (directly or through other modules) a module directory `path` is under."""
        callers = self.callers()
        chains: dict[str, Usage] = {}
        for directory in sorted(callers, key=len, reverse=True):  # the innermost module first
            if not is_under(path, directory):
                continue
            for usage in walk_up(directory, callers, set(self.roots)):
                chains.setdefault(usage.root, usage)
        return [chains[root] for root in sorted(chains)]

    def closure(self, root: str) -> list[str]:
        """The directories a root reads: itself and every local module, transitively."""
        seen, stack = [root], [root]
        while stack:
            for _call, target in self.edges(stack.pop()):
                if target not in seen:
                    seen.append(target)
                    stack.append(target)
        return seen

    def root_problems(self, root: str) -> list[ParseProblem]:
        """Unparseable files among the directories the root reads."""
        return [problem for d in self.closure(root) for problem in self.problems.get(d, [])]

    def external_changes(self, path: str) -> list[str]:
        """A file's registry and Git module calls whose source, version or ref changed."""
        if path not in self.base_calls:
            return []
        head = {c.name: c for d in self.calls.values() for c in d if c.file == path}
        base = {c.name: c for c in self.base_calls[path]}
        found = []
        for name in sorted(set(head) | set(base)):
            old, new = base.get(name), head.get(name)
            if (old is None or not old.local) and (new is None or not new.local):
                text = describe_external_change(name, old, new)
                if text:
                    found.append(text)
        return found


def describe_external_change(name: str, old: ModuleCall | None, new: ModuleCall | None) -> str:
    """`module "vpc" version 5.0 → 6.0`; empty when nothing changed."""
    if old is None and new is not None:
        return f'module "{name}" added ({new.source})'
    if new is None and old is not None:
        return f'module "{name}" removed ({old.source})'
    if old is None or new is None:
        return ""
    if old.version != new.version:
        return f'module "{name}" version {old.version or "(none)"} → {new.version or "(none)"}'
    if old.ref() != new.ref():
        return f'module "{name}" ref {old.ref() or "(none)"} → {new.ref() or "(none)"}'
    if old.source != new.source:
        return f'module "{name}" source {old.source} → {new.source}'
    return ""


def walk_up(
    directory: str, callers: Mapping[str, list[tuple[str, str]]], roots: set[str]
) -> list[Usage]:
    """Breadth first from a module directory to every root above it (shortest chains)."""
    found: list[Usage] = []
    seen = {directory}
    queue: deque[tuple[str, tuple[tuple[str, str], ...]]] = deque([(directory, ())])
    while queue:
        current, chain = queue.popleft()
        for caller, name in callers.get(current, []):
            if caller in seen:
                continue
            seen.add(caller)
            longer = (*chain, (name, caller))
            if caller in roots:
                found.append(Usage(caller, longer))
            queue.append((caller, longer))
    return found


def normalize_dir(directory: str) -> str:
    """`./terraform/dns/` -> `terraform/dns` (repository-relative, no dots)."""
    text = directory.strip().strip("/")
    normal = posixpath.normpath(text) if text else ""
    return "" if normal == "." else normal


def resolve_source(directory: str, source: str) -> str | None:
    """The directory a local source names, or None when it leaves the repository."""
    target = posixpath.normpath(posixpath.join(directory, source))
    if target == "." or target.startswith("../") or target == ".." or target.startswith("/"):
        return None
    return target


def is_under(path: str, directory: str) -> bool:
    return bool(directory) and path.startswith(directory + "/")


def is_terraform_file(path: str) -> bool:
    return path.endswith(TERRAFORM_SUFFIXES)


def root_directories(
    manifest: Manifest, infra_root: str | None, auth_root: str | None
) -> list[str]:
    """Every terraform root the bot runs: the global roots and each service's module dirs."""
    roots = [infra_root or "", auth_root or ""]
    for svc in manifest.enabled().values():
        if svc.interface.terraform is not None:
            roots.extend(svc.interface.terraform.modules)
    return sorted({normal for root in roots if (normal := normalize_dir(root))})


def may_concern_modules(files: Iterable[str], roots: Iterable[str]) -> bool:
    """Whether the graph is worth reading: a terraform file changed, or a file next to the roots.

    Module directories usually sit beside the roots (`terraform/modules/*` beside
    `terraform/authentik`); a change anywhere else that is no terraform file concerns no module.
    """
    parents = {posixpath.dirname(root) for root in roots} - {""}
    return any(
        is_terraform_file(path) or any(is_under(path, parent) for parent in parents)
        for path in files
    )


def build_module_graph(roots: Iterable[str], read_dir: DirectoryReader) -> ModuleGraph:
    """Read the roots and follow local `source` paths transitively (each directory once)."""
    graph = ModuleGraph(roots=tuple(sorted(set(roots))))
    pending = list(graph.roots)
    while pending:
        directory = pending.pop()
        if directory in graph.calls:
            continue
        calls, problems = parse_directory(read_dir(directory))
        graph.calls[directory] = calls
        if problems:
            graph.problems[directory] = problems
        pending.extend(target for _call, target in graph.edges(directory))
    return graph


def parse_directory(files: Mapping[str, str]) -> tuple[list[ModuleCall], list[ParseProblem]]:
    """The module calls of a directory's terraform files, and the files that did not parse."""
    calls: list[ModuleCall] = []
    problems: list[ParseProblem] = []
    for path in sorted(files):
        try:
            calls.extend(parse_module_calls(path, files[path]))
        except ValueError as exc:
            problems.append(ParseProblem(path, str(exc)))
    return calls, problems


def parse_module_calls(path: str, text: str) -> list[ModuleCall]:
    """The `module` blocks of one `.tf` or `.tf.json` file; ValueError with the parser's words."""
    if path.endswith(JSON_SUFFIX):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
        blocks = data.get("module", {}) if isinstance(data, dict) else {}
        return calls_of(path, [blocks] if isinstance(blocks, dict) else blocks)
    import hcl2  # 0.4 s to import: only when a terraform file changed

    try:
        data = hcl2.loads(text)
    # the parser raises lark's errors and, on odd input, whatever its transformer meets
    except Exception as exc:
        raise ValueError(parser_message(exc)) from None
    return calls_of(path, data.get("module", []))


def parser_message(exc: Exception) -> str:
    """The parser's first line (it says where), bounded."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def calls_of(path: str, blocks: Any) -> list[ModuleCall]:
    """ModuleCalls from parsed `module` blocks: `[{NAME: {source, version, ...}}, ...]`."""
    found: list[ModuleCall] = []
    for block in blocks if isinstance(blocks, list) else []:
        for label, body in block.items() if isinstance(block, dict) else ():
            source = literal(body.get("source")) if isinstance(body, dict) else None
            if source is None or label.startswith("__"):
                continue  # no literal source: terraform refuses it too
            version = literal(body.get("version"))
            found.append(ModuleCall(unquote(label), source, version, path))
    return found


def literal(value: Any) -> str | None:
    """A string attribute's value (python-hcl2 8 keeps the quotes, 7 does not)."""
    if isinstance(value, list) and len(value) == 1:  # older python-hcl2: attributes in lists
        value = value[0]
    if not isinstance(value, str):
        return None
    text = unquote(value)
    return None if "${" in text else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text

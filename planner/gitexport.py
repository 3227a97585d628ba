"""Writing a Git revision's tree to a directory, safely, whatever the tree holds.

A crafted tree (duplicate names, `..`, `/` in a name, `.git`) is what `git fsck` refuses; the
bot may hold one from a mirror that does not check. Every entry is checked before anything is
written, then each is created relative to its directory's descriptor: never through a symlink,
never over an existing file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from planner.errors import PlanningError

GIT_MODE_TYPE = 0o170000
GIT_MODE_TREE = 0o040000
GIT_MODE_FILE = 0o100000
GIT_MODE_SYMLINK = 0o120000
GIT_MODE_SUBMODULE = 0o160000
MAX_TREE_DEPTH = 256
GIT_ID_SIZE = 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeTree(PlanningError):
    """A tree Git itself refuses (`git fsck`): exporting it could write outside its directory."""


class EntryKind(Enum):
    """What a Git tree entry becomes in the export."""

    TREE = "tree"
    FILE = "file"
    EXECUTABLE = "executable"
    SYMLINK = "symlink"
    SUBMODULE = "submodule"


@dataclass
class _Entry:
    """One checked tree entry; a tree's entries are its children."""

    name: str
    kind: EntryKind
    binsha: bytes
    children: list[_Entry] = field(default_factory=list)


def _is_dotgit(name: str) -> bool:
    """`.git` as Git refuses it: in any case, and NTFS's `.git.`, `.git ` and `git~1` spellings."""
    folded = name.lower()
    return folded.rstrip(". ") == ".git" or folded == "git~1"


def _name_problem(name: str, seen: set[str]) -> str | None:
    """Why a tree entry's name cannot be written (None: it can)."""
    if not name:
        return "it has an empty name"
    if name in (".", ".."):
        return f"{name!r} names a directory itself"
    if "/" in name:
        return "its name holds a '/' (an absolute or nested path)"
    if _is_dotgit(name):
        return "it is a .git entry (Git's own directory)"
    if name in seen:
        return "its name appears twice in the same tree"
    return None


def _entry_kind(mode: int) -> EntryKind | None:
    """The kind of entry a Git mode gives (None: not a mode Git writes)."""
    kind = mode & GIT_MODE_TYPE
    if kind == GIT_MODE_TREE:
        return EntryKind.TREE
    if kind == GIT_MODE_SYMLINK:
        return EntryKind.SYMLINK
    if kind == GIT_MODE_SUBMODULE:
        return EntryKind.SUBMODULE
    if kind == GIT_MODE_FILE:
        return EntryKind.EXECUTABLE if mode & 0o111 else EntryKind.FILE
    return None


def _refuse(rev: str, rel: str, why: str) -> UnsafeTree:
    return UnsafeTree(
        f"refusing to export revision {rev[:12]}: the tree entry {rel!r}: {why} "
        "(Git itself refuses such trees: git fsck)"
    )


def _object_data(repo: Any, binsha: bytes, kind: bytes, rev: str, rel: str) -> bytes:
    """The content of a Git object that must be of type `kind` (b"tree", b"blob")."""
    import git

    try:
        stream = repo.odb.stream(binsha)
    except (git.BadObject, ValueError) as exc:
        raise _refuse(rev, rel or "/", "its object is missing") from exc
    if stream.type != kind:
        raise _refuse(rev, rel or "/", f"it is a {stream.type.decode()}, not a {kind.decode()}")
    return bytes(stream.read())


def _tree_entries(data: bytes) -> Iterator[tuple[bytes, int, str]]:
    """(id, mode, name) of each raw entry `MODE NAME\\0<20-byte id>`, names left unchecked.

    Parsed here, not by gitpython: its checks vary between versions and end in bare errors.
    """
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        nul = data.index(b"\0", space)
        binsha = data[nul + 1 : nul + 1 + GIT_ID_SIZE]
        if len(binsha) != GIT_ID_SIZE:
            raise ValueError("truncated tree entry")
        yield (
            binsha,
            int(data[pos:space], 8),
            data[space + 1 : nul].decode("utf-8", "surrogateescape"),
        )
        pos = nul + 1 + GIT_ID_SIZE


def read_checked_tree(repo: Any, rev: str, root: bytes) -> list[_Entry]:
    """Every entry of a revision's tree, checked before anything is written."""
    top: list[_Entry] = []
    pending: list[tuple[bytes, str, list[_Entry]]] = [(root, "", top)]
    while pending:
        binsha, prefix, entries = pending.pop()
        seen: set[str] = set()
        data = _object_data(repo, binsha, b"tree", rev, prefix.rstrip("/"))
        try:
            parsed = list(_tree_entries(data))
        except ValueError as exc:
            raise _refuse(rev, prefix.rstrip("/") or "/", "it is not a well-formed tree") from exc
        for entry_sha, mode, name in parsed:
            rel = prefix + name
            problem = _name_problem(name, seen)
            if problem is not None:
                raise _refuse(rev, rel, problem)
            kind = _entry_kind(mode)
            if kind is None:
                raise _refuse(rev, rel, f"its mode {mode:o} is not one Git writes")
            seen.add(name)
            entry = _Entry(name, kind, entry_sha)
            entries.append(entry)
            if kind is EntryKind.TREE:
                if prefix.count("/") + 1 > MAX_TREE_DEPTH:
                    raise _refuse(rev, rel, f"directories nest deeper than {MAX_TREE_DEPTH}")
                pending.append((entry_sha, rel + "/", entry.children))
    return top


def _write_entry(repo: Any, rev: str, dir_fd: int, entry: _Entry, rel: str) -> int | None:
    """Create one entry in the open directory `dir_fd`; never follows or replaces a link.

    Returns the new directory's descriptor for a tree.
    """
    if entry.kind is EntryKind.TREE:
        os.mkdir(entry.name, 0o777, dir_fd=dir_fd)
        return os.open(entry.name, DIR_FLAGS, dir_fd=dir_fd)
    if entry.kind is EntryKind.SUBMODULE:
        os.mkdir(entry.name, 0o777, dir_fd=dir_fd)  # its content is not in this repository
        return None
    data = _object_data(repo, entry.binsha, b"blob", rev, rel)
    if entry.kind is EntryKind.SYMLINK:
        os.symlink(data.decode("utf-8", "surrogateescape"), entry.name, dir_fd=dir_fd)
        return None
    with os.fdopen(os.open(entry.name, FILE_FLAGS, 0o666, dir_fd=dir_fd), "wb") as out:
        out.write(data)
        if entry.kind is EntryKind.EXECUTABLE:
            os.fchmod(out.fileno(), 0o755)
    return None


def write_tree(repo: Any, rev: str, entries: list[_Entry], dest: Path) -> None:
    """Write checked entries under `dest`, each relative to its directory's descriptor."""
    try:
        top = os.open(dest, DIR_FLAGS)
    except OSError as exc:
        raise PlanningError(f"cannot export into {dest}: {exc.strerror}") from exc
    stack = [(top, iter(entries), "")]
    try:
        while stack:
            dir_fd, todo, prefix = stack[-1]
            entry = next(todo, None)
            if entry is None:
                os.close(stack.pop()[0])
                continue
            rel = prefix + entry.name
            try:
                child = _write_entry(repo, rev, dir_fd, entry, rel)
            except (OSError, ValueError) as exc:
                raise PlanningError(f"cannot export {rel!r} of revision {rev[:12]}: {exc}") from exc
            if child is not None:
                stack.append((child, iter(entry.children), rel + "/"))
    finally:
        for dir_fd, _, _ in stack:
            os.close(dir_fd)

"""Paths built from manifest text (service names, module paths): never outside their root."""

from __future__ import annotations

from pathlib import Path

ESCAPES = "{path} leaves {root} (built from {parts}); names and module paths must stay inside it"


class PathEscapeError(ValueError):
    """A path joined from manifest text would leave the directory it must stay in."""

    def __init__(self, root: Path, parts: tuple[str | Path, ...], path: Path) -> None:
        self.root = root
        self.path = path
        shown = " / ".join(repr(str(part)) for part in parts)
        super().__init__(ESCAPES.format(path=path, root=root, parts=shown))


def contained(root: Path, *parts: str | Path) -> Path:
    """`root / parts...`, resolved (symlinks too); refuses any result outside `root`."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base):
        raise PathEscapeError(base, parts, path)
    return path

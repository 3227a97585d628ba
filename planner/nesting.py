"""JSON with bounded nesting: measured on the raw bytes before parsing, at C speed.

A manifest is data of a few levels; a hostile one can nest deep enough to crash the JSON
parser (RecursionError) or pydantic's serializer. The depth is counted on the text, so
no parser ever sees more than `MAX_NESTING` levels.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_NESTING = 64
MAX_KEY_SHOWN = 40
OPENERS = b"{["
CLOSERS = b"}]"
NOT_MARKS = bytes(byte for byte in range(256) if byte not in b'{}[]"')
# each byte's effect on the nesting depth
DEPTH_STEP = tuple(1 if b in OPENERS else -1 if b in CLOSERS else 0 for b in range(256))
TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)


class TooDeep(ValueError):
    """The JSON nests deeper than allowed; `path` is where (e.g. `services.x.interface.a`)."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        super().__init__(f"{path or '(top level)'}: nested deeper than {limit} levels")


def _brackets(raw: bytes) -> bytes:
    """The brackets of a UTF-8 JSON text that lie outside strings, in order."""
    # without escaped backslashes and escaped quotes, every `"` left opens or closes a string
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in raw else raw
    # brackets and quotes only; `""` (a string with no bracket in it) never changes the depth
    marks = text.translate(None, NOT_MARKS).replace(b'""', b"")
    if b'"' in marks:  # rare: strings holding brackets; keep what lies between strings
        marks = b"".join(marks.split(b'"')[0::2])
    return marks


def nesting_depth(raw: bytes) -> int:
    """How deep brackets nest in a UTF-8 JSON text (brackets inside strings do not count)."""
    return _depth(_brackets(raw))


def _depth(brackets: bytes) -> int:
    return max(accumulate(map(DEPTH_STEP.__getitem__, brackets)), default=0)


def nests_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether a UTF-8 JSON text nests deeper than `limit`: `nesting_depth(raw) > limit`, faster.

    Each pass deletes every innermost `{}` then every `[]`: one or two levels. A manifest
    (a few levels) is cleared in a few passes over a short string, with no per-byte Python.
    """
    brackets = marks = _brackets(raw)
    for passes in range(1, limit + 1):
        shorter = marks.replace(b"{}", b"").replace(b"[]", b"")
        if not shorter and 2 * passes <= limit:
            return False
        if not shorter or shorter == marks:  # 1 or 2 levels per pass; or unbalanced
            return _depth(brackets) > limit
        marks = shorter
    return _depth(brackets) > limit  # a hostile text: count exactly


def loads_bounded(raw: bytes, limit: int = MAX_NESTING) -> Any:
    """Parse UTF-8 JSON; raises TooDeep beyond `limit` levels, before any parsing.

    Also raises UnicodeDecodeError (not UTF-8) and json.JSONDecodeError (bad syntax).
    """
    text = raw.decode("utf-8")  # the depth count reads bytes: other encodings would fool it
    if nests_deeper_than(raw, limit):
        raise TooDeep(too_deep_path(raw, limit), limit)
    return json.loads(text)


def too_deep_path(raw: bytes, limit: int = MAX_NESTING) -> str:
    """The field path of the first value nested deeper than `limit` (only called on failure)."""
    stack: list[list[Any]] = []  # per open container: [is_object, key or index]
    last_string = b""
    for match in TOKEN.finditer(raw):
        token = match.group()
        first = token[:1]
        if first == b'"':
            last_string = token
        elif first == b":" and stack:
            stack[-1][1] = _key(last_string)
        elif first == b"," and stack and not stack[-1][0]:
            stack[-1][1] += 1
        elif first in (b"{", b"["):
            if len(stack) >= limit:
                return _format_path([entry[1] for entry in stack])
            stack.append([first == b"{", "" if first == b"{" else 0])
        elif first in (b"}", b"]") and stack:
            stack.pop()
    return ""


def _key(token: bytes) -> str:
    """A JSON string token as a readable, bounded path component."""
    try:
        key = str(json.loads(token))
    except ValueError:
        key = token.decode("utf-8", "replace").strip('"')
    return key if len(key) <= MAX_KEY_SHOWN else key[: MAX_KEY_SHOWN - 1] + "…"


def _format_path(parts: list[str | int]) -> str:
    """`services.x.interface[0].a`, as validation findings write field paths."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)
    return text.removeprefix(".")

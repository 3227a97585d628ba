"""Redaction: secrets never reach a comment, a Slack message, a log or the store."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
# values under keys named like this (at any depth) are secrets, whatever the module declares
DEFAULT_SECRET_NAMES = r"secret|password|passwd|token|key|credential|private"
VARIABLE_HEAD = re.compile(r'^\s*variable\s+"([^"]+)"\s*\{', re.MULTILINE)
SENSITIVE_TRUE = re.compile(r"^\s*sensitive\s*=\s*true\b", re.MULTILINE)
# quoted strings (whose braces must not count) and comments (dropped)
STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|//[^\n]*|/\*.*?\*/', re.DOTALL)
# shorter values would redact ordinary words and numbers all over the output
MIN_SECRET_LENGTH = 4


class Redactor:
    """Replaces known secret values and configured patterns with `<redacted>`."""

    def __init__(self, patterns: Iterable[str] = (), values: Iterable[str] = ()) -> None:
        self.patterns = [re.compile(pattern) for pattern in patterns]
        self.values: set[str] = set()
        self.add_values(values)

    def add_values(self, values: Iterable[str]) -> None:
        self.values.update(v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH)

    def with_values(self, values: Iterable[str]) -> Redactor:
        """A copy that also hides `values` (per step: the secrets of one workspace)."""
        copy = Redactor()
        copy.patterns = list(self.patterns)
        copy.values = set(self.values)
        copy.add_values(values)
        return copy

    def text(self, text: str) -> str:
        # longest first, so a secret containing another is replaced whole
        for value in sorted(self.values, key=len, reverse=True):
            text = text.replace(value, REDACTED)
        for pattern in self.patterns:
            text = pattern.sub(REDACTED, text)
        return text


def secret_strings(value: Any) -> list[str]:
    """Every string inside a (possibly nested) sensitive value, as it may appear in output."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int | float):
        return [str(value)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in secret_strings(item)]
    if isinstance(value, list | tuple):
        return [s for item in value for s in secret_strings(item)]
    return []


def named_secrets(value: Any, names: re.Pattern[str], *, inside: bool = False) -> list[str]:
    """Every string under a key whose name matches `names` (the key may be any ancestor)."""
    if isinstance(value, str):
        return [value] if inside else []
    if isinstance(value, Mapping):
        return [
            secret
            for key, item in value.items()
            for secret in named_secrets(item, names, inside=inside or bool(names.search(str(key))))
        ]
    if isinstance(value, list | tuple):
        return [secret for item in value for secret in named_secrets(item, names, inside=inside)]
    return []


def _block_body(text: str, start: int) -> str:
    """The text of the `{...}` block opening just before `start` (braces in strings balance)."""
    depth = 1
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return text[start:]


def _top_level(body: str) -> str:
    """The block body without its nested blocks (`validation { ... }`)."""
    kept, depth = [], 0
    for char in body:
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(depth - 1, 0)
        elif depth == 0:
            kept.append(char)
    return "".join(kept)


def _neutral(match: re.Match[str]) -> str:
    """A string with its braces turned into parentheses; a comment dropped."""
    token = match.group(0)
    if not token.startswith('"'):
        return ""
    return token.replace("{", "(").replace("}", ")")


def sensitive_variables(directory: Path) -> set[str]:
    """Names of the variables a module declares `sensitive = true` (`*.tf` and `*.tf.json`)."""
    names: set[str] = set()
    for path in sorted(directory.glob("*.tf")):
        text = STRING_OR_COMMENT.sub(_neutral, path.read_text(errors="replace"))
        for match in VARIABLE_HEAD.finditer(text):
            if SENSITIVE_TRUE.search(_top_level(_block_body(text, match.end()))):
                names.add(match.group(1))
    for path in sorted(directory.glob("*.tf.json")):
        try:
            variables = json.loads(path.read_text(errors="replace")).get("variable", {})
        except (json.JSONDecodeError, AttributeError):
            continue  # terraform itself reports a broken file
        if isinstance(variables, dict):
            names.update(
                name
                for name, decl in variables.items()
                if isinstance(decl, dict) and decl.get("sensitive") is True
            )
    return names

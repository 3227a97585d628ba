"""Redaction: secrets never reach a comment, a Slack message, a log or the store."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "<redacted>"
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

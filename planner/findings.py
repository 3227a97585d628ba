"""Validation findings: errors and warnings that name the service, the field and a fix."""

from __future__ import annotations

from enum import StrEnum

from planner.output import Output


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


class Finding(Output):
    """One problem in a manifest, precise enough to fix without reading code."""

    severity: Severity
    code: str
    message: str
    service: str | None = None
    field: str | None = None
    hint: str | None = None
    file: str | None = None
    # where the field is written (`builtins.unsafeGetAttrPos`), when known
    line: int | None = None
    column: int | None = None

    def location(self) -> str | None:
        """`file:line:column` like a compiler, or just the file."""
        if self.file and self.line is not None:
            return f"{self.file}:{self.line}:{self.column or 1}"
        return self.file

    def render(self) -> str:
        """One line: `file:line:column: field: message (hint)`."""
        where = ": ".join(part for part in (self.location(), self.field) if part)
        text = f"{where}: {self.message}" if where else self.message
        if not self.hint:
            return text
        return f"{text}\n  Fix: {self.hint}" if "\n" in text else f"{text}. Fix: {self.hint}"


def error(code: str, message: str, **where: str | None) -> Finding:
    """An error: the manifest cannot be deployed until it is fixed."""
    return Finding(severity=Severity.ERROR, code=code, message=message, **where)


def warning(code: str, message: str, **where: str | None) -> Finding:
    """A warning: worth a look, deploys anyway."""
    return Finding(severity=Severity.WARNING, code=code, message=message, **where)


class ManifestError(Exception):
    """The manifest could not be loaded or is invalid; carries every finding."""

    def __init__(self, findings: list[Finding], *, evaluation_failed: bool = False) -> None:
        self.findings = findings
        self.evaluation_failed = evaluation_failed
        super().__init__("\n".join(f.render() for f in findings))


def attribute(findings: list[Finding], file: str) -> None:
    """Name the file in every finding that does not name one yet."""
    for finding in findings:
        finding.file = finding.file or file

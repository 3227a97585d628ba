"""What the bot reports on a commit: commit statuses (token mode) or check runs (GitHub App).

Both carry the same names (`nixmox/plan`, `nixmox/deploy`), so branch protection's required
checks work either way. A check run also carries the plan as its output, and the manifest's
findings as annotations on its own lines (at most 50 per request, as GitHub allows).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from bot.github.client import GitHubClient
from bot.github.rest import Repo, StatusState, set_status
from planner.findings import Finding, Severity

log = logging.getLogger(__name__)

ANNOTATIONS_PER_REQUEST = 50  # GitHub refuses more in one create or update
OUTPUT_LIMIT = 65_535  # characters of a check run's summary and of its text
TITLE_LIMIT = 255
TRUNCATED = "\n\n… (cut: GitHub keeps at most 65,535 characters here; the whole plan is at the details link)"


class CheckStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class Conclusion(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


class AnnotationLevel(StrEnum):
    FAILURE = "failure"
    WARNING = "warning"


CONCLUSIONS = {
    StatusState.SUCCESS: Conclusion.SUCCESS,
    StatusState.FAILURE: Conclusion.FAILURE,
    # the bot could not plan or deploy: a required check must not pass
    StatusState.ERROR: Conclusion.FAILURE,
}


@dataclass(frozen=True)
class Report:
    """One outcome to show: the status's state and line, and a check run's whole output."""

    state: StatusState
    description: str
    target_url: str | None = None
    summary: str | None = None  # Markdown: the check run's summary (default: `description`)
    text: str | None = None  # Markdown: the check run's details (the plan)
    findings: Sequence[Finding] = ()


def clip(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """At most `limit` characters, saying so when cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(TRUNCATED)] + TRUNCATED


def annotation(finding: Finding) -> dict[str, Any] | None:
    """A finding as a check annotation on its manifest line (None without a position)."""
    if not finding.file or finding.line is None:
        return None
    level = (
        AnnotationLevel.FAILURE if finding.severity is Severity.ERROR else AnnotationLevel.WARNING
    )
    message = finding.message + (f"\nFix: {finding.hint}" if finding.hint else "")
    found: dict[str, Any] = {
        "path": finding.file,
        "start_line": finding.line,
        "end_line": finding.line,
        "annotation_level": level.value,
        "message": clip(message, 64_000),
    }
    if finding.column is not None:
        found["start_column"] = found["end_column"] = finding.column
    if finding.field:
        found["title"] = finding.field[:TITLE_LIMIT]
    return found


def annotations_of(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    return [found for f in findings if (found := annotation(f)) is not None]


def batches(items: list[dict[str, Any]], size: int = ANNOTATIONS_PER_REQUEST) -> list[list[Any]]:
    """Annotations in requests GitHub accepts; always at least one (maybe empty) batch."""
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


class CommitChecks(Protocol):
    """Where a commit's `nixmox/*` results go."""

    async def pending(self, sha: str, name: str, description: str) -> None: ...

    async def progress(self, sha: str, name: str, report: Report) -> None: ...

    async def final(self, sha: str, name: str, report: Report) -> None: ...


@dataclass
class StatusChecks:
    """Commit statuses: state and a one-line description (token mode)."""

    gh: GitHubClient
    repo: Repo

    async def pending(self, sha: str, name: str, description: str) -> None:
        await set_status(self.gh, self.repo, sha, StatusState.PENDING, name, description)

    async def progress(self, sha: str, name: str, report: Report) -> None:
        await set_status(
            self.gh, self.repo, sha, StatusState.PENDING, name, report.description,
            report.target_url,
        )  # fmt: skip

    async def final(self, sha: str, name: str, report: Report) -> None:
        await set_status(
            self.gh, self.repo, sha, report.state, name, report.description, report.target_url
        )


@dataclass
class CheckRuns:
    """Check runs (GitHub App mode): one run per commit and name, updated in place."""

    gh: GitHubClient
    repo: Repo
    runs: dict[tuple[str, str], int] = field(default_factory=dict)

    async def pending(self, sha: str, name: str, description: str) -> None:
        created = await self.gh.post(
            "/repos/{owner}/{repo}/check-runs",
            url_vars=self.repo.vars(),
            data={
                "name": name,
                "head_sha": sha,
                "status": CheckStatus.IN_PROGRESS.value,
                "output": {"title": description[:TITLE_LIMIT], "summary": description},
            },
        )
        self.runs[(sha, name)] = int(created["id"])

    async def progress(self, sha: str, name: str, report: Report) -> None:
        await self._ensure(sha, name, report.description)
        await self._update(sha, name, report, {"status": CheckStatus.IN_PROGRESS.value})

    async def final(self, sha: str, name: str, report: Report) -> None:
        await self._ensure(sha, name, report.description)
        completed = {
            "status": CheckStatus.COMPLETED.value,
            "conclusion": CONCLUSIONS.get(report.state, Conclusion.FAILURE).value,
        }
        await self._update(sha, name, report, completed)

    async def _ensure(self, sha: str, name: str, description: str) -> None:
        """The run to update: ours, else the commit's unfinished run of that name (another
        job or process started it, e.g. a merge job before its deployment), else a new one."""
        if (sha, name) in self.runs:
            return
        found = await self.gh.getitem(
            "/repos/{owner}/{repo}/commits/{ref}/check-runs{?check_name,filter}",
            url_vars=self.repo.vars(ref=sha, check_name=name, filter="latest"),
        )
        for run in found.get("check_runs", []):
            if run.get("name") == name and run.get("status") != CheckStatus.COMPLETED.value:
                self.runs[(sha, name)] = int(run["id"])
                return
        await self.pending(sha, name, description)

    async def _update(self, sha: str, name: str, report: Report, state: dict[str, Any]) -> None:
        """PATCH the run; annotations go 50 per request (GitHub appends them)."""
        output: dict[str, Any] = {
            "title": report.description[:TITLE_LIMIT],
            "summary": clip(report.summary or report.description),
        }
        if report.text:
            output["text"] = clip(report.text)
        run_id = self.runs[(sha, name)]
        chunks = batches(annotations_of(report.findings))
        for index, chunk in enumerate(chunks):
            data: dict[str, Any] = {"output": {**output, "annotations": chunk}}
            if index == len(chunks) - 1:
                data.update(state)  # the conclusion comes with the last batch
                if report.target_url:
                    data["details_url"] = report.target_url
            await self.gh.patch(
                "/repos/{owner}/{repo}/check-runs/{check_run_id}",
                url_vars=self.repo.vars(check_run_id=run_id),
                data=data,
            )


def commit_checks(gh: GitHubClient, repo: Repo, *, app_mode: bool) -> CommitChecks:
    """Check runs as a GitHub App (installation tokens may create them), else statuses."""
    return CheckRuns(gh, repo) if app_mode else StatusChecks(gh, repo)

"""Commit statuses (`nixmox/plan`, `nixmox/deploy`, `nixmox/deploy/<service>`) and comments.

Small wrappers over the REST endpoints, all with relative URL templates, shared by the PR
planner, the comment commands and the deployment notifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bot.github.client import GitHubClient, split_repo
from bot.jobs import current_job

PLAN_CONTEXT = "nixmox/plan"
DEPLOY_CONTEXT = "nixmox/deploy"
DESCRIPTION_LIMIT = 139  # GitHub refuses 140 characters and more


class StatusState(StrEnum):
    PENDING = "pending"
    SUCCESS = "success"
    FAILURE = "failure"
    ERROR = "error"


class Reaction(StrEnum):
    EYES = "eyes"
    CONFUSED = "confused"


def service_context(service: str) -> str:
    return f"{DEPLOY_CONTEXT}/{service}"


def short(text: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """One line, at most `limit` characters (a status description)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class Repo:
    """The repository the bot works on, as URL template variables."""

    owner: str
    name: str

    @classmethod
    def parse(cls, full_name: str | None) -> Repo:
        owner, name = split_repo(full_name)
        return cls(owner, name)

    def vars(self, **more: Any) -> dict[str, Any]:
        return {"owner": self.owner, "repo": self.name, **more}

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"


async def set_status(
    gh: GitHubClient,
    repo: Repo,
    sha: str,
    state: StatusState,
    context: str,
    description: str,
    target_url: str | None = None,
) -> None:
    data: dict[str, Any] = {
        "state": state.value,
        "context": context,
        "description": short(description),
    }
    if target_url:
        data["target_url"] = target_url
    await gh.post("/repos/{owner}/{repo}/statuses/{sha}", url_vars=repo.vars(sha=sha), data=data)


async def comment(
    gh: GitHubClient, repo: Repo, number: int, body: str, *, mark: bool = True
) -> dict[str, Any]:
    """Post a comment; in a job, marked with the job id (`bot.jobs.JobContext.marker`), and
    in a re-run of the job, not posted again if the dead attempt posted it already.

    `mark=False`: a comment found again by other means (plan comments, edited in place)."""
    job = current_job.get() if mark else None
    if job is not None:
        marker = job.marker(job.next_step("comment"))
        if job.rerun:
            for posted in await list_comments(gh, repo, number):
                if marker in str(posted.get("body") or ""):
                    return posted
        body = f"{body}\n\n{marker}"
    created: dict[str, Any] = await gh.post(
        "/repos/{owner}/{repo}/issues/{number}/comments",
        url_vars=repo.vars(number=number),
        data={"body": body},
    )
    return created


async def edit_comment(gh: GitHubClient, repo: Repo, comment_id: int, body: str) -> None:
    await gh.patch(
        "/repos/{owner}/{repo}/issues/comments/{comment_id}",
        url_vars=repo.vars(comment_id=comment_id),
        data={"body": body},
    )


async def delete_comment(gh: GitHubClient, repo: Repo, comment_id: int) -> None:
    await gh.delete(
        "/repos/{owner}/{repo}/issues/comments/{comment_id}",
        url_vars=repo.vars(comment_id=comment_id),
    )


async def list_comments(gh: GitHubClient, repo: Repo, number: int) -> list[dict[str, Any]]:
    return [
        item
        async for item in gh.getiter(
            "/repos/{owner}/{repo}/issues/{number}/comments{?per_page}",
            url_vars=repo.vars(number=number, per_page=100),
        )
    ]


async def react(gh: GitHubClient, repo: Repo, comment_id: int, reaction: Reaction) -> None:
    await gh.post(
        "/repos/{owner}/{repo}/issues/comments/{comment_id}/reactions",
        url_vars=repo.vars(comment_id=comment_id),
        data={"content": reaction.value},
    )


async def get_pull(gh: GitHubClient, repo: Repo, number: int) -> dict[str, Any]:
    # gidgethub returns the decoded JSON as Any; this endpoint answers with one object
    pull: dict[str, Any] = await gh.getitem(
        "/repos/{owner}/{repo}/pulls/{number}", url_vars=repo.vars(number=number)
    )
    return pull

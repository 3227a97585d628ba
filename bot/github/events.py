"""Which webhook events become which background jobs (gidgethub Router callbacks).

The callbacks are pure: they read the payload, decide, and add a `JobSpec` to the delivery.
The webhook handler records the delivery and enqueues the jobs afterwards, so a payload that
fails validation is answered 400 without anything recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gidgethub import routing, sansio

from bot.chat_commands import is_command
from bot.config import Settings


class JobKind(StrEnum):
    PLAN_PULL = "github.plan"
    COMMAND = "github.command"
    DEPLOY_PUSH = "github.push"


PLANNED_ACTIONS = ("opened", "synchronize", "reopened", "ready_for_review")
ZERO_SHA = "0" * 40


class BadPayload(Exception):
    """A signed delivery whose payload lacks what its event must carry (answered 400)."""


@dataclass(frozen=True)
class JobSpec:
    kind: JobKind
    payload: dict[str, Any]


@dataclass
class Delivery:
    """What the router decided for one delivery."""

    settings: Settings
    jobs: list[JobSpec] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def add(self, kind: JobKind, payload: dict[str, Any]) -> None:
        self.jobs.append(JobSpec(kind, payload))

    def ignore(self, reason: str) -> None:
        self.ignored.append(reason)


def field_at(data: Any, *path: str) -> Any:
    """`data[a][b]...`, or BadPayload naming the missing path."""
    value = data
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise BadPayload(f"the payload has no {'.'.join(path)}")
        value = value[key]
    return value


def installation_id(data: dict[str, Any]) -> int | None:
    installation = data.get("installation")
    if isinstance(installation, dict) and isinstance(installation.get("id"), int):
        return int(installation["id"])
    return None


def is_fork(pull: dict[str, Any]) -> bool:
    """A PR whose head lives in another repository (or in a deleted one)."""
    head_repo = pull.get("head", {}).get("repo")
    base_repo = pull.get("base", {}).get("repo")
    if not isinstance(head_repo, dict) or not isinstance(base_repo, dict):
        return True
    return head_repo.get("id") != base_repo.get("id")


router = routing.Router()


@router.register("pull_request")
async def on_pull_request(event: sansio.Event, delivery: Delivery) -> None:
    """Plan the PR on the actions that change what it would deploy."""
    data = event.data
    action = field_at(data, "action")
    if action not in PLANNED_ACTIONS:
        delivery.ignore(f"pull_request {action} needs no plan")
        return
    pull = field_at(data, "pull_request")
    fork = is_fork(pull)
    if fork and not delivery.settings.plan_forks:
        delivery.ignore("pull requests from forks are not planned (NIXMOX_PLAN_FORKS is off)")
        return
    delivery.add(
        JobKind.PLAN_PULL,
        {
            "number": int(field_at(data, "pull_request", "number")),
            "head_sha": str(field_at(data, "pull_request", "head", "sha")),
            "head_ref": str(field_at(data, "pull_request", "head", "ref")),
            "base_sha": str(field_at(data, "pull_request", "base", "sha")),
            "base_ref": str(field_at(data, "pull_request", "base", "ref")),
            "clone_url": str(field_at(data, "repository", "clone_url")),
            "fork": fork,
            "installation_id": installation_id(data),
            "delivery_id": event.delivery_id,
        },
    )


@router.register("issue_comment", action="created")
async def on_comment(event: sansio.Event, delivery: Delivery) -> None:
    """`/nixmox ...` comments on pull requests (not on issues, not from bots)."""
    data = event.data
    issue = field_at(data, "issue")
    comment = field_at(data, "comment")
    body = comment.get("body") or ""
    if not is_command(body):
        delivery.ignore("not a /nixmox command")
        return
    if not issue.get("pull_request"):
        delivery.ignore("commands are only read on pull requests")
        return
    user = field_at(data, "comment", "user")
    if user.get("type") == "Bot":
        delivery.ignore("comments by bots are not commands")
        return
    delivery.add(
        JobKind.COMMAND,
        {
            "number": int(field_at(data, "issue", "number")),
            "comment_id": int(field_at(data, "comment", "id")),
            "body": body,
            "user": str(field_at(data, "comment", "user", "login")),
            "clone_url": str(field_at(data, "repository", "clone_url")),
            "installation_id": installation_id(data),
            "delivery_id": event.delivery_id,
        },
    )


@router.register("push")
async def on_push(event: sansio.Event, delivery: Delivery) -> None:
    """A push to the default branch deploys, when NIXMOX_APPLY_ON_MERGE is on."""
    data = event.data
    default_branch = field_at(data, "repository", "default_branch")
    ref = field_at(data, "ref")
    after = str(field_at(data, "after"))
    if ref != f"refs/heads/{default_branch}":
        delivery.ignore(f"{ref} is not the default branch")
        return
    if data.get("deleted") or after == ZERO_SHA:
        delivery.ignore("the default branch was deleted")
        return
    if not delivery.settings.apply_on_merge:
        delivery.ignore("deploy on merge is off (NIXMOX_APPLY_ON_MERGE)")
        return
    pusher = data.get("pusher") or {}
    sender = data.get("sender") or {}
    delivery.add(
        JobKind.DEPLOY_PUSH,
        {
            "before": str(field_at(data, "before")),
            "after": after,
            "ref": ref,
            "clone_url": str(field_at(data, "repository", "clone_url")),
            "pusher": str(sender.get("login") or pusher.get("name") or "unknown"),
            "installation_id": installation_id(data),
            "delivery_id": event.delivery_id,
        },
    )


def handles(event: str) -> bool:
    """Whether any callback listens to this event (others are acknowledged and ignored)."""
    return event in ("pull_request", "issue_comment", "push")

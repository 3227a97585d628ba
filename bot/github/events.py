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
from planner.diff import glob_match


class JobKind(StrEnum):
    PLAN_PULL = "github.plan"
    COMMAND = "github.command"
    DEPLOY_PUSH = "github.push"
    PLAN_BRANCH = "github.plan_branch"


PLANNED_ACTIONS = ("opened", "synchronize", "reopened", "ready_for_review")
ZERO_SHA = "0" * 40
BRANCH_PREFIX = "refs/heads/"
TAG_PREFIX = "refs/tags/"
# files a plan can depend on, besides the manifest's own directory (`[paths]` globs elsewhere
# are not seen here: the webhook only has the payload)
MANIFEST_RELATED = (
    "nixos/**",
    "terraform/**",
    "**/*.nix",
    "**/*.tf",
    "**/*.tfvars",
    "flake.lock",
    ".nixmox.toml",
)
MAX_LISTED_COMMITS = 2048  # GitHub lists at most this many commits in a push payload

TAG_PUSH = "tag pushes are not planned ({ref})"
NOT_A_BRANCH = "{ref} is not a branch"
BRANCH_DELETED = "branch {branch} was deleted: nothing to plan"
BRANCH_PUSHES_OFF = (
    "{ref} is not the default branch and branch pushes are not planned "
    "(NIXMOX_PLAN_BRANCH_PUSHES is off)"
)
BRANCH_NOT_LISTED = "branch {branch} matches no NIXMOX_PLAN_BRANCHES pattern"
NO_MANIFEST_FILE = "the push to {branch} touches no manifest-related file"


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
    """The default branch deploys (NIXMOX_APPLY_ON_MERGE); other branches are planned."""
    data = event.data
    default_branch = field_at(data, "repository", "default_branch")
    ref = str(field_at(data, "ref"))
    if ref == f"{BRANCH_PREFIX}{default_branch}":
        on_default_branch_push(event, delivery)
    elif ref.startswith(TAG_PREFIX):
        delivery.ignore(TAG_PUSH.format(ref=ref))
    elif not ref.startswith(BRANCH_PREFIX):
        delivery.ignore(NOT_A_BRANCH.format(ref=ref))
    else:
        on_branch_push(event, delivery, ref.removeprefix(BRANCH_PREFIX), str(default_branch))


def on_default_branch_push(event: sansio.Event, delivery: Delivery) -> None:
    """A push to the default branch deploys, when NIXMOX_APPLY_ON_MERGE is on."""
    data = event.data
    ref = field_at(data, "ref")
    after = str(field_at(data, "after"))
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


def on_branch_push(
    event: sansio.Event, delivery: Delivery, branch: str, default_branch: str
) -> None:
    """A push to another branch is planned against the default branch's merge base."""
    data = event.data
    settings = delivery.settings
    after = str(field_at(data, "after"))
    if data.get("deleted") or after == ZERO_SHA:
        delivery.ignore(BRANCH_DELETED.format(branch=branch))
        return
    if not settings.plan_branch_pushes:
        delivery.ignore(BRANCH_PUSHES_OFF.format(ref=field_at(data, "ref")))
        return
    if settings.plan_branches and not any(
        glob_match(branch, pattern) for pattern in settings.plan_branches
    ):
        delivery.ignore(BRANCH_NOT_LISTED.format(branch=branch))
        return
    files = pushed_files(data)
    if files is not None and not any(manifest_related(f, settings.manifest_path) for f in files):
        delivery.ignore(NO_MANIFEST_FILE.format(branch=branch))
        return
    delivery.add(
        JobKind.PLAN_BRANCH,
        {
            "branch": branch,
            "default_branch": default_branch,
            "after": after,
            "clone_url": str(field_at(data, "repository", "clone_url")),
            "installation_id": installation_id(data),
            "delivery_id": event.delivery_id,
        },
    )


def pushed_files(data: dict[str, Any]) -> set[str] | None:
    """Every file the push's commits touch; None when the payload cannot tell for sure.

    A new branch may carry commits pushed before (not listed), a forced push may have dropped
    commits (their changes are gone from the branch, not listed either), and GitHub lists at
    most 2048 commits: those are planned whatever their files.
    """
    commits = data.get("commits")
    if data.get("created") or data.get("forced") or not isinstance(commits, list):
        return None
    if not commits or len(commits) >= MAX_LISTED_COMMITS:
        return None
    files: set[str] = set()
    for commit in commits:
        if not isinstance(commit, dict):
            return None
        for key in ("added", "modified", "removed"):
            listed = commit.get(key)
            if not isinstance(listed, list):
                return None
            files.update(str(path) for path in listed)
    return files


def manifest_related(path: str, manifest_path: str) -> bool:
    """Whether a changed file can change a plan: the manifest's directory, Nix, terraform..."""
    directory = manifest_path.rpartition("/")[0]
    if path == manifest_path or (directory and path.startswith(directory + "/")):
        return True
    return any(glob_match(path, pattern) for pattern in MANIFEST_RELATED)


def handles(event: str) -> bool:
    """Whether any callback listens to this event (others are acknowledged and ignored)."""
    return event in ("pull_request", "issue_comment", "push")

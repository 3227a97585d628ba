"""`/nixmox ...` commands in pull request comments: plan, apply, status, history, help.

The `github.command` job reacts with 👀 to a command it accepts (😕 and the help text to one
it cannot parse), then runs it. `apply` deploys the PR head only when every requirement holds
(see `check_apply`); a refusal names each requirement that failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import gidgethub

from bot.chat_commands import (
    HELP_TEXT,
    ApplyCommand,
    HelpCommand,
    HistoryCommand,
    ParseError,
    PlanCommand,
    StatusCommand,
    parse_command,
)
from bot.context import BotContext
from bot.github.client import GitHubClient
from bot.github.payloads import FetchFrom, job_of
from bot.github.pulls import (
    PullRef,
    comment_parts,
    compute_plan,
    digest_in,
    plan_comments,
    plan_pull_request,
)
from bot.github.rest import Reaction, Repo, comment, get_pull, react
from bot.request import DeploymentRequest
from deployments import DeployError, views
from planner.escape import md_code, md_fence, md_text, plain_text
from planner.render import render_text
from planner.source import PlanningError
from planner.words import plan_size
from state.deployments import DeploymentRecord
from state.events import DeploymentStarted, Event, Trigger

log = logging.getLogger(__name__)

WRITE_ROLES = frozenset({"admin", "maintain", "write"})
# who may run the read-only commands (plan, status, history) besides the PR's author
READ_COMMAND_ROLES = WRITE_ROLES | {"triage"}
NOT_ALLOWED = (
    "`/nixmox {name}` is for the pull request's author and people with triage, write, maintain "
    "or admin access to {repo}; @{user} has `{role}` access."
)
NO_WRITER_APPROVAL = (
    "no approval of the current head commit {sha} by another writer (someone other than the "
    "author @{author} with write, maintain or admin access)"
)
NOT_CONTAINED = (
    "main has deployed changes this PR does not contain; rebase or merge main "
    "(the last deployed revision {deployed} is not an ancestor of {sha})"
)
NOT_IN_COMMENTS = (
    "`{name}` is not available in pull request comments: here you can use "
    "`plan`, `apply`, `status`, `history` and `help` (deploy, rollback and locks are in Slack "
    "and the `nixmox` CLI)."
)
REFUSED = "`/nixmox apply` refused for {sha}:\n{reasons}"
STARTING = "Deploying {sha} ({size}), requested by @{user}; deployment `{id}`."
NOTHING_TO_APPLY = "Nothing to apply: the plan for {sha} needs no deployment."
FINISHED = "Deployment {id} of {sha} **{state}**.\n\n{steps}"
HISTORY_LIMIT = 10


class Requirement(StrEnum):
    """What `/nixmox apply` checks, by the names NIXMOX_APPLY_REQUIREMENTS uses."""

    NOT_FORK = "not_fork"
    PERMISSION = "permission"
    APPROVED = "approved"
    MERGEABLE = "mergeable"
    PLAN_CURRENT = "plan_current"
    CONTAINS_DEPLOYED = "contains_deployed"


CONFIGURABLE = frozenset({Requirement.APPROVED, Requirement.MERGEABLE})
REQUIREMENT_TITLES = {
    Requirement.NOT_FORK: "not from a fork",
    Requirement.PERMISSION: "write permission",
    Requirement.APPROVED: "approved",
    Requirement.MERGEABLE: "mergeable",
    Requirement.PLAN_CURRENT: "plan is current",
    Requirement.CONTAINS_DEPLOYED: "contains what is deployed",
}


def configured_requirements(names: list[str]) -> set[Requirement]:
    """NIXMOX_APPLY_REQUIREMENTS → requirements; unknown names are a configuration error."""
    chosen: set[Requirement] = set()
    for name in names:
        try:
            requirement = Requirement(name.strip().lower())
        except ValueError:
            requirement = None
        if requirement not in CONFIGURABLE:
            allowed = ", ".join(sorted(r.value for r in CONFIGURABLE))
            raise ValueError(f"unknown apply requirement {name!r} (allowed: {allowed})")
        chosen.add(requirement)
    return chosen


@dataclass
class ApplyCheck:
    """The outcome of the apply requirements: failures by requirement, in check order."""

    failures: dict[Requirement, str] = field(default_factory=dict)
    approvers: list[str] = field(default_factory=list)

    def fail(self, requirement: Requirement, why: str) -> None:
        self.failures[requirement] = why

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        return "\n".join(
            f"- **{REQUIREMENT_TITLES[r]}** ({r.value}): {why}" for r, why in self.failures.items()
        )


@dataclass(frozen=True)
class CommandJob(FetchFrom):
    """A `/nixmox` comment on a pull request (the payload of a command job)."""

    number: int
    comment_id: int
    user: str
    body: str = ""


async def permission_of(gh: GitHubClient, repo: Repo, user: str) -> str:
    """The user's role on the repository (`role_name`, falling back to `permission`)."""
    try:
        data = await gh.getitem(
            "/repos/{owner}/{repo}/collaborators/{username}/permission",
            url_vars=repo.vars(username=user),
        )
    except gidgethub.BadRequest as exc:
        if int(exc.status_code) == 404:
            return "none"
        raise
    return str(data.get("role_name") or data.get("permission") or "none")


@dataclass(frozen=True)
class Review:
    """A reviewer's latest deciding review and the commit it was given on."""

    state: str
    commit_id: str | None


async def review_states(gh: GitHubClient, repo: Repo, number: int) -> dict[str, Review]:
    """Each reviewer's latest deciding review (APPROVED, CHANGES_REQUESTED or DISMISSED)."""
    latest: dict[str, Review] = {}
    async for review in gh.getiter(
        "/repos/{owner}/{repo}/pulls/{number}/reviews{?per_page}",
        url_vars=repo.vars(number=number, per_page=100),
    ):
        login = (review.get("user") or {}).get("login")
        state = str(review.get("state", "")).upper()
        if login and state in ("APPROVED", "CHANGES_REQUESTED", "DISMISSED"):
            latest[login] = Review(state, review.get("commit_id"))
    return latest


@dataclass
class ReviewSummary:
    """The reviews that count: approvals of the head by other writers, writers' blocks."""

    approvers: list[str]
    blockers: list[str]


async def summarize_reviews(
    gh: GitHubClient, repo: Repo, pull: dict[str, Any], reviews: dict[str, Review]
) -> ReviewSummary:
    """Only writers count; an approval counts only on the current head, not by the author."""
    author = (pull.get("user") or {}).get("login")
    head = str(pull["head"]["sha"])
    approvers: list[str] = []
    blockers: list[str] = []
    for login, review in sorted(reviews.items()):
        approves_head = review.state == "APPROVED" and review.commit_id == head and login != author
        if not approves_head and review.state != "CHANGES_REQUESTED":
            continue  # nothing to ask GitHub about
        if await permission_of(gh, repo, login) not in WRITE_ROLES:
            continue  # anyone may review a public PR; only writers decide
        (approvers if approves_head else blockers).append(login)
    return ReviewSummary(approvers, blockers)


def check_reviews(
    check: ApplyCheck,
    required: set[Requirement],
    pull: dict[str, Any],
    reviews: ReviewSummary,
) -> None:
    author = (pull.get("user") or {}).get("login")
    if Requirement.APPROVED in required and not reviews.approvers:
        check.fail(
            Requirement.APPROVED,
            NO_WRITER_APPROVAL.format(sha=str(pull["head"]["sha"])[:12], author=author),
        )
    if Requirement.MERGEABLE in required:
        problems = []
        if reviews.blockers:
            problems.append("changes requested by " + ", ".join(f"@{u}" for u in reviews.blockers))
        if pull.get("state") != "open" or pull.get("merged"):
            problems.append(f"the pull request is {'merged' if pull.get('merged') else 'closed'}")
        if pull.get("draft"):
            problems.append("the pull request is a draft")
        if pull.get("mergeable") is False:
            problems.append("the pull request has merge conflicts")
        if problems:
            check.fail(Requirement.MERGEABLE, "; ".join(problems))


async def check_contains_deployed(ctx: BotContext, check: ApplyCheck, head: str) -> None:
    """The PR head must contain the last deployed revision, or applying it would undo work."""
    deployed = await ctx.require_store().deployments.last_deployed_revision()
    git = ctx.git
    if deployed is None or git is None:
        return
    contained = await asyncio.to_thread(git.has_commit, deployed) and await asyncio.to_thread(
        git.is_ancestor, deployed, head
    )
    if not contained:
        check.fail(
            Requirement.CONTAINS_DEPLOYED,
            NOT_CONTAINED.format(deployed=deployed[:12], sha=head[:12]),
        )


async def check_apply(
    ctx: BotContext, gh: GitHubClient, repo: Repo, job: CommandJob, pull: dict[str, Any]
) -> tuple[ApplyCheck, Any]:
    """Every apply requirement, cheapest first; returns the check and the fresh plan (if made)."""
    check = ApplyCheck()
    ref = PullRef.from_api(pull, job.installation_id)
    if ref.fork:
        check.fail(Requirement.NOT_FORK, "pull requests from forks are never applied")
    role = await permission_of(gh, repo, job.user)
    if role not in WRITE_ROLES:
        check.fail(
            Requirement.PERMISSION,
            f"@{job.user} has `{role}` access to {repo}; apply needs write, maintain or admin",
        )
    if not check.ok:
        return check, None  # no planning on behalf of someone who may not apply anyway
    required = configured_requirements(ctx.settings.apply_requirements)
    reviews = await summarize_reviews(gh, repo, pull, await review_states(gh, repo, job.number))
    check.approvers = reviews.approvers  # recorded with the deployment even when not required
    check_reviews(check, required, pull, reviews)
    if not check.ok:
        return check, None
    login = await ctx.require_github().bot_login(job.installation_id)
    comments = await plan_comments(gh, repo, job.number, login)
    posted = digest_in(comments[0]["body"]) if comments else None
    if posted is None:
        check.fail(Requirement.PLAN_CURRENT, "there is no plan comment yet; run `/nixmox plan`")
        return check, None
    fresh = await compute_plan(ctx, ref)
    digest, head = posted
    if fresh.digest != digest or head != ref.head_sha:
        check.fail(
            Requirement.PLAN_CURRENT,
            f"the plan comment is for {head[:12] or 'another commit'} (digest `{digest[:12]}`), "
            f"but {ref.head_sha[:12]} now plans to digest `{fresh.digest[:12]}`; "
            "run `/nixmox plan`, review the new plan, then apply again",
        )
    elif not fresh.ok:
        check.fail(Requirement.PLAN_CURRENT, "the plan carries validation errors")
    await check_contains_deployed(ctx, check, ref.head_sha)
    return check, fresh


async def run_apply(ctx: BotContext, gh: GitHubClient, repo: Repo, job: CommandJob) -> None:
    pull = await get_pull(gh, repo, job.number)
    sha = str(pull["head"]["sha"])
    try:
        check, plan = await check_apply(ctx, gh, repo, job, pull)
    except PlanningError as exc:
        await comment(
            gh, repo, job.number, f"Could not plan {sha[:12]} to check it: {md_text(str(exc))}"
        )
        return
    await ctx.require_store().audit.record(
        f"github:{job.user}",
        "apply.refused" if not check.ok else "apply.accepted",
        {"pr": job.number, "head": sha, "failed": [r.value for r in check.failures]},
    )
    if not check.ok:
        await comment(gh, repo, job.number, REFUSED.format(sha=sha[:12], reasons=check.render()))
        return
    if not plan.steps:
        await comment(gh, repo, job.number, NOTHING_TO_APPLY.format(sha=sha[:12]))
        return
    request = DeploymentRequest(
        trigger=Trigger.PR_COMMENT,
        requested_by=f"github:{job.user}",
        revision=sha,
        approved_by=",".join(f"github:{u}" for u in check.approvers) or None,
        pr_number=job.number,
        installation_id=job.installation_id,
    )

    async def announce(event: Event) -> None:
        if isinstance(event, DeploymentStarted):
            text = STARTING.format(
                sha=sha[:12], size=plan_size(plan), user=job.user, id=event.deployment_id
            )
            await _safe_comment(gh, repo, job.number, text)

    try:
        record = await ctx.deploy(request, plan, subscribers=[announce])
    except DeployError as exc:
        await _safe_comment(
            gh, repo, job.number, f"Could not deploy {sha[:12]}: {md_text(str(exc))}"
        )
        return
    if record is not None:
        await _safe_comment(gh, repo, job.number, finished_text(record, sha))


def finished_text(record: DeploymentRecord, sha: str) -> str:
    """The reply when an applied deployment ends: its state and each step's."""
    steps = "\n".join(
        f"{step.state.value:<12} {plain_text(step.id)}"
        + (f"  ({plain_text(step.reason)})" if step.reason else "")
        for step in record.steps
    )
    return FINISHED.format(
        id=md_code(record.id), sha=sha[:12], state=record.state.value, steps=md_fence(steps)
    )


async def _safe_comment(gh: GitHubClient, repo: Repo, number: int, text: str) -> None:
    """A progress reply: a failure to post is logged, never fails the deployment."""
    try:
        await comment(gh, repo, number, text)
    except Exception:
        log.warning("could not comment on PR #%d", number, exc_info=True)


def md_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(md_text(cell) if cell else "-" for cell in cells) + " |"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return [md_row(headers), md_row("---" for _ in headers), *(md_row(row) for row in rows)]


def md_when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC") if at else "-"


def status_markdown(view: views.StatusView) -> str:
    """The status view as a PR comment (the CLI's columns and words)."""
    if view.last is None and not view.rows:
        return view.empty_text or views.NOTHING_DEPLOYED
    lines = [f"### {views.STATUS_TITLE}"]
    if view.last is None:
        lines.append(views.NOTHING_DEPLOYED)
    else:
        lines += [md_text(line) for line in views.last_deployment_lines(view.last, md_when)]
    lines.append("")
    if view.rows:
        lines += md_table(views.STATUS_HEADERS, [row.cells() for row in view.rows])
    else:
        lines.append(view.empty_text or "")
    return "\n".join(lines)


def history_markdown(view: views.HistoryView) -> str:
    """The history view as a PR comment (the CLI's columns and words)."""
    if view.empty_text is not None:
        return view.empty_text
    rows = [views.history_cells(row, md_when) for row in view.rows]
    return "\n".join([f"### {view.title}", *md_table(views.HISTORY_HEADERS, rows)])


async def status_text(ctx: BotContext, service: str | None) -> str:
    return status_markdown(await views.status_view(ctx.require_store(), service))


async def history_text(ctx: BotContext, service: str | None) -> str:
    return history_markdown(await views.history_view(ctx.require_store(), service, HISTORY_LIMIT))


async def run_command(ctx: BotContext, payload: dict[str, Any]) -> None:
    """The `github.command` job."""
    job = job_of(CommandJob, payload)
    repo = Repo.parse(ctx.settings.repo)
    gh = await ctx.require_github().client(job.installation_id)
    command = parse_command(job.body)
    if isinstance(command, ParseError):
        await react(gh, repo, job.comment_id, Reaction.CONFUSED)
        await comment(gh, repo, job.number, command.render())
        return
    if isinstance(command, PlanCommand | StatusCommand | HistoryCommand):
        refusal = await read_command_refusal(gh, repo, job, command.name.value)
        if refusal is not None:
            await comment(gh, repo, job.number, refusal)
            return
    await react(gh, repo, job.comment_id, Reaction.EYES)
    match command:
        case ApplyCommand():
            await run_apply(ctx, gh, repo, job)
        case PlanCommand():
            pull = await get_pull(gh, repo, job.number)
            ref = PullRef.from_api(pull, job.installation_id)
            if ref.fork and not ctx.settings.plan_forks:
                await comment(gh, repo, job.number, "Pull requests from forks are not planned.")
                return
            await plan_pull_request(ctx, dataclasses.asdict(ref))
        case StatusCommand(service=service):
            await comment(gh, repo, job.number, await status_text(ctx, service))
        case HistoryCommand(service=service):
            await comment(gh, repo, job.number, await history_text(ctx, service))
        case HelpCommand():
            await comment(gh, repo, job.number, HELP_TEXT)
        case _:
            await comment(gh, repo, job.number, NOT_IN_COMMENTS.format(name=command.name.value))


async def read_command_refusal(
    gh: GitHubClient, repo: Repo, job: CommandJob, name: str
) -> str | None:
    """None when the commenter may run a read-only command; else the reply saying why not."""
    pull = await get_pull(gh, repo, job.number)
    if (pull.get("user") or {}).get("login") == job.user:
        return None
    role = await permission_of(gh, repo, job.user)
    if role in READ_COMMAND_ROLES:
        return None
    return NOT_ALLOWED.format(name=name, repo=repo, user=job.user, role=role)


__all__ = [
    "ApplyCheck",
    "Requirement",
    "check_apply",
    "comment_parts",
    "configured_requirements",
    "render_text",
    "run_command",
]

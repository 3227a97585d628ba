"""Pull requests: plan base → head, keep one plan comment per PR, set `nixmox/plan`.

The plan comment is a comment by the bot's own login that starts with the renderer's hidden
marker (first line `<!-- nixmox:plan...`; anyone can type the marker, so the author decides),
and it is edited in place; a plan longer than one comment is split into numbered comments, and the
extra ones are deleted when it shrinks. The first part also carries a hidden line with the
plan's digest and head commit, which `/nixmox apply` compares with a fresh plan.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bot.context import BotContext
from bot.gitcache import GitCache, GitFetchError, Remote, remote_for
from bot.github.checks import CommitChecks, Report, commit_checks
from bot.github.client import GitHubClient
from bot.github.payloads import FetchFrom, job_of
from bot.github.previews import (
    failed_line,
    newer_head,
    previewed_plan,
    progress_line,
    run_preview,
    wants_preview,
)
from bot.github.rest import (
    PLAN_CONTEXT,
    Repo,
    StatusState,
    comment,
    delete_comment,
    edit_comment,
    get_pull,
    list_comments,
)
from planner.plan import Plan
from planner.preview import HostPreview
from planner.render import render_markdown, summary
from planner.source import PlanningError
from planner.words import plan_size

log = logging.getLogger(__name__)

MARKER_PREFIX = "<!-- nixmox:plan"
META_LINE = "<!-- nixmox:meta digest={digest} head={head} -->"
META_PATTERN = re.compile(r"<!-- nixmox:meta digest=(?P<digest>[0-9a-f]*) head=(?P<head>\w*) -->")
COMMENT_LIMIT = 65536
META_ROOM = 256  # room left in the first comment for the digest line

PLANNING = "planning…"
NO_DEPLOYMENT = "no deployment needed"
COULD_NOT_PLAN = "could not plan: {reason}"
INTERNAL_ERROR = "internal error (see the bot's log)"
INVALID = "invalid manifest: {count} error{s}"
SHARED_PLANS_KEPT = 64  # (base, head) plans remembered per process
MERGE_BASES_KEPT = 1024  # (base, head) merge bases remembered per process


@dataclass(frozen=True)
class PullRef(FetchFrom):
    """A pull request at one head commit (the payload of a plan job)."""

    number: int
    head_sha: str
    base_sha: str
    base_ref: str = ""
    fork: bool = False

    @classmethod
    def from_api(cls, pull: dict[str, Any], installation_id: int | None) -> PullRef:
        from bot.github.events import is_fork

        return cls(
            number=int(pull["number"]),
            head_sha=str(pull["head"]["sha"]),
            base_sha=str(pull["base"]["sha"]),
            base_ref=str(pull["base"]["ref"]),
            clone_url=(pull["base"].get("repo") or {}).get("clone_url"),
            fork=is_fork(pull),
            installation_id=installation_id,
        )


def success_description(plan: Plan) -> str:
    """ "3 services, 7 steps" or "no deployment needed"."""
    if not plan.steps:
        return NO_DEPLOYMENT
    return plan_size(plan)


def plan_status(plan: Plan) -> tuple[StatusState, str]:
    if not plan.ok:
        count = len(plan.errors)
        return StatusState.FAILURE, INVALID.format(count=count, s="s" * (count != 1))
    return StatusState.SUCCESS, success_description(plan)


def is_plan_comment(body: str | None) -> bool:
    return bool(body) and (body or "").lstrip().startswith(MARKER_PREFIX)


def comment_parts(
    plan: Plan,
    previews: Mapping[str, HostPreview] | None = None,
    progress: str | None = None,
) -> list[str]:
    """The rendered comments, the first one carrying the digest line after its marker (and,
    with previews, their section; while they run, the progress line in the last one)."""
    room = META_ROOM + (len(progress.encode()) + 4 if progress else 0)
    parts = list(render_markdown(plan, limit=COMMENT_LIMIT - room, previews=previews))
    if not parts:
        raise PlanningError("the plan renderer returned nothing")
    if progress:
        parts[-1] = f"{parts[-1]}\n\n{progress}"
    meta = META_LINE.format(digest=plan.digest, head=plan.head or "")
    marker, _, rest = parts[0].partition("\n")
    parts[0] = f"{marker}\n{meta}\n{rest}" if rest else f"{marker}\n{meta}"
    return parts


def digest_in(body: str) -> tuple[str, str] | None:
    """(digest, head) from a plan comment, or None when it has no digest line."""
    found = META_PATTERN.search(body)
    return (found["digest"], found["head"]) if found else None


def is_bots_plan_comment(item: dict[str, Any], bot_login: str) -> bool:
    """A plan comment posted by the bot itself (a forged marker by anyone else is not one)."""
    author = (item.get("user") or {}).get("login")
    return author == bot_login and is_plan_comment(item.get("body"))


async def plan_comments(
    gh: GitHubClient, repo: Repo, number: int, bot_login: str
) -> list[dict[str, Any]]:
    """The bot's plan comments on the PR, oldest first (part 1, part 2, ...)."""
    found = [c for c in await list_comments(gh, repo, number) if is_bots_plan_comment(c, bot_login)]
    return sorted(found, key=lambda c: int(c["id"]))


async def upsert_plan_comment(
    gh: GitHubClient, repo: Repo, number: int, parts: list[str], bot_login: str
) -> list[int]:
    """Edit the bot's plan comments in place, add missing parts, delete the extra ones."""
    existing = await plan_comments(gh, repo, number, bot_login)
    ids: list[int] = []
    for index, body in enumerate(parts):
        if index < len(existing):
            old = existing[index]
            if old.get("body") != body:
                await edit_comment(gh, repo, int(old["id"]), body)
            ids.append(int(old["id"]))
        else:
            # found again by its own marker and edited in place: a re-run never duplicates it
            created = await comment(gh, repo, number, body, mark=False)
            ids.append(int(created["id"]))
    for extra in existing[len(parts) :]:
        await delete_comment(gh, repo, int(extra["id"]))
    return ids


async def cache_and_remote(ctx: BotContext, job: FetchFrom) -> tuple[GitCache, Remote]:
    """The Git cache clone, and the remote to fetch into it (with the installation's token)."""
    git = ctx.git
    if git is None:
        raise PlanningError("the Git cache is not set up")
    token = await ctx.require_github().token(job.installation_id)
    return git, remote_for(ctx.settings, job.clone_url, token)


async def compute_plan(ctx: BotContext, pull: PullRef) -> Plan:
    """Fetch the PR's commits into the cache clone and plan merge-base → head."""
    base = await fetched_merge_base(ctx, pull)
    return previewed_plan(ctx, await shared_plan(ctx, base or pull.base_sha, pull.head_sha))


async def fetched_merge_base(ctx: BotContext, pull: PullRef) -> str | None:
    """The merge base of the PR's base and head, their commits fetched into the cache clone.

    Remembered per process: commits never change and fetched ones stay (the cache pins
    them), so the next job for the same head (a redelivery, a label, the branch's push)
    spawns no Git process for it.
    """
    key = (pull.base_sha, pull.head_sha)
    known = ctx.merge_bases.get(key)
    if known is not None:
        ctx.merge_bases.move_to_end(key)
        return known
    base = await _fetch_merge_base(ctx, pull)
    if base is not None:
        ctx.merge_bases[key] = base
        while len(ctx.merge_bases) > MERGE_BASES_KEPT:
            ctx.merge_bases.popitem(last=False)
    return base


async def _fetch_merge_base(ctx: BotContext, pull: PullRef) -> str | None:
    git, remote = await cache_and_remote(ctx, pull)
    refs = [f"refs/pull/{pull.number}/head"]
    if pull.base_ref:
        refs.append(f"refs/heads/{pull.base_ref}")
    try:
        await git.fetch(remote, [pull.base_sha, pull.head_sha], refs)
    except GitFetchError as exc:
        raise PlanningError(str(exc)) from exc
    return await asyncio.to_thread(git.merge_base, pull.base_sha, pull.head_sha)


async def shared_plan(ctx: BotContext, base: str | None, head: str) -> Plan:
    """The plan of base → head, computed once per (base, head) in this process.

    A PR's synchronize and the branch push behind it (or two jobs arriving together) ask for
    the same plan: the first computes it, the others wait for that result. A plan depends only
    on the two commits, so it is kept; a planning failure is not, so the next job tries again.
    """
    plans = ctx.shared_plans
    key = (base, head)
    found = plans.get(key)
    if found is None:
        found = plans[key] = asyncio.ensure_future(plan_between(ctx, base, head))
        found.add_done_callback(lambda done: _forget_failed(plans, key, done))
        while len(plans) > SHARED_PLANS_KEPT:
            plans.popitem(last=False)
    else:
        plans.move_to_end(key)
    # shielded: a cancelled job must not cancel the plan another job waits for
    return await asyncio.shield(found)


def _forget_failed(
    plans: OrderedDict[tuple[str | None, str], asyncio.Future[Plan]],
    key: tuple[str | None, str],
    done: asyncio.Future[Plan],
) -> None:
    """Drop a failed plan (and retrieve its exception: whoever waited has it already)."""
    failed = done.cancelled() or done.exception() is not None
    if failed and plans.get(key) is done:
        del plans[key]


async def plan_between(ctx: BotContext, base: str | None, head: str) -> Plan:
    """plan_revisions outside the event loop (`bot.planning`), against the cache clone."""
    git = ctx.git
    if git is None:
        raise PlanningError("the Git cache is not set up")
    return await ctx.planning.plan_revisions(
        git.path, base, head, manifest_path=ctx.settings.manifest_path
    )


def pull_lock(ctx: BotContext, number: int) -> asyncio.Lock:
    """One plan at a time per PR in this process (the head check covers other replicas)."""
    return ctx.locks.pull(number)


async def plan_pull_request(ctx: BotContext, payload: dict[str, Any]) -> None:
    """The `github.plan` job: status pending, plan, comment, final status."""
    pull = job_of(PullRef, payload)
    newer_head(ctx, pull.number, pull.head_sha)  # the older head's preview is moot
    async with pull_lock(ctx, pull.number):
        await _plan_pull_request(ctx, pull)


async def _plan_pull_request(ctx: BotContext, pull: PullRef) -> None:
    repo = Repo.parse(ctx.settings.repo)
    gh = await ctx.require_github().client(pull.installation_id)
    checks = checks_for(ctx, gh, repo)
    await with_plan_status(
        checks,
        pull.head_sha,
        f"PR #{pull.number}",
        lambda: _plan_and_report(ctx, gh, repo, checks, pull),
    )


def checks_for(ctx: BotContext, gh: GitHubClient, repo: Repo) -> CommitChecks:
    """Check runs when the bot is a GitHub App, commit statuses with a token."""
    return commit_checks(gh, repo, app_mode=ctx.settings.github_app_id is not None)


async def with_plan_status(
    checks: CommitChecks, sha: str, subject: str, work: Callable[[], Awaitable[None]]
) -> None:
    """`nixmox/plan` pending on `sha` while `work` plans and reports; `error` when it fails."""
    await checks.pending(sha, PLAN_CONTEXT, PLANNING)
    try:
        await work()
    except PlanningError as exc:
        log.warning("could not plan %s at %s: %s", subject, sha[:12], exc)
        await _error_status(checks, sha, str(exc))
    except Exception:
        # never leave `pending` behind: say the bot failed, then let the job record why
        await _error_status(checks, sha, INTERNAL_ERROR)
        raise


async def _error_status(checks: CommitChecks, sha: str, reason: str) -> None:
    try:
        report = Report(StatusState.ERROR, COULD_NOT_PLAN.format(reason=reason))
        await checks.final(sha, PLAN_CONTEXT, report)
    except Exception:
        log.warning("could not set %s on %s", PLAN_CONTEXT, sha[:12], exc_info=True)


async def archive_plan(ctx: BotContext, plan: Plan) -> str | None:
    """Keep the plan for `/plans/{key}`; its page URL (None without an archive)."""
    key = await asyncio.to_thread(ctx.plans.save, plan) if ctx.plans else None
    return ctx.plan_url(key) if key else None


async def report_plan_status(
    checks: CommitChecks,
    sha: str,
    plan: Plan,
    target: str | None,
    describe: Callable[[Plan], tuple[StatusState, str]] = plan_status,
) -> None:
    """The final `nixmox/plan` of `sha`: success or failure, linking the plan page; a check
    run also shows the plan and annotates the manifest's lines with its findings."""
    state, description = describe(plan)
    report = Report(
        state,
        description,
        target,
        summary=summary(plan),
        text="\n\n".join(render_markdown(plan)),
        findings=[*plan.errors, *plan.warnings],
    )
    await checks.final(sha, PLAN_CONTEXT, report)


async def _plan_and_report(
    ctx: BotContext, gh: GitHubClient, repo: Repo, checks: CommitChecks, pull: PullRef
) -> None:
    plan = await compute_plan(ctx, pull)
    target = await archive_plan(ctx, plan)
    previewing = wants_preview(ctx, plan)
    progress = progress_line(ctx, plan) if previewing else None
    posted = await _comment_if_current(ctx, gh, repo, pull, comment_parts(plan, None, progress))
    await report_plan_status(checks, pull.head_sha, plan, target)
    if posted and previewing:
        completed = await _preview_and_edit(ctx, gh, repo, pull, plan)
        if completed is not None and completed.digest != plan.digest:
            # the builds found hosts the rules missed: the status describes the completed plan
            target = await archive_plan(ctx, completed)
            await report_plan_status(checks, pull.head_sha, completed, target)


async def _comment_if_current(
    ctx: BotContext, gh: GitHubClient, repo: Repo, pull: PullRef, parts: list[str]
) -> bool:
    """Write the PR's plan comment unless the PR moved on to a newer head."""
    current = await get_pull(gh, repo, pull.number)
    if current.get("head", {}).get("sha") != pull.head_sha:
        log.info(
            "PR #%d moved on from %s; leaving its comment to the newer plan",
            pull.number,
            pull.head_sha[:12],
        )
        return False
    login = await ctx.require_github().bot_login(pull.installation_id)
    await upsert_plan_comment(gh, repo, pull.number, parts, login)
    return True


async def _preview_and_edit(
    ctx: BotContext, gh: GitHubClient, repo: Repo, pull: PullRef, plan: Plan
) -> Plan | None:
    """Build the head's hosts, then edit the comment with what changes on them; the plan
    completed from the builds (None: failed, cancelled, or the PR moved on)."""
    try:
        previewed = await run_preview(ctx, pull.number, plan)
    except Exception as exc:
        log.warning("PR #%d: the host previews failed", pull.number, exc_info=True)
        await _comment_if_current(ctx, gh, repo, pull, comment_parts(plan, None, failed_line(exc)))
        return None
    if previewed is None:
        log.info("PR #%d: preview of %s cancelled by a newer push", pull.number, pull.head_sha[:12])
        return None
    completed, previews = previewed
    posted = await _comment_if_current(ctx, gh, repo, pull, comment_parts(completed, previews))
    return completed if posted else None

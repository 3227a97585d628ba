"""Deploy on merge: a push to the default branch deploys what changed since the last deployment.

The plan goes from the base revision of the deployment core's one rule (`deployments.base`:
the last successfully deployed revision; everything when deployments were attempted but none
fully succeeded yet; with an empty store, a bot installed on a running homelab, the push's
`before`) to `after`. Deployments from pushes run
one at a time in a process, each planned after the previous one finished, and a push whose
commit is already contained in the deployed revision (a late delivery) deploys nothing. A
merge whose services are locked waits up to NIXMOX_MERGE_LOCK_WAIT seconds (`nixmox/deploy`
pending, naming the lock), then gives up with `error`: the merge is not deployed and someone
has to look.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bot.context import BotContext
from bot.gitcache import GitCache, GitFetchError, is_sha, remote_for
from bot.github.checks import CommitChecks, Report
from bot.github.client import GitHubClient
from bot.github.payloads import FetchFrom, job_of
from bot.github.pulls import (
    archive_plan,
    cache_and_remote,
    checks_for,
    plan_status,
    report_plan_status,
    shared_plan,
    with_plan_status,
)
from bot.github.rest import DEPLOY_CONTEXT, Repo, StatusState
from bot.jobs import worker_name
from bot.request import DeploymentRequest
from deployments import (
    NOT_YET_DEPLOYED,
    DeployError,
    DeploymentRefused,
    lock_names,
    plan_for_deploy,
)
from planner.plan import Plan
from planner.source import PlanningError
from state.events import Trigger
from state.locks import LockBusy

log = logging.getLogger(__name__)

PLANNING = "planning the deployment…"
NO_DEPLOYMENT = "no deployment needed"
ALREADY_DEPLOYED = "already deployed: the deployed revision contains this commit"
COULD_NOT_PLAN = "could not plan: {reason}"
COULD_NOT_START = "could not start: {reason}"
INTERNAL_ERROR = "internal error (see the bot's log)"
STOPPED = "the deployment stopped on an internal error (see the bot's log)"
WAITING = "waiting for {service} locked by {holder}"
STILL_LOCKED = "not deployed: {service} still locked by {holder} after {wait:g} s"
FIRST_ERROR = "{description}; {error}"
MERGE_LOCK_PREFIX = "merge:"  # a store lock per revision: one worker at a time deploys it
MERGE_HOLDER_PREFIX = "merge-deploy:"
MERGE_LOCK_LEASE = timedelta(seconds=30)  # renewed every 10 s; a dead holder's runs out
MERGE_LOCK_WAIT = 3600.0  # seconds a push waits for another worker deploying its revision
STILL_DEPLOYING = "not deployed: another worker was still deploying this commit after {wait:g} s"


async def deploy_push(ctx: BotContext, payload: dict[str, Any]) -> None:
    """The `github.push` job."""
    after = str(payload["after"])
    before = str(payload.get("before", ""))
    repo = Repo.parse(ctx.settings.repo)
    installation = payload.get("installation_id")
    gh = await ctx.require_github().client(installation)
    checks = checks_for(ctx, gh, repo)
    started = False

    async def status(state: StatusState, description: str, target: str | None = None) -> None:
        nonlocal started
        try:
            if state is not StatusState.PENDING:
                await checks.final(after, DEPLOY_CONTEXT, Report(state, description, target))
            elif started:
                await checks.progress(after, DEPLOY_CONTEXT, Report(state, description, target))
            else:
                await checks.pending(after, DEPLOY_CONTEXT, description)
                started = True
        except Exception:
            ctx.metrics.github_calls_failed.inc()
            log.warning("could not set %s on %s", DEPLOY_CONTEXT, after[:12], exc_info=True)

    await status(StatusState.PENDING, PLANNING)
    async with ctx.locks.merge_deploys:
        try:
            claim = await merge_claim(ctx, after)
        except LockBusy:
            await status(StatusState.ERROR, STILL_DEPLOYING.format(wait=MERGE_LOCK_WAIT))
            return
        async with claim:
            await plan_and_deploy(ctx, payload, before, after, status)


def merge_lock_name(revision: str) -> str:
    """The store lock a push's deployment of `revision` holds (across every worker)."""
    return f"{MERGE_LOCK_PREFIX}{revision}"


async def merge_claim(
    ctx: BotContext, revision: str
) -> contextlib.AbstractAsyncContextManager[None]:
    """The store lock of `revision`, taken (LockBusy after MERGE_LOCK_WAIT s): while it is held
    no other worker plans or deploys it; a second delivery waits, then plans against what the
    first deployed (usually: already deployed). Entering it keeps the lease; leaving releases."""
    holder = f"{MERGE_HOLDER_PREFIX}{worker_name()}"
    locks = ctx.require_store().locks
    await locks.acquire(
        [merge_lock_name(revision)], holder, lease=MERGE_LOCK_LEASE, wait=MERGE_LOCK_WAIT
    )
    return locks.keeping(holder, MERGE_LOCK_LEASE)


async def plan_and_deploy(
    ctx: BotContext,
    payload: dict[str, Any],
    before: str,
    after: str,
    status: Callable[..., Awaitable[None]],
) -> None:
    """Plan the push and deploy it, reporting on `nixmox/deploy`."""
    installation = payload.get("installation_id")
    try:
        plan = await plan_push(ctx, payload, before, after)
    except PlanningError as exc:
        await status(StatusState.ERROR, COULD_NOT_PLAN.format(reason=exc))
        return
    except Exception:
        await status(StatusState.ERROR, COULD_NOT_PLAN.format(reason=INTERNAL_ERROR))
        raise
    if plan is None:
        await status(StatusState.SUCCESS, ALREADY_DEPLOYED)
        return
    key = await asyncio.to_thread(ctx.plans.save, plan) if ctx.plans else None
    target = ctx.plan_url(key) if key else None
    if not plan.ok or not plan.steps:
        state, description = plan_status(plan)  # failure (invalid) or "no deployment needed"
        await status(state, description, target)
        return
    request = DeploymentRequest(
        trigger=Trigger.MERGE,
        requested_by=f"github:{payload.get('pusher', 'unknown')}",
        revision=after,
        installation_id=installation,
    )
    if plan.note == NOT_YET_DEPLOYED:
        await status(StatusState.PENDING, NOT_YET_DEPLOYED, target)
    await announce_wait(ctx, plan, status)
    try:
        await ctx.deploy(request, plan, lock_wait=ctx.settings.merge_lock_wait)
    except DeploymentRefused as exc:
        busy = exc.busy
        text = STILL_LOCKED.format(
            service=busy.service, holder=busy.holder, wait=ctx.settings.merge_lock_wait
        )
        await status(StatusState.ERROR, text, target)
    except DeployError as exc:
        await status(StatusState.FAILURE, COULD_NOT_START.format(reason=exc), target)
    except Exception:
        # the deployment record says where it stopped; the status must not stay pending
        await status(StatusState.ERROR, STOPPED, target)
        raise


async def announce_wait(
    ctx: BotContext, plan: Plan, status: Callable[[StatusState, str], Awaitable[None]]
) -> None:
    """`nixmox/deploy` pending, naming the lock the deployment is about to wait for."""
    wanted = set(lock_names(plan))
    held = [lock for lock in await ctx.require_store().locks.all() if lock.service in wanted]
    if held:
        await status(
            StatusState.PENDING, WAITING.format(service=held[0].service, holder=held[0].holder)
        )


async def plan_push(
    ctx: BotContext, payload: dict[str, Any], before: str, after: str
) -> Plan | None:
    """The plan from the base revision (`deployments.base`; the push's `before` is what runs
    when nothing was deployed yet) to `after`; None when `after` is already deployed."""
    git = ctx.git
    if git is None:
        raise PlanningError("the Git cache is not set up")
    store = ctx.require_store()
    deployed = await store.deployments.last_deployed_revision()
    wanted = [sha for sha in (after, before, deployed) if sha is not None and is_sha(sha)]
    await fetch_push(ctx, payload, after, wanted)
    if deployed and await already_contained(git, after, deployed):
        log.info("push %s is already contained in deployed %s", after[:12], deployed[:12])
        return None
    return await plan_for_deploy(
        store,
        git.path,
        after,
        running=before if is_sha(before) else None,
        manifest_path=ctx.settings.manifest_path,
        cache=ctx.eval_cache,
    )


async def fetch_push(
    ctx: BotContext, payload: dict[str, Any], after: str, wanted: list[str]
) -> None:
    """Fetch the push's commits (and the deployed one) into the Git cache."""
    git = ctx.git
    assert git is not None
    token = await ctx.require_github().token(payload.get("installation_id"))
    remote = remote_for(ctx.settings, payload.get("clone_url"), token)
    try:
        await git.fetch(remote, wanted, [str(payload["ref"])] if payload.get("ref") else None)
    except GitFetchError as exc:
        if not await asyncio.to_thread(git.has_commit, after):
            raise PlanningError(str(exc)) from exc
        # an old base that the remote no longer has: plan from what we can see
        log.warning("planning the push without some base commits: %s", exc)


async def already_contained(git: GitCache, after: str, deployed: str) -> bool:
    """A late delivery: the deployed revision already contains `after`."""
    if not await asyncio.to_thread(git.has_commit, deployed):
        return False
    return await asyncio.to_thread(git.is_ancestor, after, deployed)


# --- pushes to other branches: planned, never deployed --------------------------------------


@dataclass(frozen=True)
class BranchPush(FetchFrom):
    """A push to a branch other than the default one (the payload of a branch plan job)."""

    branch: str
    default_branch: str
    after: str


async def plan_branch_push(ctx: BotContext, payload: dict[str, Any]) -> None:
    """The `github.plan_branch` job: `nixmox/plan` on the pushed head, no comment."""
    push = job_of(BranchPush, payload)
    repo = Repo.parse(ctx.settings.repo)
    gh = await ctx.require_github().client(push.installation_id)
    number = await open_pull_of(gh, repo, push.branch)
    if number is not None:
        log.info(
            "%s at %s is the head of PR #%d: planned by the PR",
            push.branch,
            push.after[:12],
            number,
        )
        return
    checks = checks_for(ctx, gh, repo)
    await with_plan_status(
        checks,
        push.after,
        f"branch {push.branch}",
        lambda: _plan_branch_and_report(ctx, checks, push),
    )


async def open_pull_of(gh: GitHubClient, repo: Repo, branch: str) -> int | None:
    """The open PR whose head is `branch` of this repository, if any (None when unknown)."""
    try:
        async for pull in gh.getiter(
            "/repos/{owner}/{repo}/pulls{?state,head,per_page}",
            url_vars=repo.vars(state="open", head=f"{repo.owner}:{branch}", per_page=100),
        ):
            if pull.get("head", {}).get("ref") == branch:
                return int(pull["number"])
    except Exception:
        # planning twice is better than not at all: the statuses would agree
        log.warning("could not list the pull requests of %s; planning it", branch, exc_info=True)
    return None


async def _plan_branch_and_report(ctx: BotContext, checks: CommitChecks, push: BranchPush) -> None:
    plan = await compute_branch_plan(ctx, push)
    target = await archive_plan(ctx, plan)
    await report_plan_status(checks, push.after, plan, target, branch_plan_status)


def branch_plan_status(plan: Plan) -> tuple[StatusState, str]:
    """As a PR's, but an invalid manifest names its first error (no comment lists them)."""
    state, description = plan_status(plan)
    if plan.errors:
        description = FIRST_ERROR.format(description=description, error=plan.errors[0].render())
    return state, description


async def compute_branch_plan(ctx: BotContext, push: BranchPush) -> Plan:
    """Fetch the default branch and the head; plan their merge base → head (shared plan)."""
    git, remote = await cache_and_remote(ctx, push)
    try:
        tip = await git.branch_tip(remote, push.default_branch)
        await git.fetch(remote, [push.after], [f"refs/heads/{push.branch}"])
    except GitFetchError as exc:
        raise PlanningError(str(exc)) from exc
    base = await asyncio.to_thread(git.merge_base, tip, push.after)
    # no common history: everything the head has is new
    return await shared_plan(ctx, base, push.after)

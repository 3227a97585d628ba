"""What the Slack bot asks of the rest of NixMox: plan a request, run an approved one.

`RepoBackend` plans against the manifest repository (the default branch head, or `--ref`,
fetched into the bot's bare Git cache) and the deployed state in the store, and runs approved
plans through `BotContext.deploy` / `BotContext.rollback` (the deployment core), so every registered notifier
(Slack progress, GitHub statuses and Deployment) follows the deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bot.context import BotContext
from bot.gitcache import (
    SHA_PATTERN,
    GitCache,
    GitFetchError,
    ManifestGit,
    Remote,
    UnknownRef,
    ls_remote,
    resolve_ref,
)
from bot.request import DeploymentRequest
from bot.slack.asks import Ask
from deployments import DeployError, GitSource, RollbackPlan, plan_for_deploy, prepare_rollback
from planner.models import Manifest
from planner.plan import Plan
from planner.revisions import plan_revisions
from planner.source import PlanningError, UnknownRevision
from state.deployments import DeploymentRecord
from state.events import DeploymentKind, Subscriber

UNKNOWN_REF = "`{ref}` is not a branch, tag or full commit id of the manifest repository"
PULL_REF_PREFIXES = ("refs/pull/", "pull/")
PULL_REF_REFUSED = (
    "`{ref}` is a pull request ref: Slack deploys only commits on the manifest repository's "
    "own branches (merge the pull request, or deploy it with `/nixmox apply` on the PR)"
)
NOT_ON_A_BRANCH = (
    "commit `{sha}` is not on any branch of the manifest repository (a fork's pull request?): "
    "Slack deploys only commits on the repository's own branches"
)
BRANCH_REFS = ("HEAD", "refs/heads/")  # what a branch name or the default branch resolves to


class PlanFailure(Exception):
    """The bot could not plan a request (the message is safe to show in Slack)."""


class RefRefused(PlanFailure):
    """The ref names code Slack must not deploy: a pull request's, or a fork's commit."""


def ref_refusal(ref: str | None) -> str | None:
    """Why `ref` is refused outright (a pull request ref), or None."""
    if ref is not None and ref.startswith(PULL_REF_PREFIXES):
        return PULL_REF_REFUSED.format(ref=ref)
    return None


@dataclass
class Planned:
    """A planned request: the plan, the commit it deploys, and for rollbacks how to run it."""

    plan: Plan
    revision: str | None
    rollback: RollbackPlan | None = None
    scope: str | None = None  # the one service asked for; None: the whole homelab

    @property
    def description(self) -> str:
        return self.rollback.description if self.rollback is not None else ""

    def to_json(self) -> dict[str, Any]:
        """For the job queue: everything needed to run exactly what was approved."""
        rollback = None
        if self.rollback is not None:
            rb = self.rollback
            rollback = {
                "manifest": rb.manifest.model_dump(mode="json"),
                "targets": rb.targets,
                "revision": rb.revision,
                "repo_dir": str(rb.repo_dir) if rb.repo_dir is not None else None,
                "scope": rb.scope,
                "source_deployment": rb.source_deployment,
                "description": rb.description,
            }
        return {
            "plan": self.plan.model_dump(mode="json"),
            "revision": self.revision,
            "rollback": rollback,
            "scope": self.scope,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Planned:
        plan = Plan.model_validate(data["plan"])
        rollback = None
        if data.get("rollback") is not None:
            rb = data["rollback"]
            rollback = RollbackPlan(
                plan=plan,
                manifest=Manifest.model_validate(rb["manifest"]),
                targets=dict(rb.get("targets") or {}),
                revision=rb.get("revision"),
                repo_dir=Path(rb["repo_dir"]) if rb.get("repo_dir") else None,
                scope=rb.get("scope"),
                source_deployment=rb.get("source_deployment"),
                description=rb.get("description") or "",
            )
        return cls(
            plan=plan, revision=data.get("revision"), rollback=rollback, scope=data.get("scope")
        )


class Backend(Protocol):
    """Planning and running, as the Slack flows need them."""

    async def plan(self, ask: Ask) -> Planned: ...

    async def check_ref(self, ref: str) -> None: ...

    async def run(
        self,
        planned: Planned,
        request: DeploymentRequest,
        *,
        subscribers: list[Subscriber] | None = None,
    ) -> DeploymentRecord | None: ...


class RepoBackend:
    """Plans from the manifest repository and the store; runs through the BotContext."""

    def __init__(self, ctx: BotContext) -> None:
        self.ctx = ctx
        self._git: GitCache | None = None

    @property
    def git(self) -> GitCache:
        """The bot's Git cache (GitHub's when it has one, else one of our own)."""
        if self.ctx.git is not None:
            return self.ctx.git
        if self._git is None:
            self._git = GitCache.for_settings(self.ctx.settings)
        return self._git

    @property
    def access(self) -> ManifestGit:
        """The one Git access to the manifest repository (bot.gitcache), with this cache."""
        return self.ctx.manifest_git(self.git)

    async def remote(self) -> Remote:
        with git_failures():
            return await self.access.remote()

    async def fetch(self, ref: str | None) -> str:
        """The commit `ref` (default: the remote's default branch) names, fetched into the cache.

        Refuses pull request refs, and commits not on one of the repository's own branches.
        """
        refusal = ref_refusal(ref)
        if refusal is not None:
            raise RefRefused(refusal)
        if ref is None:
            return await self.default_branch()
        remote = await self.remote()
        names: list[str] = []
        with git_failures():
            if SHA_PATTERN.match(ref):
                sha = ref
            else:
                sha, names = await resolve_ref(remote, ref)
            await self.git.fetch(remote, [sha], refs=names)
        if not any(name.startswith(BRANCH_REFS) for name in names):
            await self.require_on_a_branch(remote, sha)  # a commit id or a tag
        return sha

    async def default_branch(self) -> str:
        """The head of the remote's default branch, fetched (one Git access: bot.gitcache)."""
        with git_failures():
            return await self.access.default_branch()

    async def check_ref(self, ref: str) -> None:
        """Raise RefRefused when `ref` names code Slack must not deploy."""
        await self.fetch(ref)

    async def require_on_a_branch(self, remote: Remote, sha: str) -> None:
        """RefRefused unless `sha` is in the history of one of the remote's branches."""
        with git_failures():
            heads = await ls_remote(remote, ["--heads"])
            await self.git.fetch(remote, list(heads.values()), refs=list(heads))

        def contained() -> bool:
            return any(self.git.is_ancestor(sha, head) for head in heads.values())

        if not await asyncio.to_thread(contained):
            raise RefRefused(NOT_ON_A_BRANCH.format(sha=sha[:12]))

    async def plan(self, ask: Ask) -> Planned:
        store = self.ctx.require_store()
        settings = self.ctx.settings
        try:
            if ask.kind is DeploymentKind.ROLLBACK:
                return await self._plan_rollback(ask)
            sha = await self.fetch(ask.ref)
            if ask.redeploy:
                plan = await asyncio.to_thread(
                    plan_revisions,
                    self.git.path,
                    None,
                    sha,
                    manifest_path=settings.manifest_path,
                    service=ask.service,
                    cache=self.ctx.eval_cache,
                )
                return Planned(plan=plan, revision=sha, scope=ask.service)
            plan = await plan_for_deploy(
                store,
                self.git.path,
                sha,
                service=ask.service,
                manifest_path=settings.manifest_path,
                cache=self.ctx.eval_cache,
            )
            return Planned(plan=plan, revision=sha, scope=ask.service)
        except (DeployError, PlanningError, UnknownRevision, GitFetchError) as exc:
            raise PlanFailure(str(exc)) from None

    async def _plan_rollback(self, ask: Ask) -> Planned:
        store = self.ctx.require_store()
        to = ask.to
        repo_dir = None
        if to is not None and await store.deployments.get(to) is None:
            to = await self.fetch(to)  # not a deployment id: a Git ref to deploy as a rollback
            repo_dir = self.git.path
        rollback = await prepare_rollback(
            store,
            service=ask.service,
            to=to,
            repo_dir=repo_dir,
            manifest_path=self.ctx.settings.manifest_path,
        )
        return Planned(plan=rollback.plan, revision=rollback.revision, rollback=rollback)

    async def run(
        self,
        planned: Planned,
        request: DeploymentRequest,
        *,
        subscribers: list[Subscriber] | None = None,
    ) -> DeploymentRecord | None:
        if planned.rollback is not None:
            return await self.ctx.rollback(request, planned.rollback, subscribers=subscribers)
        source = GitSource(self.git.path, request.revision, self.ctx.settings.manifest_path)
        return await self.ctx.deploy(
            request,
            planned.plan,
            source=source,
            scope=planned.scope,
            subscribers=subscribers,
        )


@contextlib.contextmanager
def git_failures() -> Iterator[None]:
    """The manifest repository's Git errors as the PlanFailure a request's message shows (their
    messages carry no credentials)."""
    try:
        yield
    except UnknownRef as exc:
        raise PlanFailure(UNKNOWN_REF.format(ref=exc.ref)) from None
    except GitFetchError as exc:
        raise PlanFailure(str(exc)) from None

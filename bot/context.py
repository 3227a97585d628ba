"""What every part of the running bot shares: settings, store, clients, jobs, front ends.

One `BotContext` is made by `bot.app.build_app` and stored in the aiohttp application under
`CONTEXT`. Resources that need the event loop (the store, the HTTP session, the GitHub client
factory, the job worker) are filled in when the application starts and are `None` before that.
Every deployment the bot runs goes through `deploy` / `rollback`, i.e. the deployment core
(`deployments`), with the execution options read once from the settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import ClientSession, web

from bot.config import Settings
from bot.frontend import FrontEnd
from bot.jobs import JobHandler, current_job
from bot.metrics import Metrics
from bot.plan_archive import PlanArchive
from bot.planning import Planning
from bot.preview_tasks import PreviewState
from bot.request import DeploymentRequest, SubscriberFactory
from deployments import (
    DeployError,
    ExecutionOptions,
    GitSource,
    RollbackPlan,
    Source,
    start_deployment,
    start_rollback,
)
from planner.plan import Plan
from planner.source import EvalCache
from runners.config import RunnerConfig
from state.deployments import DeploymentRecord
from state.events import Subscriber
from state.store import Store

if TYPE_CHECKING:
    from bot.gitcache import GitCache, ManifestGit
    from bot.github.client import GitHubClientFactory
    from bot.jobs import JobWorker
    from deployments.monitor import Monitor

log = logging.getLogger(__name__)

NO_GIT_CACHE = "the bot has no Git cache to deploy from (GitHub or NIXMOX_GIT_REMOTE not set up)"


@dataclass
class InProcessLocks:
    """Work one process does one at a time (the store's locks cover other replicas)."""

    # merge deployments, each planned after the previous one finished
    merge_deploys: asyncio.Lock = field(default_factory=asyncio.Lock)
    # plans of one pull request
    pull_plans: dict[int, asyncio.Lock] = field(default_factory=dict)

    def pull(self, number: int) -> asyncio.Lock:
        return self.pull_plans.setdefault(number, asyncio.Lock())


@dataclass
class BackgroundTasks:
    """The application's own background tasks (for shutdown and tests)."""

    recovery_report: asyncio.Task[None] | None = None
    recovery_sweep: asyncio.Task[None] | None = None
    monitor: Monitor | None = None  # health checks and drift between deployments


@dataclass
class BotContext:
    """Shared state of the running bot (see the module docstring for when fields are set)."""

    settings: Settings
    store: Store | None = None
    session: ClientSession | None = None
    github: GitHubClientFactory | None = None
    git: GitCache | None = None
    jobs: JobWorker | None = None
    metrics: Metrics = field(default_factory=Metrics)
    plans: PlanArchive | None = None
    runner_config: RunnerConfig = field(default_factory=RunnerConfig)
    eval_cache: EvalCache = field(default_factory=EvalCache)
    # where plan_revisions runs: threads, or a process pool (`build_app` with role `all`)
    planning: Planning = field(init=False)
    subscriber_factories: list[SubscriberFactory] = field(default_factory=list)
    # background job handlers by kind; the worker made at start-up runs these
    job_handlers: dict[str, JobHandler] = field(default_factory=dict)
    front_ends: list[FrontEnd] = field(default_factory=list)
    locks: InProcessLocks = field(default_factory=InProcessLocks)
    tasks: BackgroundTasks = field(default_factory=BackgroundTasks)
    # plans computed once per (base, head) and shared by the jobs that ask (bot.github.pulls)
    shared_plans: OrderedDict[tuple[str | None, str], asyncio.Future[Plan]] = field(
        default_factory=OrderedDict
    )
    # merge bases of (base, head) commits this process has fetched (bot.github.pulls)
    merge_bases: OrderedDict[tuple[str, str], str] = field(default_factory=OrderedDict)
    previews: PreviewState = field(default_factory=PreviewState)  # bot.github.previews

    def __post_init__(self) -> None:
        self.planning = Planning(in_processes=False, cache=self.eval_cache)

    @property
    def execution(self) -> ExecutionOptions:
        """How this bot runs deployments: from its settings and runner configuration."""
        return ExecutionOptions.from_settings(self.settings, self.runner_config)

    def manifest_git(self, cache: GitCache | None = None) -> ManifestGit:
        """The bot's Git access to the manifest repository: the shared cache (or `cache`, or
        one of its own) and, on GitHub, the App installation's token."""
        from bot.gitcache import ManifestGit

        token = self.github.token if self.github is not None else None
        return ManifestGit.of(self.settings, cache or self.git, token)

    def require_store(self) -> Store:
        if self.store is None:
            raise RuntimeError("the store is opened when the application starts")
        return self.store

    def require_jobs(self) -> JobWorker:
        if self.jobs is None:
            raise RuntimeError("the job worker is created when the application starts")
        return self.jobs

    def require_github(self) -> GitHubClientFactory:
        if self.github is None:
            raise RuntimeError("GitHub is not enabled (or the application has not started)")
        return self.github

    def plan_url(self, key: str) -> str:
        """The page that shows a plan (commit status `target_url`)."""
        return f"{self.settings.public_url.rstrip('/')}/plans/{key}"

    def deployment_url(self, deployment_id: str) -> str:
        return f"{self.settings.public_url.rstrip('/')}/deployments/{deployment_id}"

    async def subscribers_for(self, request: DeploymentRequest) -> list[Subscriber]:
        """One subscriber per registered factory; a factory that fails is logged and skipped."""
        subscribers: list[Subscriber] = []
        for factory in self.subscriber_factories:
            try:
                subscriber = await factory(request)
            except Exception:
                log.exception("a deployment notifier could not be set up; deploying without it")
                continue
            if subscriber is not None:
                subscribers.append(subscriber)
        return subscribers

    def git_source(self, revision: str | None) -> GitSource:
        """`revision` of the bot's Git cache."""
        if self.git is None:
            raise DeployError(NO_GIT_CACHE)
        return GitSource(self.git.path, revision, self.settings.manifest_path)

    async def deploy(
        self,
        request: DeploymentRequest,
        plan: Plan,
        *,
        source: Source | None = None,
        subscribers: list[Subscriber] | None = None,
        scope: str | None = None,
        lock_wait: float = 0.0,
    ) -> DeploymentRecord | None:
        """Run a plan of `request.revision` from the Git cache (or `source`), notifying
        every registered subscriber factory plus `subscribers`; wait up to `lock_wait` s for
        locked services.

        `scope` names the one service a restricted plan deploys, so that the store does not
        take this revision as deployed for every service.

        Returns the recorded deployment (None when the plan has nothing to do, or when a
        job re-run after a crash had started it already: a deployment is never re-run by
        itself, the recovery reports it); raises `deployments.DeploymentRefused` (locked)
        and `DeployError` (cannot start).
        """
        if not await self._first_deployment_of_job():
            return None
        record = await start_deployment(
            self.require_store(),
            plan,
            source or self.git_source(request.revision),
            requester=request.requester(),
            options=self.execution.waiting(lock_wait),
            kind=request.kind,
            scope=scope,
            subscribers=[*await self.subscribers_for(request), *(subscribers or [])],
        )
        self.count(request, record)
        return record

    async def _first_deployment_of_job(self) -> bool:
        """False when the running job already asked for a deployment in an attempt whose
        worker died; else that this one is asked is recorded (before it starts: at most once)."""
        job = current_job.get()
        if job is None:
            return True
        step = job.next_step("deployment")
        if await job.effect(step) is not None:
            log.warning("job %s started its deployment before its worker died: not re-run", job.id)
            return False
        await job.record(step, "requested")
        return True

    async def rollback(
        self,
        request: DeploymentRequest,
        rollback: RollbackPlan,
        *,
        subscribers: list[Subscriber] | None = None,
    ) -> DeploymentRecord | None:
        """Run a prepared rollback (`deployments.prepare_rollback`) with the notifiers."""
        record = await start_rollback(
            self.require_store(),
            rollback,
            requester=request.requester(),
            options=self.execution,
            manifest_path=self.settings.manifest_path,
            subscribers=[*await self.subscribers_for(request), *(subscribers or [])],
        )
        self.count(request, record)
        return record

    def count(self, request: DeploymentRequest, record: DeploymentRecord | None) -> None:
        if record is not None:
            self.metrics.deployments.labels(str(request.trigger), record.state.value).inc()


CONTEXT: web.AppKey[BotContext] = web.AppKey("nixmox_context", BotContext)

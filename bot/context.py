"""What every part of the running bot shares: settings, store, GitHub clients, jobs, metrics.

One `BotContext` is made by `bot.app.build_app` and stored in the aiohttp application under
`CONTEXT`. Resources that need the event loop (the store, the HTTP session, the GitHub client
factory, the job worker) are filled in when the application starts and are `None` before that.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import ClientSession, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bot.config import Settings
from bot.jobs import JobHandler
from planner.plan import Plan
from planner.source import EvalCache
from runners.base import DeploymentKind, Subscriber, Trigger
from runners.config import RunnerConfig

if TYPE_CHECKING:
    from bot.gitcache import GitCache
    from bot.github.client import GitHubClientFactory
    from bot.jobs import JobWorker
    from runners.deploy import RollbackPlan
    from state.deployments import DeploymentRecord
    from state.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentRequest:
    """Who asked for a deployment of which commit; notifiers use it to address their reports.

    `revision` is the commit deployed (GitHub statuses and the Deployment go on it);
    `pr_number` is set for `/nixmox apply`; `extra` carries front-end specific data (for
    instance the Slack channel and message of an approved request).
    """

    trigger: Trigger
    requested_by: str
    revision: str | None
    kind: DeploymentKind = DeploymentKind.DEPLOY
    approved_by: str | None = None
    pr_number: int | None = None
    installation_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


SubscriberFactory = Callable[[DeploymentRequest], Awaitable[Subscriber | None]]
"""Makes the event subscriber of one deployment (or None when it has nothing to report)."""


class Metrics:
    """Prometheus metrics of one application (its own registry: tests build many apps)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.webhooks = Counter(
            "nixmox_github_webhooks",
            "GitHub deliveries received, by event and outcome",
            ["event", "outcome"],
            registry=self.registry,
        )
        self.webhook_seconds = Histogram(
            "nixmox_github_webhook_seconds",
            "Time to acknowledge a GitHub delivery",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.jobs = Counter(
            "nixmox_jobs",
            "Background jobs run, by kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "nixmox_job_seconds", "Background job duration", ["kind"], registry=self.registry
        )
        self.jobs_running = Gauge(
            "nixmox_jobs_running", "Background jobs running now", registry=self.registry
        )
        self.deployments = Counter(
            "nixmox_deployments",
            "Deployments finished, by trigger and final state",
            ["trigger", "state"],
            registry=self.registry,
        )
        self.github_calls_failed = Counter(
            "nixmox_github_notifications_failed",
            "GitHub notifications that failed after retries (never fail a deployment)",
            registry=self.registry,
        )


class PlanArchive:
    """Plans posted to GitHub, kept as JSON files so `/plans/{key}` can show them later."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def key(plan: Plan) -> str:
        """The plan's digest; an invalid plan (no digest) is keyed by its content."""
        if plan.digest:
            return plan.digest
        text = json.dumps(plan.to_json(), sort_keys=True)
        return "invalid-" + hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path | None:
        if not key.replace("-", "").isalnum() or len(key) > 100:
            return None
        return self.directory / f"{key}.json"

    def save(self, plan: Plan) -> str:
        key = self.key(plan)
        path = self.path(key)
        assert path is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(plan.model_dump_json())
        partial.replace(path)
        return key

    def load(self, key: str) -> Plan | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        return Plan.model_validate_json(path.read_text())


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
    subscriber_factories: list[SubscriberFactory] = field(default_factory=list)
    # background job handlers by kind; the worker made at start-up runs these
    job_handlers: dict[str, JobHandler] = field(default_factory=dict)
    # anything else a front end (Slack, the dashboard) wants to share, by name
    extras: dict[str, Any] = field(default_factory=dict)

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

    def execution_options(self) -> dict[str, Any]:
        """How this bot runs deployments (runner kind and config, parallelism, work root)."""
        return {
            "runner_kind": self.settings.runner,
            "runner_config": self.runner_config,
            "parallel": self.settings.parallel,
            "work_root": self.settings.workdir / "work",
        }

    async def deploy(
        self,
        request: DeploymentRequest,
        plan: Plan,
        *,
        repo_dir: Path | None = None,
        subscribers: list[Subscriber] | None = None,
        scope: str | None = None,
        lock_wait: float = 0.0,
    ) -> DeploymentRecord | None:
        """Run a plan of `request.revision` from the Git cache (or `repo_dir`), notifying
        every registered subscriber factory plus `subscribers`; wait up to `lock_wait` s for
        locked services.

        `scope` names the one service a restricted plan deploys, so that the store does not
        take this revision as deployed for every service.

        Returns the recorded deployment (None when the plan has nothing to do); raises
        `runners.deploy.DeploymentRefused` (locked) and `DeployError` (cannot start).
        """
        from runners.deploy import run_deployment

        source = repo_dir or (self.git.path if self.git is not None else None)
        record = await run_deployment(
            self.require_store(),
            plan,
            repo_dir=source,
            revision=request.revision,
            manifest_path=self.settings.manifest_path,
            kind=request.kind,
            trigger=request.trigger,
            requested_by=request.requested_by,
            approved_by=request.approved_by,
            scope=scope,
            auto_rollback=self.settings.auto_rollback,
            subscribers=[*await self.subscribers_for(request), *(subscribers or [])],
            lock_wait=lock_wait,
            **self.execution_options(),
        )
        if record is not None:
            self.metrics.deployments.labels(str(request.trigger), record.state.value).inc()
        return record

    async def rollback(
        self,
        request: DeploymentRequest,
        rollback: RollbackPlan,
        *,
        subscribers: list[Subscriber] | None = None,
    ) -> DeploymentRecord | None:
        """Run a prepared rollback (`runners.deploy.prepare_rollback`) with the notifiers."""
        from runners.deploy import run_rollback

        record = await run_rollback(
            self.require_store(),
            rollback,
            trigger=request.trigger,
            requested_by=request.requested_by,
            approved_by=request.approved_by,
            manifest_path=self.settings.manifest_path,
            subscribers=[*await self.subscribers_for(request), *(subscribers or [])],
            **self.execution_options(),
        )
        if record is not None:
            self.metrics.deployments.labels(str(request.trigger), record.state.value).inc()
        return record


CONTEXT: web.AppKey[BotContext] = web.AppKey("nixmox_context", BotContext)

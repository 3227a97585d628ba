"""Looking without deploying: a dry run's commands, and live health checks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from deployments.options import ExecutionOptions
from planner.models import Manifest
from planner.plan import Phase, Plan, Step, step_id
from runners.base import Context
from runners.executor import Executor
from runners.registry import RunnerSet
from state.store import Store

HEALTHY, UNHEALTHY = "healthy", "unhealthy"
FAILED_TO_RUN = "health check failed to run: {error}"


async def preview_deployment(
    plan: Plan,
    *,
    manifest: Manifest,
    options: ExecutionOptions,
    workdir: Path = Path("."),
    revision: str | None = None,
) -> list[tuple[str, list[str]]]:
    """Dry run: each step (wave order) with the exact command lines it would run."""
    runners = options.runner_set()
    try:
        ctx = Context("dry-run", manifest, plan, workdir, revision, dry_run=True)
        return Executor(runners).dry_run(plan, ctx)
    finally:
        await runners.close()


async def check_health(
    store: Store, manifest: Manifest, services: Iterable[str], *, options: ExecutionOptions
) -> dict[str, tuple[bool, str]]:
    """Run each service's health checks now; record and return (healthy, last output line)."""
    runners = options.runner_set()
    limit = asyncio.Semaphore(max(options.parallel, 1))
    ctx = Context("status", manifest, Plan(), Path("."))

    async def one(service: str) -> tuple[str, tuple[bool, str]]:
        async with limit:
            ok, output = await verify_now(runners, service, ctx)
        await store.services.set_health(service, HEALTHY if ok else UNHEALTHY)
        lines = [line for line in output.strip().splitlines() if line.strip()]
        return service, (ok, lines[-1] if lines else "")

    try:
        return dict(await asyncio.gather(*(one(service) for service in sorted(services))))
    finally:
        await runners.close()


async def verify_now(runners: RunnerSet, service: str, ctx: Context) -> tuple[bool, str]:
    """One service's health checks: (healthy, redacted output)."""
    step = Step(id=step_id(Phase.VERIFY, service), phase=Phase.VERIFY, service=service)
    try:
        result = await runners.verify.run(step, ctx)
        return result.ok, runners.redactor.text(result.output)
    except Exception as exc:
        return False, FAILED_TO_RUN.format(error=exc)

"""The one rule for the revision a deployment is planned from, for every front end.

1. What runs now, if Git knows it: the service's own revision (a `--service` deploy), then
   the last revision deployed successfully for the whole homelab.
2. Else, when deployments were attempted but none fully succeeded: everything (a diff would
   leave behind what that attempt skipped); the plan says so in its note.
3. Else, the revision the caller knows to be running (a merge's `before`: a bot installed on
   a running homelab), if Git knows it.
4. Else nothing: plan everything (a first deployment, or one from a manifest file).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from planner.plan import Plan, PlanOptions
from planner.revisions import plan_revisions
from planner.source import (
    DEFAULT_MANIFEST_PATH,
    EvalCache,
    EvalLimits,
    UnknownRevision,
    resolve_revision,
)
from state.store import Store

NOT_YET_DEPLOYED = "no successful full deployment yet: deploying everything"


@dataclass(frozen=True)
class Base:
    """The revision to plan from (None: everything), and whether it is none because no
    deployment has fully succeeded yet."""

    revision: str | None
    never_succeeded: bool = False


async def known(repo_dir: Path | str, revision: str | None) -> str | None:
    """The full commit id of `revision` if the repository has it, else None."""
    if not revision:
        return None
    try:
        return await asyncio.to_thread(resolve_revision, repo_dir, revision)
    except UnknownRevision:
        return None


async def base_revision(
    store: Store,
    repo_dir: Path | str,
    *,
    service: str | None = None,
    running: str | None = None,
) -> Base:
    """The revision to plan from (see the module docstring for the rule)."""
    deployed = await store.deployments.last_deployed_revision()
    candidates: list[str | None] = []
    if service is not None:
        record = (await store.services.all()).get(service)
        candidates.append(record.revision if record is not None else None)
    candidates.append(deployed)
    for candidate in candidates:
        found = await known(repo_dir, candidate)
        if found is not None:
            return Base(found)
    if deployed is None and await store.deployments.history(limit=1):
        return Base(None, never_succeeded=True)
    return Base(await known(repo_dir, running))


def noting_everything(plan: Plan) -> Plan:
    """The full plan, noting why everything is deployed (shown in Slack and the status)."""
    if not plan.ok or not plan.steps:
        return plan
    return plan.model_copy(update={"note": NOT_YET_DEPLOYED})


async def plan_for_deploy(
    store: Store,
    repo_dir: Path | str,
    ref: str,
    *,
    service: str | None = None,
    running: str | None = None,
    manifest_path: str = DEFAULT_MANIFEST_PATH,
    options: PlanOptions | None = None,
    cache: EvalCache | None = None,
    limits: EvalLimits | None = None,
) -> Plan:
    """The plan from the base revision (`base_revision`) to `ref`.

    Deploying the revision that is already deployed has nothing to do (an empty plan).
    """
    base = await base_revision(store, repo_dir, service=service, running=running)
    plan = await asyncio.to_thread(
        plan_revisions,
        repo_dir,
        base.revision,
        ref,
        manifest_path=manifest_path,
        service=service,
        options=options,
        cache=cache,
        limits=limits,
    )
    return noting_everything(plan) if base.never_succeeded else plan

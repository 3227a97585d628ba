"""Running an approved request (a job): once, even when the job runs again after a crash."""

from __future__ import annotations

import functools
import logging
from typing import Any

from bot.request import DeploymentRequest
from bot.slack.backend import (
    Planned,
)
from bot.slack.blocks import (
    RequestStatus,
)
from bot.slack.names import SYSTEM_ACTOR, Audit
from bot.slack.once import Posting, post_once
from bot.slack.services import SlackServices, view_of
from deployments import DeployError
from state.events import DeploymentKind, DeploymentStarted, Event, Trigger

log = logging.getLogger(__name__)


CLAIM_PREFIX = "starting:"  # an approval claimed by a deploy job whose deployment has no id yet
ALREADY_DEPLOYED = (
    ":information_source: This request was already deployed as {deployment}; "
    "it is not deployed again."
)
RUN_STOPPED = (
    ":warning: An earlier run of this approved request stopped before its deployment started; "
    "it is not run again. Request the deployment again to go on."
)
NOT_APPROVED = "This request is {state}, not approved; nothing was deployed."


class ApprovedRuns:
    """Runs approved requests through the backend, at most once per approval."""

    def __init__(self, core: SlackServices) -> None:
        self.core = core

    async def run_deploy_job(self, payload: dict[str, Any]) -> None:
        """Deploy an approved request once: a rerun of the job (after a crash) never redeploys."""
        store = self.core.ctx.require_store()
        approval = await store.approvals.get(payload["approval"])
        if approval is None:
            log.error("Slack: approved request %s is gone; not deploying", payload["approval"])
            return
        # claim the approval before anything runs; the real deployment id replaces the
        # placeholder as soon as the deployment starts
        placeholder = f"{CLAIM_PREFIX}{store.deployments.new_id()}"
        if not await store.approvals.claim_for_deployment(approval.id, placeholder):
            await self.refuse_rerun(approval.id, payload)
            return
        claim = functools.partial(self.record_claim, approval.id, placeholder)
        planned = Planned.from_json(payload["planned"])
        view = view_of(approval, resolved_by=payload["approved_by"])
        request = DeploymentRequest(
            trigger=Trigger.SLACK,
            requested_by=approval.requested_by,
            revision=planned.revision or planned.plan.head,
            kind=DeploymentKind(approval.kind),
            approved_by=payload["approved_by"],
            extra={
                "slack": {"channel": payload["channel"], "ts": payload["ts"]},
                "title": view.title(),
                "approval": approval.id,
            },
        )
        try:
            await self.core.backend.run(planned, request, subscribers=[claim])
        except DeployError as exc:
            view.error = self.core.redactor.text(str(exc))
            await self.core.show_request(
                payload["channel"], payload["ts"], view, RequestStatus.NOT_STARTED, planned.plan
            )
            await self.core.audit(
                payload["approved_by"],
                Audit.NOT_STARTED,
                {"approval": approval.id, "error": view.error},
            )

    async def record_claim(self, approval_id: str, placeholder: str, event: Event) -> None:
        """A subscriber: put the started deployment's id on the approval it carries out."""
        if isinstance(event, DeploymentStarted):
            store = self.core.ctx.require_store()
            await store.approvals.claim_for_deployment(
                approval_id, event.deployment_id, replacing=placeholder
            )

    async def refuse_rerun(self, approval_id: str, payload: dict[str, Any]) -> None:
        """Say in the request's thread why a deploy job did not deploy (again)."""
        approval = await self.core.ctx.require_store().approvals.get(approval_id)
        used = approval.deployment_id if approval is not None else None
        if used is None:
            state = approval.state.value if approval is not None else "gone"
            text = NOT_APPROVED.format(state=state)
        elif used.startswith(CLAIM_PREFIX):
            text = RUN_STOPPED
        else:
            text = ALREADY_DEPLOYED.format(deployment=used)
        log.warning("Slack: request %s not run again: %s", approval_id, text)
        # a re-run of this job (its worker died after posting) edits that reply instead
        await post_once(
            self.core.api, Posting.REFUSAL, payload["channel"], thread_ts=payload["ts"], text=text
        )
        await self.core.audit(
            SYSTEM_ACTOR,
            Audit.NOT_STARTED,
            {"approval": approval_id, "error": text, "deployment": used},
        )

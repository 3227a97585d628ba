"""The Slack front end's job kinds and audit actions, and how a deployment's origin reads."""

from __future__ import annotations

from enum import StrEnum

from bot.request import DeploymentRequest
from state.events import Trigger

SYSTEM_ACTOR = "nixmox"  # the actor of what the bot does by itself, in the audit log


class JobKind(StrEnum):
    """Job kinds in the store's queue that the Slack front end runs."""

    REQUEST = "slack.request"  # plan a deploy/rollback request and post it for approval
    DEPLOY = "slack.deploy"  # run an approved request


class Audit(StrEnum):
    """Audit-log actions of the Slack front end."""

    REQUEST = "slack.request"
    REQUEST_REFUSED = "slack.request.refused"
    REQUEST_FAILED = "slack.request.failed"
    APPROVED = "slack.approval.approved"
    REFUSED = "slack.approval.refused"
    CANCELLED = "slack.approval.cancelled"
    EXPIRED = "slack.approval.expired"
    NOT_STARTED = "slack.deploy.not_started"
    LOCK = "slack.lock"
    UNLOCK = "slack.unlock"
    MESSAGE = "slack.deployment.message"  # which message shows a deployment (crash reports)


def origin(request: DeploymentRequest) -> str:
    """How a deployment was started, for its message."""
    if request.trigger is Trigger.MERGE:
        return "on merge"
    if request.trigger is Trigger.PR_COMMENT:
        return f"from PR #{request.pr_number}" if request.pr_number else "from a PR comment"
    if request.trigger is Trigger.SLACK:
        return "from Slack"
    return f"from the {request.trigger}"

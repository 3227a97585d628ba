"""Who asked for a deployment of which commit: what the notifiers of every front end address."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments import Requester
from state.events import DeploymentKind, Subscriber, Trigger


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

    def requester(self) -> Requester:
        """Who is recorded with the deployment."""
        return Requester(self.trigger, self.requested_by, self.approved_by)


SubscriberFactory = Callable[[DeploymentRequest], Awaitable[Subscriber | None]]
"""Makes the event subscriber of one deployment (or None when it has nothing to report)."""

"""What a Slack user asked for, in the words the messages and the audit log use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.chat_commands import ALL
from state.approvals import ApprovalRecord
from state.events import DeploymentKind


@dataclass(frozen=True)
class Ask:
    """Deploy or roll back a service (None: everything)."""

    kind: DeploymentKind
    service: str | None = None
    ref: str | None = None  # deploy --ref
    to: str | None = None  # rollback --to (a deployment id or a Git ref)
    # the drift message's Redeploy: plan the service in full, even at the deployed revision
    redeploy: bool = False

    @property
    def target(self) -> str:
        return self.service or ALL

    def args(self) -> dict[str, Any]:
        """The arguments an approval keeps (the service has its own column)."""
        return {"ref": self.ref, "to": self.to, **({"redeploy": True} if self.redeploy else {})}

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, **self.args()}

    @classmethod
    def from_json(cls, kind: str, data: dict[str, Any]) -> Ask:
        return cls(
            DeploymentKind(kind),
            data.get("service"),
            ref=data.get("ref"),
            to=data.get("to"),
            redeploy=bool(data.get("redeploy")),
        )

    @classmethod
    def from_approval(cls, approval: ApprovalRecord) -> Ask:
        return cls.from_json(approval.kind, {**(approval.args or {}), "service": approval.service})

    def title(self) -> str:
        """The approval message's title: "Deploy vaultwarden @ main", "Roll back everything"."""
        if self.kind is DeploymentKind.ROLLBACK:
            what = "everything" if self.target == ALL else self.target
            return f"Roll back {what}{self._where()}"
        return f"Deploy {self.target}{self._where()}"

    def description(self) -> str:
        """The request in a sentence: "a deployment of vaultwarden @ main"."""
        what = "a rollback" if self.kind is DeploymentKind.ROLLBACK else "a deployment"
        return f"{what} of {self.target}{self._where()}"

    def _where(self) -> str:
        """` to <deployment or ref>` of a rollback, ` @ <ref>` of a deployment ("" if none)."""
        if self.kind is DeploymentKind.ROLLBACK:
            return f" to {self.to}" if self.to else ""
        return f" @ {self.ref}" if self.ref else ""

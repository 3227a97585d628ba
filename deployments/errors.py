"""Why a deployment or rollback could not start (nothing ran, nothing was recorded)."""

from __future__ import annotations

from state.locks import LockBusy

REFUSED = "deployment refused: {error}. Wait for it to finish (--lock-wait SECONDS) or, if it is stale, `nixmox unlock {service}`"


class DeployError(Exception):
    """A deployment could not start; nothing ran and nothing was recorded."""


class DeploymentRefused(DeployError):
    """A service the plan touches is locked by another holder."""

    def __init__(self, busy: LockBusy) -> None:
        self.busy = busy
        super().__init__(REFUSED.format(error=busy, service=busy.service))


class RollbackError(DeployError):
    """Nothing to roll back to."""

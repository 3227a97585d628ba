"""What one `nixmox serve` process does: answer HTTP, run the work, or both."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """`nixmox serve --role`: `web` verifies, records and queues; `worker` claims and runs
    jobs, deployments, the monitor and the recovery sweep; `all` does both (the default)."""

    WEB = "web"
    WORKER = "worker"
    ALL = "all"

    @property
    def runs_work(self) -> bool:
        """Claims jobs, runs deployments, the monitor and the recovery sweep."""
        return self is not Role.WEB

    @property
    def answers_webhooks(self) -> bool:
        """Mounts the front ends' webhook and page routes."""
        return self is not Role.WORKER


SQLITE_REPLICAS = (
    "--role {role} on SQLite: the web and worker processes must share the one database file "
    "on this machine; for processes on several machines use PostgreSQL (NIXMOX_DATABASE_URL)"
)

"""The Prometheus metrics of one application."""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Prometheus metrics of one application (its own registry: tests build many apps)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        counter = partial(Counter, registry=self.registry)
        histogram = partial(Histogram, registry=self.registry)
        gauge = partial(Gauge, registry=self.registry)
        self.webhooks = counter(
            "nixmox_github_webhooks",
            "GitHub deliveries received, by event and outcome",
            ["event", "outcome"],
        )
        self.webhook_seconds = histogram(
            "nixmox_github_webhook_seconds",
            "Time to acknowledge a GitHub delivery",
            buckets=ACK_BUCKETS,
        )
        self.jobs = counter(
            "nixmox_jobs", "Background jobs run, by kind and outcome", ["kind", "outcome"]
        )
        self.job_seconds = histogram("nixmox_job_seconds", "Background job duration", ["kind"])
        self.jobs_running = gauge("nixmox_jobs_running", "Background jobs running now")
        self.deployments = counter(
            "nixmox_deployments",
            "Deployments finished, by trigger and final state",
            ["trigger", "state"],
        )
        self.github_calls_failed = counter(
            "nixmox_github_notifications_failed",
            "GitHub notifications that failed after retries (never fail a deployment)",
        )

"""The Prometheus metrics of one application."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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

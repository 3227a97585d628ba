"""State store aggregates beyond runners.store (health checks, drift findings)."""

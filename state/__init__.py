"""The state database, split by aggregate: deployments, services, locks, queue, approvals,
audit and Slack messages; `state.store.Store` opens it and runs the Alembic migrations."""

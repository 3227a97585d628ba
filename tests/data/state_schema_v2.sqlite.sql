-- The state schema of nixmox before Alembic (schema_version 2, runners/store.py at d66ffa7),
-- as SQLAlchemy emitted it for sqlite. Frozen test data: never edit.

CREATE TABLE approvals (
	id VARCHAR(32) NOT NULL,
	kind VARCHAR(32) NOT NULL,
	requested_by VARCHAR(255) NOT NULL,
	service VARCHAR(255),
	args JSON,
	digest VARCHAR(128) NOT NULL,
	"plan" TEXT,
	channel VARCHAR(255),
	ts VARCHAR(255),
	state VARCHAR(32) NOT NULL,
	created_at DATETIME NOT NULL,
	expires_at DATETIME NOT NULL,
	resolved_by VARCHAR(255),
	resolved_at DATETIME,
	deployment_id VARCHAR(32),
	PRIMARY KEY (id)
);

CREATE TABLE audit_log (
	id INTEGER NOT NULL,
	at DATETIME NOT NULL,
	actor VARCHAR(255) NOT NULL,
	action VARCHAR(255) NOT NULL,
	detail JSON,
	PRIMARY KEY (id)
);

CREATE INDEX ix_audit_at ON audit_log (at);

CREATE TABLE deliveries (
	delivery_id VARCHAR(255) NOT NULL,
	received_at DATETIME NOT NULL,
	PRIMARY KEY (delivery_id)
);

CREATE TABLE deployments (
	id VARCHAR(32) NOT NULL,
	kind VARCHAR(32) NOT NULL,
	"trigger" VARCHAR(32) NOT NULL,
	state VARCHAR(32) NOT NULL,
	requested_by VARCHAR(255),
	approved_by VARCHAR(255),
	base VARCHAR(255),
	head VARCHAR(255),
	digest VARCHAR(128) NOT NULL,
	"plan" TEXT NOT NULL,
	manifest TEXT,
	scope VARCHAR(255),
	holder VARCHAR(255),
	note TEXT,
	lease_until DATETIME,
	created_at DATETIME NOT NULL,
	started_at DATETIME,
	finished_at DATETIME,
	PRIMARY KEY (id)
);

CREATE INDEX ix_deployments_created ON deployments (created_at);

CREATE INDEX ix_deployments_state ON deployments (state);

CREATE TABLE jobs (
	id INTEGER NOT NULL,
	kind VARCHAR(255) NOT NULL,
	payload JSON NOT NULL,
	state VARCHAR(32) NOT NULL,
	worker VARCHAR(255),
	attempts INTEGER NOT NULL,
	lease_until DATETIME,
	error TEXT,
	created_at DATETIME NOT NULL,
	finished_at DATETIME,
	PRIMARY KEY (id)
);

CREATE INDEX ix_jobs_state ON jobs (state);

CREATE TABLE locks (
	service VARCHAR(255) NOT NULL,
	holder VARCHAR(255) NOT NULL,
	reason TEXT,
	acquired_at DATETIME NOT NULL,
	expires_at DATETIME,
	PRIMARY KEY (service)
);

CREATE TABLE schema_version (
	version INTEGER NOT NULL,
	applied_at DATETIME NOT NULL,
	PRIMARY KEY (version)
);

CREATE TABLE services (
	name VARCHAR(255) NOT NULL,
	revision VARCHAR(255),
	system_path TEXT,
	previous_system TEXT,
	last_deployment_id VARCHAR(32),
	last_health VARCHAR(32),
	health_at DATETIME,
	updated_at DATETIME,
	PRIMARY KEY (name)
);

CREATE TABLE steps (
	deployment_id VARCHAR(32) NOT NULL,
	step_id VARCHAR(255) NOT NULL,
	position INTEGER NOT NULL,
	phase VARCHAR(32) NOT NULL,
	service VARCHAR(255),
	state VARCHAR(32) NOT NULL,
	attempt INTEGER NOT NULL,
	output TEXT NOT NULL,
	reason TEXT,
	previous_system TEXT,
	new_system TEXT,
	commands JSON,
	started_at DATETIME,
	finished_at DATETIME,
	PRIMARY KEY (deployment_id, step_id),
	FOREIGN KEY(deployment_id) REFERENCES deployments (id)
);

CREATE INDEX ix_steps_service ON steps (service);

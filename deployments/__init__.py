"""The deployment core: the one path every front end (CLI, merge, `/nixmox apply`, Slack)
starts deployments and rollbacks through, and the status views they all show.

Below the front ends (`bot`, `cli`; never imported from here), above the runners and the
state store. Modules: `options` (typed options, sources, requester), `base` (the one rule for
the revision to plan from), `run` (lock, record, execute, release), `rollback`, `checks`
(dry run, live health), `views` (status and history as data).
"""

from deployments.base import NOT_YET_DEPLOYED, Base, base_revision, plan_for_deploy
from deployments.checks import check_health, preview_deployment
from deployments.errors import DeployError, DeploymentRefused, RollbackError
from deployments.locks import holder_name, lock_names
from deployments.options import (
    DEFAULT_LOCK_LEASE,
    DirectorySource,
    ExecutionOptions,
    GitSource,
    Requester,
    Source,
)
from deployments.rollback import RollbackPlan, prepare_rollback, start_rollback
from deployments.run import start_deployment

__all__ = [
    "DEFAULT_LOCK_LEASE",
    "NOT_YET_DEPLOYED",
    "Base",
    "DeployError",
    "DeploymentRefused",
    "DirectorySource",
    "ExecutionOptions",
    "GitSource",
    "Requester",
    "RollbackError",
    "RollbackPlan",
    "Source",
    "base_revision",
    "check_health",
    "holder_name",
    "lock_names",
    "plan_for_deploy",
    "prepare_rollback",
    "preview_deployment",
    "start_deployment",
    "start_rollback",
]

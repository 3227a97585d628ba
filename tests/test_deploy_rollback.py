"""`rollback` after verify-only and auto-rolled-back deployments (simulated hosts, real SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments import (
    DirectorySource,
    ExecutionOptions,
    RollbackError,
    prepare_rollback,
    start_deployment,
)
from planner.models import Manifest
from planner.plan import Plan, finalize, plan_full
from runners.config import RunnerConfig, SimulateConfig
from runners.registry import RunnerSet, build_runners
from state.deployments import DeploymentRecord
from state.events import DeploymentState, StepState
from state.store import Store
from tests.fixtures_manifests import HEALTH, lab_manifest


def manifest() -> Manifest:
    """postgresql <- app, and web on its own."""
    return lab_manifest(
        {
            "app": {"ip": "10.20.0.3", "depends_on": ["postgresql"], "interface": HEALTH},
            "web": {"ip": "10.20.0.4", "interface": HEALTH},
        },
        core={"postgresql": {"ip": "10.20.0.2", "interface": HEALTH}},
    )


def simulated() -> RunnerSet:
    return build_runners("simulate", RunnerConfig(simulate=SimulateConfig(scale=0.001)))


def verify_only(plan: Plan, service: str) -> Plan:
    """A deployment that only re-verifies `service` (e.g. a dependency changed elsewhere)."""
    verify = plan.by_id()[f"verify:{service}"].model_copy(update={"needs": []})
    return finalize({verify.id: verify})


async def deploy(store: Store, plan: Plan, runners: RunnerSet, tmp_path: Path) -> DeploymentRecord:
    record = await start_deployment(
        store,
        plan,
        DirectorySource(Path(tmp_path)),
        options=ExecutionOptions(runners=runners, work_root=tmp_path / "work"),
        manifest=manifest(),
    )
    assert record is not None
    return record


async def test_rollback_of_a_service_skips_deployments_that_only_verified_it(
    store: Store, tmp_path: Path
) -> None:
    runners = simulated()
    full = plan_full(manifest())
    first = await deploy(store, full, runners, tmp_path)
    second = await deploy(store, full, runners, tmp_path)
    checked = await deploy(store, verify_only(full, "app"), runners, tmp_path)
    assert checked.state is DeploymentState.SUCCEEDED
    installed_first = first.step("nix:service-config:app").new_system  # type: ignore[union-attr]  # a missing step fails the test
    assert second.step("nix:service-config:app").previous_system == installed_first  # type: ignore[union-attr]  # a missing step fails the test

    per_service = await prepare_rollback(store, service="app")
    assert per_service.source_deployment == second.id
    assert per_service.targets == {"app": installed_first}
    everything = await prepare_rollback(store)
    assert everything.source_deployment == second.id
    assert everything.targets["app"] == installed_first


async def test_rollback_to_a_deployment_refuses_its_rolled_back_system(
    store: Store, tmp_path: Path
) -> None:
    runners = simulated()
    full = plan_full(manifest())
    good = await deploy(store, full, runners, tmp_path)
    runners.rollback.fail.add("verify:app")  # type: ignore[union-attr]  # the simulated runners roll back
    broken = await deploy(store, full, runners, tmp_path)
    assert broken.step("verify:app").state is StepState.ROLLED_BACK  # type: ignore[union-attr]  # a missing step fails the test
    assert broken.step("nix:service-config:app").new_system  # type: ignore[union-attr]  # a missing step fails the test

    with pytest.raises(
        RollbackError, match=r"did not leave a working system for app .*rolled back"
    ):
        await prepare_rollback(store, to=broken.id)
    with pytest.raises(RollbackError, match="working system for app"):
        await prepare_rollback(store, to=broken.id, service="app")
    # the services that deployment did install can still be restored one at a time
    web = await prepare_rollback(store, to=broken.id, service="web")
    assert web.targets == {"web": broken.step("nix:service-config:web").new_system}  # type: ignore[union-attr]  # a missing step fails the test
    restored = await prepare_rollback(store, to=good.id, service="app")
    assert restored.targets == {"app": good.step("nix:service-config:app").new_system}  # type: ignore[union-attr]  # a missing step fails the test

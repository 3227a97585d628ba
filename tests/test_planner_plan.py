"""Full plans: data-driven cases (tests/data/plan/<case>/manifest.nix → expected.json) and the
real NixMox manifests."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest

from planner.plan import Phase, Plan, UnknownService, plan_full
from planner.source import load_manifest, parse_manifest
from planner.synthetic import synthetic_manifest

DATA = Path(__file__).parent / "data" / "plan"
CASES = sorted(path.name for path in DATA.iterdir() if (path / "manifest.nix").exists())


@pytest.mark.parametrize("case", CASES)
def test_plan_matches_expected_steps_needs_and_waves(case: str) -> None:
    expected = json.loads((DATA / case / "expected.json").read_text())
    plan = plan_full(load_manifest(DATA / case / "manifest.nix"), service=expected.get("service"))
    assert plan.ok, [f.render() for f in plan.errors]
    assert {step.id: step.needs for step in plan.steps} == expected["needs"]
    assert plan.waves == expected["waves"]


def assert_respects_dependencies(plan: Plan) -> None:
    """Every service's first step comes after verify of each planned dependency it has."""
    wave_of = {sid: index for index, wave in enumerate(plan.waves) for sid in wave}
    graph = plan.graph()
    first_step: dict[str, str] = {}
    for step in plan.steps:
        if step.service and step.service not in first_step:
            first_step[step.service] = step.id
    for dep in plan.dependencies:
        verify = f"verify:{dep.target}"
        if not dep.orders:  # a core service's auth client is made by tf:auth-core
            assert verify in nx.ancestors(graph, "tf:auth-core")
            continue
        start = first_step[dep.service]
        assert verify in nx.ancestors(graph, start), f"{start} must wait for {verify}"
        assert wave_of[verify] < wave_of[start]
    for step in plan.steps:
        for need in step.needs:
            assert wave_of[need] < wave_of[step.id]


def test_upstream_manifest_validates_and_plans_its_eleven_enabled_services(
    upstream_manifest: Path,
) -> None:
    plan = plan_full(load_manifest(upstream_manifest))
    assert plan.ok, [f.render() for f in plan.errors]
    assert len(plan.services()) == 11
    assert "mail" not in plan.services()
    assert not any(step.service == "mail" for step in plan.steps)
    assert plan.waves[0] == ["tf:infra"]
    assert_respects_dependencies(plan)
    inferred = {(d.service, d.target, d.field) for d in plan.dependencies if d.inferred}
    assert ("authentik", "postgresql", "interface.db.host") in inferred
    by_id = plan.by_id()
    assert by_id["tf:auth-core"].needs == ["verify:authentik"]
    for service in ("vaultwarden", "forgejo", "nextcloud"):
        assert "tf:auth-core" in by_id[f"tf:service-config:{service}"].needs


def test_old_upstream_manifest_adds_terraform_steps(upstream_manifest_old: Path) -> None:
    manifest = load_manifest(upstream_manifest_old)
    plan = plan_full(manifest)
    assert plan.ok, [f.render() for f in plan.errors]
    ids = set(plan.by_id())
    for name, svc in manifest.services.items():
        assert svc.interface.terraform is not None
        assert f"tf:service-infra:{name}" in ids
        assert f"tf:service-config:{name}" in ids
    by_id = plan.by_id()
    assert by_id["nix:service-config:vaultwarden"].needs == ["tf:service-infra:vaultwarden"]
    assert by_id["tf:service-infra:vaultwarden"].needs == [
        "verify:authentik",
        "verify:caddy",
        "verify:postgresql",
    ]
    # core services with terraform modules run them before their NixOS step
    assert by_id["nix:core:dns"].needs == ["tf:infra", "tf:service-infra:dns"]
    assert_respects_dependencies(plan)


def test_service_filter_plans_the_service_and_everything_it_needs(upstream_manifest: Path) -> None:
    plan = plan_full(load_manifest(upstream_manifest), service="openbao")
    assert plan.services() == ["authentik", "caddy", "openbao", "postgresql"]
    assert plan.by_id()["tf:infra"].targets == ["authentik", "caddy", "openbao", "postgresql"]


def test_service_filter_unknown_service_names_the_known_ones(upstream_manifest: Path) -> None:
    with pytest.raises(UnknownService, match='no enabled service "mail"'):
        plan_full(load_manifest(upstream_manifest), service="mail")


def test_digest_is_stable_and_changes_with_the_plan(upstream_manifest: Path) -> None:
    manifest = load_manifest(upstream_manifest)
    first, second = plan_full(manifest), plan_full(manifest)
    assert first.digest == second.digest
    assert len(first.digest) == 64
    assert plan_full(manifest, service="openbao").digest != first.digest


def test_every_step_has_a_phase_and_reasons(upstream_manifest: Path) -> None:
    plan = plan_full(load_manifest(upstream_manifest))
    for step in plan.steps:
        assert step.reasons, step.id
        assert step.id.startswith(step.phase.value)
        assert (step.service is None) == (step.phase in (Phase.TF_INFRA, Phase.TF_AUTH_CORE))


def test_five_thousand_services_plan_correctly() -> None:
    plan = plan_full(parse_manifest(synthetic_manifest(5000)))
    assert plan.ok
    assert len(plan.services()) == 5004
    wave_of = {sid: index for index, wave in enumerate(plan.waves) for sid in wave}
    assert all(wave_of[need] < wave_of[step.id] for step in plan.steps for need in step.needs)

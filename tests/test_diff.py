"""The semantic diff, field effects, file matching and plan_changes on in-memory manifests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from planner.diff import (
    DiffKind,
    Effect,
    PathsConfig,
    changed_paths,
    diff_manifests,
    field_effects,
    glob_match,
    match_files,
    nixos_candidates,
)
from planner.plan import (
    NIX_PHASES,
    FullPlanNeeds,
    Phase,
    PlanOptions,
    UnknownService,
    analyse,
    full_steps,
    plan_full,
    restrict,
    step_id,
)
from planner.plan.changes import plan_changes
from planner.source import load_manifest, parse_manifest
from planner.synthetic import synthetic_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def svc(ip: str, **extra: Any) -> dict[str, Any]:
    return {"ip": ip, "interface": {"health": {"liveness": "true"}}, **extra}


def small() -> dict[str, Any]:
    """dns, caddy, postgresql; app `a` (db, proxy), `b` needs a, `c` needs b."""
    return {
        "network": {"gateway": "10.9.0.1", "network_cidr": "10.9.0.0/24", "domain": "lab"},
        "core_services": {
            "dns": svc("10.9.0.2", hostname="dns.lab"),
            "caddy": svc("10.9.0.3", hostname="caddy.lab"),
            "postgresql": svc("10.9.0.4", hostname="pg.lab"),
        },
        "services": {
            "a": svc(
                "10.9.0.10",
                hostname="a.lab",
                depends_on=["caddy"],
                interface={
                    "db": {"host": "pg.lab", "name": "a"},
                    "proxy": {"domain": "a.lab", "upstream": "10.9.0.10:80"},
                    "health": {"liveness": "true"},
                },
            ),
            "b": svc("10.9.0.11", hostname="b.lab", depends_on=["a"]),
            "c": svc("10.9.0.12", hostname="c.lab", depends_on=["b"]),
        },
    }


def plan_of(base: dict[str, Any], head: dict[str, Any], **kwargs: Any) -> Any:
    return plan_changes(parse_manifest(base), parse_manifest(head), **kwargs)


# --- changed paths and their effects ---------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "paths"),
    [
        ({"a": 1}, {"a": 1}, []),
        ({"a": 1}, {"a": 2}, ["a"]),
        ({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": 1, "d": 3}}}, ["a.b.d"]),
        ({"a": [1, 2]}, {"a": [2, 1]}, ["a"]),  # lists are leaves: order matters to Nix
        ({"a": 1}, {"b": 1}, ["a", "b"]),
        ({"x": {"y": 1}}, {"x": None}, ["x"]),
    ],
)
def test_changed_paths(old: Any, new: Any, paths: list[str]) -> None:
    assert changed_paths(old, new) == paths


@pytest.mark.parametrize(
    ("path", "effects"),
    [
        ("interface.health.liveness", {Effect.VERIFY}),
        ("interface.proxy.upstream", {Effect.PROXY, Effect.VERIFY}),
        ("interface.proxy.grafana.domain", {Effect.PROXY, Effect.VERIFY}),
        ("interface.proxy.jellyfin.auth.oidc.scopes", {Effect.AUTH, Effect.PROXY, Effect.NIX}),
        ("interface.db.name", {Effect.DATABASE, Effect.NIX, Effect.VERIFY}),
        ("interface.dbs.sonarr.port", {Effect.DATABASE, Effect.NIX, Effect.VERIFY}),
        ("interface.auth.provider", {Effect.AUTH, Effect.NIX, Effect.VERIFY}),
        ("interface.terraform.variables.x", {Effect.TERRAFORM, Effect.VERIFY}),
        ("ip", {Effect.INFRA, Effect.NIX, Effect.VERIFY, Effect.DNS}),
        ("hostname", {Effect.INFRA, Effect.NIX, Effect.VERIFY, Effect.DNS}),
        ("resources.cores", {Effect.INFRA, Effect.NIX, Effect.VERIFY}),
        ("vmid", {Effect.INFRA, Effect.NIX, Effect.VERIFY}),
        ("onboot", {Effect.INFRA, Effect.NIX, Effect.VERIFY}),
        ("start", {Effect.INFRA, Effect.NIX, Effect.VERIFY}),
        ("depends_on", {Effect.NIX, Effect.VERIFY}),
        ("ports", {Effect.NIX, Effect.VERIFY}),
        ("some_new_key", {Effect.NIX, Effect.VERIFY}),
    ],
)
def test_field_effects(path: str, effects: set[Effect]) -> None:
    assert effects <= field_effects(path)
    if Effect.INFRA not in effects:
        assert Effect.INFRA not in field_effects(path)


def test_diff_reports_fields_not_values() -> None:
    base = small()
    base["network"]["outposts"] = {"radius": {"shared_secret": "hunter2-old"}}
    head = copy.deepcopy(base)
    head["network"]["outposts"]["radius"]["shared_secret"] = "hunter2-new"
    head["services"]["a"]["interface"]["proxy"]["upstream"] = "10.9.0.10:81"
    diff = diff_manifests(parse_manifest(base), parse_manifest(head))
    assert diff.global_fields == ("network.outposts.radius.shared_secret",)
    assert [(d.service, d.kind, d.fields) for d in diff.services] == [
        ("a", DiffKind.CHANGED, ("interface.proxy.upstream",))
    ]
    plan = plan_of(base, head)
    assert "hunter2" not in plan.model_dump_json()


def test_diff_of_added_removed_disabled_and_moved_services() -> None:
    base, head = small(), small()
    del head["services"]["c"]
    head["services"]["b"]["enable"] = False
    head["services"]["d"] = svc("10.9.0.13")
    head["core_services"]["a"] = head["services"].pop("a")
    head["services"]["b"]["depends_on"] = []
    diff = diff_manifests(parse_manifest(base), parse_manifest(head))
    kinds = {d.service: (d.kind, d.fields) for d in diff.services}
    assert kinds == {
        "a": (DiffKind.ADDED, ("section",)),
        "b": (DiffKind.REMOVED, ("enable",)),
        "c": (DiffKind.REMOVED, ()),
        "d": (DiffKind.ADDED, ()),
    }


# --- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "pattern", "matches"),
    [
        ("flake.lock", "flake.lock", True),
        ("sub/flake.lock", "flake.lock", False),
        ("nixos/common/users.nix", "nixos/common/**", True),
        ("nixos/common/a/b/c.nix", "nixos/common/**", True),
        ("nixos/vaultwarden.nix", "nixos/**/vaultwarden.nix", True),
        ("nixos/x/y/vaultwarden.nix", "nixos/**/vaultwarden.nix", True),
        ("nixos/x/vaultwarden.nix.bak", "nixos/**/vaultwarden.nix", False),
        ("apps/vw/config.yaml", "apps/*/config.yaml", True),
        ("apps/vw/sub/config.yaml", "apps/*/config.yaml", False),
        ("a.nix", "?.nix", True),
    ],
)
def test_glob_match(path: str, pattern: str, matches: bool) -> None:
    assert glob_match(path, pattern) is matches


def test_nixos_candidates() -> None:
    assert nixos_candidates("nixos/services/vaultwarden.nix") == {"services", "vaultwarden"}
    assert nixos_candidates("nixos/hosts/postgresql/default.nix") == {
        "hosts",
        "postgresql",
        "default",
    }
    assert nixos_candidates("terraform/vaultwarden/main.tf") == set()


def test_match_files_by_default_globs_terraform_dirs_and_config() -> None:
    data = small()
    data["services"]["a"]["interface"]["terraform"] = {"modules": ["./terraform/a"]}
    manifest = parse_manifest(data)
    config = PathsConfig.from_toml(
        {"paths": {"global": ["nixos/common/**"], "b": ["apps/b/**"], "ghost": ["x/**"]}}
    )
    hits = match_files(
        [
            "nixos/services/a.nix",
            "nixos/c/default.nix",
            "terraform/a/main.tf",
            "terraform/ab/main.tf",
            "apps/b/conf.yml",
            "nixos/common/base.nix",
            "flake.lock",
            "x/ghost.txt",
        ],
        manifest,
        config,
    )
    found = {(hit.path, hit.service, Effect.TERRAFORM in hit.effects) for hit in hits}
    assert found == {
        ("nixos/services/a.nix", "a", False),
        ("nixos/c/default.nix", "c", False),
        ("terraform/a/main.tf", "a", True),
        ("apps/b/conf.yml", "b", False),
        ("nixos/common/base.nix", None, False),
    }


def test_a_shared_nixos_module_no_service_claims_counts_for_every_service() -> None:
    manifest = parse_manifest(small())
    hits = match_files(["nixos/modules/users.nix", "nixos/README.md"], manifest)
    assert {(hit.path, hit.service) for hit in hits} == {
        ("nixos/modules/users.nix", None),
        ("nixos/README.md", None),
    }
    # a file under a service's name is that service's, not shared
    assert [hit.service for hit in match_files(["nixos/a/extra.nix"], manifest)] == ["a"]
    ignoring = PathsConfig.from_toml({"paths": {"ignore": ["nixos/**/*.md"]}})
    hits = match_files(["nixos/modules/users.nix", "nixos/README.md"], manifest, ignoring)
    assert [hit.path for hit in hits] == ["nixos/modules/users.nix"]


def test_a_shared_nixos_module_change_rebuilds_every_service() -> None:
    manifest = parse_manifest(small())
    plan = plan_changes(manifest, manifest, changed_files=["nixos/modules/users.nix"])
    nix_steps = {step.id for step in plan.steps if step.phase in NIX_PHASES}
    assert nix_steps == {
        f"{'nix:core' if manifest.is_core(name) else 'nix:service-config'}:{name}"
        for name in manifest.enabled()
    }
    assert all("nixos/modules/users.nix" in step.reasons for step in plan.steps)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"paths": []}, "[paths] must be a table"),
        ({"paths": {"global": "flake.lock"}}, "paths.global must be a list"),
        ({"paths": {"a": [1]}}, "paths.a must be a list"),
    ],
)
def test_paths_config_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PathsConfig.from_toml(data)


def test_paths_config_defaults() -> None:
    assert PathsConfig.from_toml({}).global_globs == ("flake.lock", "flake.nix")
    assert PathsConfig.from_toml({"paths": {"global": []}}).global_globs == ()


# --- plan_changes --------------------------------------------------------------------------------


def test_removal_destroys_dependents_first() -> None:
    base, head = small(), small()
    del head["services"]["b"], head["services"]["c"]
    plan = plan_of(base, head)
    by_id = plan.by_id()
    assert set(by_id) == {"tf:destroy:b", "tf:destroy:c", "nix:core:dns"}
    assert by_id["tf:destroy:b"].needs == ["nix:core:dns", "tf:destroy:c"]
    assert by_id["tf:destroy:c"].needs == ["nix:core:dns"]
    assert plan.waves == [["nix:core:dns"], ["tf:destroy:c"], ["tf:destroy:b"]]


def test_removal_waits_for_a_dependent_that_lets_go() -> None:
    base, head = small(), small()
    del head["services"]["b"]
    head["services"]["c"]["depends_on"] = ["a"]
    plan = plan_of(base, head)
    by_id = plan.by_id()
    assert set(by_id) == {
        "nix:core:dns",
        "nix:service-config:c",
        "verify:c",
        "tf:destroy:b",
    }
    assert "verify:c" in by_id["tf:destroy:b"].needs
    assert plan.changes[0].model_dump() == {"service": "b", "kind": "removed", "fields": []}


def test_removing_a_needed_service_is_an_error_not_an_exception() -> None:
    base, head = small(), small()
    del head["services"]["a"]
    plan = plan_of(base, head)
    assert not plan.ok and plan.steps == []
    assert any("b depends on" in finding.message for finding in plan.errors)


def test_service_option_keeps_that_service_and_what_it_needs() -> None:
    base, head = small(), small()
    head["core_services"]["postgresql"]["ports"] = [5432]
    head["services"]["c"]["ports"] = [80]
    head["services"]["a"]["ports"] = [81]
    plan = plan_of(base, head, service="a")
    assert {s.service for s in plan.steps} == {"postgresql", "a"}
    with pytest.raises(UnknownService):
        plan_of(base, head, service="nope")


def test_configurable_proxy_and_dns_services() -> None:
    base, head = small(), small()
    head["services"]["a"]["interface"]["proxy"]["upstream"] = "10.9.0.10:81"
    head["services"]["b"]["ip"] = "10.9.0.21"
    options = PlanOptions(proxy_service="postgresql", dns_service="caddy")
    ids = {s.id for s in plan_of(base, head, options=options).steps}
    assert {"nix:core:postgresql", "nix:core:caddy"} <= ids
    assert "nix:core:dns" not in ids


def test_digest_is_stable_and_depends_on_steps_and_revisions() -> None:
    base, head = small(), small()
    head["services"]["a"]["ports"] = [81]
    first = plan_of(base, head, base_rev="1" * 40, head_rev="2" * 40)
    again = plan_of(copy.deepcopy(base), copy.deepcopy(head), base_rev="1" * 40, head_rev="2" * 40)
    assert first.digest == again.digest and len(first.digest) == 64
    other_rev = plan_of(base, head, base_rev="1" * 40, head_rev="3" * 40)
    assert other_rev.digest != first.digest
    head["services"]["b"]["ports"] = [82]
    more_steps = plan_of(base, head, base_rev="1" * 40, head_rev="2" * 40)
    assert more_steps.digest != first.digest


def test_deep_chains_plan_without_recursion_limits() -> None:
    """5,000 services in one dependency chain: restrict walks it iteratively."""
    count = 5000
    apps = {
        f"s{i:05d}": {"depends_on": [f"s{i - 1:05d}"] if i else [], "vmid": 10_000 + i}
        for i in range(count)
    }
    base = {"services": apps}
    head = copy.deepcopy(base)
    head["services"]["s00000"]["vmid"] = 9_999
    head["services"][f"s{count - 1:05d}"]["ports"] = [1]
    plan = plan_of(base, head)
    last = f"s{count - 1:05d}"
    assert {s.id for s in plan.steps} == {
        "tf:infra",
        "nix:service-config:s00000",
        "verify:s00000",
        f"nix:service-config:{last}",
        f"verify:{last}",
    }
    assert plan.by_id()[f"nix:service-config:{last}"].needs == ["verify:s00000"]


def test_restrict_inherits_needs_through_unselected_steps() -> None:
    full = plan_full(parse_manifest(small())).by_id()
    kept = restrict(full, {"verify:c": ["r"], "nix:core:caddy": ["r"], "tf:infra": ["r"]})
    assert kept["verify:c"].needs == ["nix:core:caddy", "tf:infra"]
    assert kept["nix:core:caddy"].needs == ["tf:infra"]
    assert kept["verify:c"].reasons == ["r"]
    assert step_id(Phase.VERIFY, "c") == "verify:c"


def test_full_plan_needs_agree_with_full_steps(
    upstream_manifest: Path, upstream_manifest_old: Path
) -> None:
    """The on-demand needs used by diff plans are exactly those of the full plan."""
    manifests = [
        load_manifest(upstream_manifest),
        load_manifest(upstream_manifest_old),
        *(load_manifest(path) for path in sorted(MANIFESTS.glob("*.nix"))),
        parse_manifest(synthetic_manifest(300)),
        parse_manifest(small()),
    ]
    for manifest in manifests:
        analysis = analyse(manifest)
        full = full_steps(analysis, analysis.graph.nodes, PlanOptions())
        needs_of = FullPlanNeeds(analysis, PlanOptions())
        for sid, step in full.items():
            assert sorted(needs_of(sid)) == sorted(step.needs), sid
            assert needs_of.parse(sid) == (step.phase, step.service)


# --- containers reusing a removed one's vmid, ip or hostname --------------------------------------


def test_rename_reusing_vmid_destroys_the_old_container_before_tf_infra() -> None:
    base = small()
    base["services"]["c"]["vmid"] = 120
    head = copy.deepcopy(base)
    head["services"]["d"] = head["services"].pop("c")
    plan = plan_of(base, head)
    by_id = plan.by_id()
    assert plan.waves == [
        ["tf:destroy:c"],
        ["tf:infra"],
        ["nix:core:dns", "nix:service-config:d"],
        ["verify:d"],
    ]
    assert by_id["tf:destroy:c"].needs == []
    assert "tf:destroy:c" in by_id["tf:infra"].needs
    assert "tf:destroy:c" in by_id["nix:service-config:d"].needs
    for field_name in ("vmid", "ip", "hostname"):
        reason = f"services.d.{field_name} reuses removed services.c.{field_name}"
        assert reason in by_id["tf:infra"].reasons
        assert reason in by_id["tf:destroy:c"].reasons


def test_reusing_only_the_ip_names_that_field() -> None:
    base = small()
    head = copy.deepcopy(base)
    head["services"]["d"] = head["services"].pop("c")
    head["services"]["d"]["hostname"] = "d.lab"
    plan = plan_of(base, head)
    infra = plan.by_id()["tf:infra"]
    assert infra.needs == ["tf:destroy:c"]
    assert [r for r in infra.reasons if "reuses" in r] == [
        "services.d.ip reuses removed services.c.ip"
    ]


def test_an_existing_service_taking_a_removed_ip_waits_for_the_destroy() -> None:
    base = small()
    head = copy.deepcopy(base)
    del head["services"]["c"]
    head["services"]["b"]["ip"] = "10.9.0.12"  # c's
    plan = plan_of(base, head)
    assert plan.waves[0] == ["tf:destroy:c"]
    assert "services.b.ip reuses removed services.c.ip" in plan.by_id()["tf:infra"].reasons


def test_replacing_a_service_that_others_use_stays_a_dag() -> None:
    """b is replaced by b2 (same ip); c moves to b2; b's removed dependents go first too."""
    base = small()
    base["services"]["e"] = svc("10.9.0.13", depends_on=["b"])
    head = copy.deepcopy(base)
    head["services"]["b2"] = head["services"].pop("b")
    head["services"]["b2"]["hostname"] = "b2.lab"
    head["services"]["c"]["depends_on"] = ["b2"]
    del head["services"]["e"]
    plan = plan_of(base, head)
    assert plan.ok, plan.errors
    by_id = plan.by_id()
    # without a surviving dependent's verify (it needs tf:infra) or DNS first: else a cycle
    assert by_id["tf:destroy:b"].needs == ["tf:destroy:e"]
    assert by_id["tf:destroy:e"].needs == []
    assert plan.waves[:2] == [["tf:destroy:e"], ["tf:destroy:b"]]
    assert "tf:destroy:b" in by_id["tf:infra"].needs
    order = [sid for wave in plan.waves for sid in wave]
    assert order.index("tf:infra") < order.index("nix:core:dns")
    assert order.index("nix:service-config:b2") < order.index("verify:c")


def test_a_plain_removal_still_reconfigures_dns_before_destroying() -> None:
    base, head = small(), small()
    del head["services"]["c"]
    head["services"]["d"] = svc("10.9.0.30", hostname="d.lab")
    plan = plan_of(base, head)
    by_id = plan.by_id()
    assert by_id["tf:destroy:c"].needs == ["nix:core:dns"]
    assert "tf:destroy:c" not in by_id["tf:infra"].needs


# --- the global terraform roots -------------------------------------------------------------------


def with_auth() -> dict[str, Any]:
    """small() plus the identity provider `authentik`, used by `a` (OIDC)."""
    data = small()
    data["core_services"]["authentik"] = svc("10.9.0.5", hostname="auth.lab")
    data["services"]["a"]["interface"]["auth"] = {"type": "oidc", "provider": "authentik"}
    return data


def test_a_file_under_the_infra_root_applies_tf_infra_and_verifies_everything() -> None:
    manifest = parse_manifest(small())
    plan = plan_changes(manifest, manifest, changed_files=["terraform/infrastructure/main.tf"])
    by_id = plan.by_id()
    assert set(by_id) == {"tf:infra", *(f"verify:{name}" for name in manifest.enabled())}
    assert by_id["tf:infra"].targets == sorted(manifest.enabled())
    assert by_id["tf:infra"].reasons == ["terraform/infrastructure/main.tf"]
    assert plan.waves[0] == ["tf:infra"]


def test_a_file_under_the_auth_root_applies_tf_auth_core_and_verifies_auth_users() -> None:
    manifest = parse_manifest(with_auth())
    plan = plan_changes(manifest, manifest, changed_files=["terraform/authentik/main.tf"])
    by_id = plan.by_id()
    assert set(by_id) == {"tf:auth-core", "verify:a", "verify:authentik"}
    assert by_id["tf:auth-core"].reasons == ["terraform/authentik/main.tf"]
    assert "tf:auth-core" in by_id["verify:a"].needs


def test_global_roots_come_from_options_and_paths_config() -> None:
    manifest = parse_manifest(with_auth())
    moved = PlanOptions(infra_root="infra", auth_root=None)
    plan = plan_changes(manifest, manifest, changed_files=["infra/x.tf"], options=moved)
    assert "tf:infra" in plan.by_id()
    plan = plan_changes(
        manifest, manifest, changed_files=["terraform/authentik/main.tf"], options=moved
    )
    assert plan.steps == [] and "no changed file belongs" in (plan.note or "")
    config = PathsConfig.from_toml({"paths": {"infra_root": "./tf/infra", "auth_root": "tf/auth"}})
    assert (config.infra_root, config.auth_root, dict(config.services)) == (
        "./tf/infra",
        "tf/auth",
        {},
    )
    hits = match_files(
        ["tf/infra/main.tf", "tf/auth/a.tf", "terraform/infrastructure/x"],
        manifest,
        config,
        infra_root="terraform/infrastructure",
    )
    assert [
        (hit.path, Effect.INFRA in hit.effects, Effect.AUTH_CORE in hit.effects) for hit in hits
    ] == [("tf/auth/a.tf", False, True), ("tf/infra/main.tf", True, False)]
    with pytest.raises(ValueError, match=r"paths\.infra_root must be a directory path"):
        PathsConfig.from_toml({"paths": {"infra_root": ["x"]}})

"""Validation: each broken manifest in manifests/broken/ produces exactly its error."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.findings import ManifestError
from planner.plan import plan_full
from planner.source import load_manifest, parse_manifest

BROKEN = Path(__file__).resolve().parents[1] / "manifests" / "broken"

EXPECTED_ERRORS = {
    "bad-service-name": [
        'services.my_wiki: service name "my_wiki" is not a host name label. Fix: rename it to '
        'letters, digits and "-", starting with a letter, at most 63 characters, e.g. "my-wiki" '
        "(and rename it wherever depends_on names it)"
    ],
    "unknown-dependency": [
        'services.gitea.depends_on[0]: gitea depends on "postgres", which is not a service in '
        'this manifest. Fix: did you mean "postgresql"? name a service from core_services or '
        "services"
    ],
    "disabled-dependency": [
        'services.gitea.depends_on[1]: gitea depends on "redis", which is disabled '
        "(enable = false). Fix: enable redis or remove the dependency from gitea"
    ],
    "cycle": [
        "services.cache.depends_on: dependency cycle: cache → gitea → runner → cache. "
        "Fix: remove one of these dependencies so that the services can be ordered"
    ],
    "duplicate-ip": [
        "services.wiki.ip: ip 10.30.0.3 is also used by gitea. "
        "Fix: give wiki an ip that no other service uses"
    ],
    "duplicate-hostname": [
        "services.wiki.hostname: hostname gitea.lab.lan is also used by gitea. "
        "Fix: give wiki a hostname that no other service uses"
    ],
    "duplicate-vmid": [
        "services.wiki.vmid: vmid 403 is also used by gitea. "
        "Fix: give wiki a vmid that no other service uses"
    ],
    "duplicate-domain": [
        "services.wiki.interface.proxy.api.domain: proxy domain git.lab.lan is also used by "
        "gitea. Fix: give wiki a proxy domain that no other service uses"
    ],
    "ip-outside-network": [
        "services.gitea.ip: ip 10.31.0.3 is outside network_cidr 10.30.0.0/24. "
        "Fix: pick an address inside 10.30.0.0/24 or change network.network_cidr"
    ],
    "ip-network-address": [
        "services.gitea.ip: ip 10.30.0.0 is the network address of 10.30.0.0/24. "
        "Fix: pick a host address of 10.30.0.0/24 that is not reserved"
    ],
    "ip-broadcast-address": [
        "services.gitea.ip: ip 10.30.0.255 is the broadcast address of 10.30.0.0/24. "
        "Fix: pick a host address of 10.30.0.0/24 that is not reserved"
    ],
    "ip-gateway": [
        "services.gitea.ip: ip 10.30.0.1 is the gateway (network.gateway) of 10.30.0.0/24. "
        "Fix: pick a host address of 10.30.0.0/24 that is not reserved"
    ],
    "core-depends-on-app": [
        "core_services.postgresql.depends_on[0]: core service postgresql depends on application "
        "service gitea. Fix: core services deploy first: move gitea to core_services or drop "
        "it from postgresql.depends_on"
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_broken_manifest_gives_exactly_its_error(name: str) -> None:
    plan = plan_full(load_manifest(BROKEN / f"{name}.nix"))
    assert [finding.render() for finding in plan.errors] == EXPECTED_ERRORS[name]
    assert plan.steps == []
    assert all(finding.service and finding.field for finding in plan.errors)


def test_wrong_types_give_pydantic_path_and_message() -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest(BROKEN / "wrong-type.nix")
    assert [finding.render() for finding in caught.value.findings] == [
        "wrong-type.nix: services.gitea.vmid: Input should be a valid integer, unable to parse "
        "string as an integer. Fix: give services.gitea.vmid a value of the right type",
        "wrong-type.nix: services.gitea.ports[0]: Input should be a valid integer, unable to "
        "parse string as an integer. Fix: give services.gitea.ports[0] a value of the right type",
    ]
    assert not caught.value.evaluation_failed


def test_every_broken_manifest_is_covered() -> None:
    nix_errors = {"syntax-error", "read-file", "fetch-url", "wrong-type", "base"}
    names = {path.stem for path in BROKEN.glob("*.nix")}
    assert names - nix_errors == set(EXPECTED_ERRORS)


def test_base_of_the_broken_manifests_is_valid() -> None:
    assert plan_full(load_manifest(BROKEN / "base.nix")).ok


def minimal(**services: dict) -> dict:
    return {
        "network": {"gateway": "10.0.0.1", "network_cidr": "10.0.0.0/24"},
        "services": services,
    }


def test_unknown_keys_are_kept_and_warned() -> None:
    data = minimal(
        web={
            "ip": "10.0.0.2",
            "colour": "blue",
            "interface": {"health": {"liveness": "true", "grace": 3}},
        }
    )
    data["future_option"] = 1
    manifest = parse_manifest(data)
    assert manifest.services["web"].model_extra == {"colour": "blue"}
    plan = plan_full(manifest)
    assert plan.ok
    assert sorted(f.field for f in plan.warnings) == [
        "future_option",
        "services.web.colour",
        "services.web.interface.health.grace",
    ]
    warned = {f.field: f for f in plan.warnings}
    assert warned["services.web.colour"].service == "web"


def test_enable_flags_are_known_top_level_options() -> None:
    data = minimal(web={"ip": "10.0.0.2", "interface": {"health": {"liveness": "true"}}})
    data["enable_rollback"] = True
    manifest = parse_manifest(data)
    assert manifest.flags() == {"enable_rollback": True}
    assert plan_full(manifest).warnings == []


def test_service_without_health_check_is_a_warning_not_an_error() -> None:
    plan = plan_full(parse_manifest(minimal(web={"ip": "10.0.0.2"})))
    assert plan.ok
    assert [f.render() for f in plan.warnings] == [
        "services.web.interface.health: web has no health check; verify:web can only check "
        "that the host answers. Fix: add interface.health.startup and "
        "interface.health.liveness commands"
    ]


def test_dependency_on_missing_service_inferred_from_db_host_is_not_an_error() -> None:
    # a db host outside the manifest (an external database) is simply not a dependency
    data = minimal(
        web={
            "ip": "10.0.0.2",
            "interface": {"db": {"host": "db.example.org"}, "health": {"liveness": "true"}},
        }
    )
    assert plan_full(parse_manifest(data)).ok


def test_inferred_dependency_on_disabled_service_is_an_error() -> None:
    data = minimal(
        pg={"enable": False, "ip": "10.0.0.3"},
        web={
            "ip": "10.0.0.2",
            "interface": {"db": {"host": "10.0.0.3"}, "health": {"liveness": "true"}},
        },
    )
    plan = plan_full(parse_manifest(data))
    assert [f.render() for f in plan.errors] == [
        'services.web.interface.db.host: web depends on "pg", which is disabled '
        "(enable = false). Fix: enable pg or remove the dependency from web"
    ]


def test_disabled_services_may_share_addresses_with_enabled_ones() -> None:
    data = minimal(
        old={"enable": False, "ip": "10.0.0.2", "vmid": 7},
        web={"ip": "10.0.0.2", "vmid": 7, "interface": {"health": {"liveness": "true"}}},
    )
    assert plan_full(parse_manifest(data)).ok


def test_multi_proxy_map_and_single_proxy_are_both_understood(upstream_manifest: Path) -> None:
    manifest = load_manifest(upstream_manifest)
    monitoring = manifest.services["monitoring"].interface.proxies()
    assert sorted(monitoring) == ["alertmanager", "grafana", "loki", "prometheus"]
    assert manifest.services["vaultwarden"].interface.proxies()[""].domain == "vault.nixmox.lan"
    media = manifest.services["media"].interface
    assert sorted(media.databases()) == ["prowlarr", "radarr", "sonarr"]
    assert media.proxies()["sonarr"].auth.type == "forward_auth"

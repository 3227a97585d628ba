"""Manifest validation: every error names the service, the field and a fix."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address

from planner import digraph as nx  # networkx's API, without its 0.2 s import
from planner.findings import Finding, error, warning
from planner.graph import Dependency, find_cycle, orders_deployment, section, service_graph
from planner.models import Manifest, Service, unknown_keys


def validate(
    manifest: Manifest, deps: list[Dependency], graph: nx.DiGraph | None = None
) -> list[Finding]:
    """All errors and warnings of a parsed manifest, errors first, in a stable order."""
    findings = [
        *check_service_names(manifest),
        *check_dependencies(manifest, deps),
        *check_cycles(manifest, deps, graph),
        *check_duplicates(manifest),
        *check_addresses(manifest),
        *check_warnings(manifest),
    ]
    return sorted(findings, key=lambda f: f.severity != "error")


def _field(manifest: Manifest, name: str, field: str) -> str:
    return f"{section(manifest, name)}.{name}.{field}"


def _suggest(name: str, candidates: Iterable[str]) -> str:
    import difflib  # only a manifest with a typo pays for it (a valid one's validate does not)

    close = difflib.get_close_matches(name, sorted(candidates), n=1)
    return f'did you mean "{close[0]}"? ' if close else ""


# a NixOS host name label (RFC 1123): service names become host names, paths and workspaces
SERVICE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,62}")
SERVICE_NAME_MAX = 63
NOT_A_LABEL = re.compile(r"[^A-Za-z0-9]+")


def suggest_service_name(name: str) -> str:
    """A valid name close to `name`: other characters as `-`, a letter first, 63 at most."""
    label = NOT_A_LABEL.sub("-", name).strip("-")
    if label[:1].isdigit():
        label = "svc-" + label
    return label[:SERVICE_NAME_MAX].rstrip("-") or "service"


def check_service_names(manifest: Manifest) -> list[Finding]:
    """Every service name can be a host name label (letters, digits, `-`; a letter first)."""
    return [
        error(
            "bad-service-name",
            f'service name "{name}" is not a host name label',
            service=name,
            field=f"{section(manifest, name)}.{name}",
            hint=f'rename it to letters, digits and "-", starting with a letter, at most '
            f'{SERVICE_NAME_MAX} characters, e.g. "{suggest_service_name(name)}" '
            "(and rename it wherever depends_on names it)",
        )
        for name in manifest.all_services()
        if not SERVICE_NAME.fullmatch(name)
    ]


def check_dependencies(manifest: Manifest, deps: list[Dependency]) -> list[Finding]:
    """Unknown or disabled targets, and core services that need application services."""
    known = manifest.all_services()
    found: list[Finding] = []
    for dep in deps:
        problem = _dependency_problem(manifest, dep, known)
        if problem is not None:
            # the field path is built only for an error: a valid manifest has 30,000 dependencies
            code, message, hint = problem
            field = _field(manifest, dep.service, dep.field)
            found.append(error(code, message, service=dep.service, field=field, hint=hint))
    return found


def _dependency_problem(
    manifest: Manifest, dep: Dependency, known: dict[str, Service]
) -> tuple[str, str, str] | None:
    """What is wrong with one dependency (code, message, hint), or None."""
    target = known.get(dep.target)
    if target is None:
        return (
            "unknown-dependency",
            f'{dep.service} depends on "{dep.target}", which is not a service in this manifest',
            f"{_suggest(dep.target, known)}name a service from core_services or services",
        )
    if not target.enable:
        return (
            "disabled-dependency",
            f'{dep.service} depends on "{dep.target}", which is disabled (enable = false)',
            f"enable {dep.target} or remove the dependency from {dep.service}",
        )
    if (
        manifest.is_core(dep.service)
        and not manifest.is_core(dep.target)
        and orders_deployment(manifest, dep)
    ):
        return (
            "core-depends-on-app",
            f"core service {dep.service} depends on application service {dep.target}",
            f"core services deploy first: move {dep.target} to core_services "
            f"or drop it from {dep.service}.depends_on",
        )
    return None


def check_cycles(
    manifest: Manifest, deps: list[Dependency], graph: nx.DiGraph | None = None
) -> list[Finding]:
    """One error naming the whole cycle, if the services' dependencies loop."""
    cycle = find_cycle(graph if graph is not None else service_graph(manifest, deps))
    if cycle is None:
        return []
    first = cycle[0]
    return [
        error(
            "cycle",
            f"dependency cycle: {' → '.join(cycle)}",
            service=first,
            field=_field(manifest, first, "depends_on"),
            hint="remove one of these dependencies so that the services can be ordered",
        )
    ]


def _duplicates(
    manifest: Manifest, key: str, values: Callable[[Service], Iterable[tuple[str, object]]]
) -> list[Finding]:
    seen: dict[object, str] = {}
    found: list[Finding] = []
    for name, svc in manifest.enabled().items():
        for field, value in values(svc):
            if value is None:
                continue
            owner = seen.setdefault(value, name)
            if owner != name:
                found.append(
                    error(
                        f"duplicate-{key}",
                        f"{key} {value} is also used by {owner}",
                        service=name,
                        field=_field(manifest, name, field),
                        hint=f"give {name} {_article(key)} {key} that no other service uses",
                    )
                )
    return found


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _proxy_domains(svc: Service) -> Iterable[tuple[str, object]]:
    for entry, proxy in svc.interface.proxies().items():
        field = f"interface.proxy.{entry}.domain" if entry else "interface.proxy.domain"
        yield field, proxy.domain


def check_duplicates(manifest: Manifest) -> list[Finding]:
    """Two enabled services must not share an ip, hostname, vmid or proxy domain."""
    return [
        *_duplicates(manifest, "ip", lambda s: [("ip", s.ip)]),
        *_duplicates(manifest, "hostname", lambda s: [("hostname", s.hostname)]),
        *_duplicates(manifest, "vmid", lambda s: [("vmid", s.vmid)]),
        *_duplicates(manifest, "proxy domain", _proxy_domains),
    ]


def check_addresses(manifest: Manifest) -> list[Finding]:
    """Every ip inside `network_cidr` and not its network, broadcast or gateway address."""
    net = manifest.network.network_cidr
    if net is None:
        return []
    reserved: dict[IPv4Address, str] = {
        net.network_address: "the network address",
        net.broadcast_address: "the broadcast address",
    }
    if manifest.network.gateway is not None:
        reserved[manifest.network.gateway] = "the gateway (network.gateway)"
    found: list[Finding] = []
    for name, svc in manifest.enabled().items():
        if svc.ip is None:
            continue
        field = _field(manifest, name, "ip")
        if svc.ip not in net:
            found.append(
                error(
                    "ip-outside-network",
                    f"ip {svc.ip} is outside network_cidr {net}",
                    service=name,
                    field=field,
                    hint=f"pick an address inside {net} or change network.network_cidr",
                )
            )
        elif svc.ip in reserved:
            found.append(
                error(
                    "ip-reserved",
                    f"ip {svc.ip} is {reserved[svc.ip]} of {net}",
                    service=name,
                    field=field,
                    hint=f"pick a host address of {net} that is not reserved",
                )
            )
    return found


def check_warnings(manifest: Manifest) -> list[Finding]:
    """Unknown keys (kept, maybe a typo) and services nobody can health-check."""
    found = [
        warning(
            "unknown-key",
            f"unknown key {path} (kept, but nixmox does not use it)",
            field=path,
            service=_service_of(path),
            hint="check the spelling against the manifest schema in the README",
        )
        for path in unknown_keys(manifest)
    ]
    for name, svc in manifest.enabled().items():
        health = svc.interface.health
        if health is None or not (health.startup or health.liveness):
            found.append(
                warning(
                    "no-health-check",
                    f"{name} has no health check; verify:{name} can only "
                    "check that the host answers",
                    service=name,
                    field=_field(manifest, name, "interface.health"),
                    hint="add interface.health.startup and interface.health.liveness commands",
                )
            )
    return found


def _service_of(path: str) -> str | None:
    parts = path.split(".")
    return parts[1] if len(parts) > 2 and parts[0] in ("services", "core_services") else None

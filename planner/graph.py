"""The service dependency graph: explicit `depends_on` plus dependencies inferred from interfaces."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from planner import digraph as nx  # networkx's API, without its 0.2 s import
from planner.models import Manifest


class DepKind(StrEnum):
    EXPLICIT = "explicit"
    DATABASE = "db"
    AUTH = "auth"


@dataclass(frozen=True)
class Dependency:
    """`service` needs `target`; `field` is where the manifest says (or implies) so."""

    service: str
    target: str
    kind: DepKind
    field: str

    @property
    def inferred(self) -> bool:
        return self.kind is not DepKind.EXPLICIT


def section(manifest: Manifest, name: str) -> str:
    """The manifest section a service lives in."""
    return "core_services" if manifest.is_core(name) else "services"


def host_index(manifest: Manifest) -> dict[str, str]:
    """Service name by every way a host can be named: ip, hostname, short hostname, name."""
    index: dict[str, str] = {}
    for name, svc in manifest.all_services().items():
        index.setdefault(name, name)
        if svc.hostname:
            index.setdefault(svc.hostname, name)
            index.setdefault(svc.hostname.split(".")[0], name)
        if svc.ip is not None:
            index.setdefault(str(svc.ip), name)
    return index


def dependencies(manifest: Manifest) -> list[Dependency]:
    """Every dependency of every enabled service, explicit first, then inferred."""
    hosts = host_index(manifest)
    known = manifest.all_services()
    found: list[Dependency] = []
    for name, svc in manifest.enabled().items():
        explicit = set(svc.depends_on)
        for index, target in enumerate(svc.depends_on):
            found.append(Dependency(name, target, DepKind.EXPLICIT, f"depends_on[{index}]"))
        for db_name, db in svc.interface.databases().items():
            db_host = hosts.get(db.host or "")
            if db_host and db_host != name and db_host not in explicit:
                field = f"interface.dbs.{db_name}.host" if db_name else "interface.db.host"
                found.append(Dependency(name, db_host, DepKind.DATABASE, field))
                explicit.add(db_host)
        for path, auth in svc.interface.auths().items():
            provider = auth.provider
            if (
                provider is not None
                and provider in known
                and provider != name
                and provider not in explicit
            ):
                found.append(Dependency(name, provider, DepKind.AUTH, f"{path}.provider"))
                explicit.add(provider)
    return found


def orders_deployment(manifest: Manifest, dep: Dependency) -> bool:
    """Whether a dependency orders the deployment steps.

    A core service's auth client (pgadmin's OIDC app on postgresql, say) is created by
    `tf:auth-core` after the provider is verified, so it must not order the core service's own
    deployment: the provider itself may need that core service (authentik needs postgresql).
    """
    return not (dep.kind is DepKind.AUTH and manifest.is_core(dep.service))


def service_graph(manifest: Manifest, deps: list[Dependency] | None = None) -> nx.DiGraph:
    """Enabled services; an edge `a -> b` means a needs b (ordering dependencies only)."""
    graph = nx.DiGraph()
    enabled = manifest.enabled()
    graph.add_nodes_from(enabled)
    for dep in deps if deps is not None else dependencies(manifest):
        if dep.target in enabled and orders_deployment(manifest, dep):
            graph.add_edge(dep.service, dep.target, kind=dep.kind, field=dep.field)
    return graph


def find_cycle(graph: nx.DiGraph) -> list[str] | None:
    """One dependency cycle as `[a, b, c, a]`, found from the alphabetically first node."""
    if nx.is_directed_acyclic_graph(graph):
        return None
    for start in sorted(graph.nodes):
        try:
            edges = nx.find_cycle(graph, source=start)
        except nx.NetworkXNoCycle:
            continue
        cycle = [edges[0][0]] + [edge[1] for edge in edges]
        first = cycle.index(min(cycle[:-1]))
        rotated = cycle[first:-1] + cycle[:first]
        return [*rotated, rotated[0]]
    return None

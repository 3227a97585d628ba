"""Change selection: which steps of the head's full plan a manifest or file change needs."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from planner import digraph as nx  # networkx's API, without its 0.2 s import
from planner.diff import VERIFY_ALL_FIELDS, Effect, FileHit, ServiceDiff
from planner.graph import host_index
from planner.models import Manifest, Service
from planner.plan.full import service_chain
from planner.plan.model import Phase, PlanOptions, nix_phase, step_id


class Selection:
    """Selected steps of the head's plan, with their reasons, and tf:infra's targets."""

    def __init__(self, head: Manifest, provider: str | None) -> None:
        self.head = head
        self.enabled = head.enabled()
        self.provider = provider
        self.reasons: dict[str, list[str]] = {}
        self.infra_targets: set[str] = set()
        self.redeployed_core: dict[str, list[str]] = {}
        self.owner: dict[str, str | None] = {}  # step id -> its service
        self._chains: dict[str, list[Phase]] = {}

    def chain(self, service: str) -> list[Phase]:
        if service not in self._chains:
            self._chains[service] = service_chain(self.head, service)
        return self._chains[service]

    def exists(self, phase: Phase, service: str | None) -> bool:
        """Whether the head's full plan has this step."""
        if phase is Phase.TF_INFRA:
            return True
        if phase is Phase.TF_AUTH_CORE:
            return self.provider is not None
        return service in self.enabled and phase in self.chain(service)

    def add(self, phase: Phase, service: str | None, reason: str) -> bool:
        """Select a step; False (nothing selected) when the head's plan has no such step."""
        if not self.exists(phase, service):
            return False
        sid = step_id(phase, service)
        self.owner[sid] = service
        reasons = self.reasons.setdefault(sid, [])
        if reason not in reasons:
            reasons.append(reason)
        return True

    def add_all(self, reason: str) -> None:
        """Every step of the head's full plan (a `network.*` change)."""
        self.add(Phase.TF_INFRA, None, reason)
        self.add(Phase.TF_AUTH_CORE, None, reason)
        for name in self.enabled:
            for phase in self.chain(name):
                self.add(phase, name, reason)
        self.infra_targets.update(self.enabled)

    def add_infra(self, service: str, reason: str) -> None:
        self.add(Phase.TF_INFRA, None, reason)
        self.infra_targets.add(service)


@dataclass
class ChangeContext:
    """What the change rules need to know about base and head."""

    base: Manifest
    head: Manifest
    options: PlanOptions
    provider: str | None

    @cached_property
    def head_services(self) -> dict[str, Service]:
        return self.head.all_services()

    @cached_property
    def base_services(self) -> dict[str, Service]:
        return self.base.all_services()

    @cached_property
    def head_enabled(self) -> dict[str, Service]:
        return self.head.enabled()

    @cached_property
    def head_hosts(self) -> dict[str, str]:
        """Only database changes need host lookups: built on first use."""
        return host_index(self.head)

    @cached_property
    def base_hosts(self) -> dict[str, str]:
        return host_index(self.base)


def _database_services(ctx: ChangeContext, service: str, path: str) -> set[str]:
    """The services hosting the databases a changed `interface.db*` path refers to."""
    parts = path.split(".")
    enabled = ctx.head_enabled
    found: set[str] = set()
    for services, hosts in (
        (ctx.head_services, ctx.head_hosts),
        (ctx.base_services, ctx.base_hosts),
    ):
        svc = services.get(service)
        if svc is None:
            continue
        dbs = svc.interface.databases()
        if parts[1] == "db":
            entries = [dbs[""]] if "" in dbs else []
        elif len(parts) > 2 and parts[2] in dbs:
            entries = [dbs[parts[2]]]
        else:
            entries = [db for name, db in dbs.items() if name]
        for db in entries:
            target = hosts.get(db.host or "")
            if target and target != service and target in enabled:
                found.add(target)
    return found


def apply_effects(
    sel: Selection,
    ctx: ChangeContext,
    service: str,
    effects: Iterable[Effect],
    reason: str,
    field_path: str = "",
) -> None:
    """Select the steps that `effects` on `service` need, each with `reason`."""
    head, options = ctx.head, ctx.options
    effects = set(effects)
    is_core = head.is_core(service)
    if Effect.TERRAFORM in effects:
        fed = [
            sel.add(phase, service, reason)
            for phase in (Phase.TF_SERVICE_INFRA, Phase.TF_SERVICE_CONFIG)
        ]
        if not any(fed):
            effects.add(Effect.NIX)  # its terraform is gone: at least rebuild the host
    if Effect.AUTH in effects:
        if is_core:
            sel.add(Phase.TF_AUTH_CORE, None, reason)  # core services' apps: tf:auth-core
        else:
            sel.add(Phase.TF_SERVICE_CONFIG, service, reason)
    if Effect.INFRA in effects:
        sel.add_infra(service, reason)
    if Effect.AUTH_CORE in effects:
        sel.add(Phase.TF_AUTH_CORE, None, reason)
    if Effect.DNS in effects:
        sel.add(Phase.NIX_CORE, options.dns_service, reason)
    if Effect.PROXY in effects:
        sel.add(Phase.NIX_CORE, options.proxy_service, reason)
    if Effect.DATABASE in effects and field_path:
        for target in sorted(_database_services(ctx, service, field_path)):
            sel.add(nix_phase(head, target), target, reason)
    if Effect.NIX in effects:
        sel.add(nix_phase(head, service), service, reason)
        if is_core:
            sel.redeployed_core.setdefault(service, []).append(reason)
        if service == ctx.provider and field_path:
            # the provider's own manifest entry changed (a rebuild alone does not need it)
            sel.add(Phase.TF_AUTH_CORE, None, reason)
    if Effect.VERIFY in effects:
        sel.add(Phase.VERIFY, service, reason)


def select_added(sel: Selection, ctx: ChangeContext, change: ServiceDiff) -> None:
    """A new (or re-enabled, or moved) service: its whole chain and the core services it uses."""
    head, name = ctx.head, change.service
    reason = change.path(change.fields[0] if change.fields else None)
    for phase in sel.chain(name):
        sel.add(phase, name, reason)
    sel.add_infra(name, reason)
    svc = ctx.head_services[name]
    if svc.hostname:  # its A record
        sel.add(Phase.NIX_CORE, ctx.options.dns_service, reason)
    if svc.interface.proxies():
        sel.add(Phase.NIX_CORE, ctx.options.proxy_service, reason)
    for entry in svc.interface.databases():
        field_path = f"interface.dbs.{entry}" if entry else "interface.db"
        for target in sorted(_database_services(ctx, name, field_path)):
            sel.add(nix_phase(head, target), target, reason)
    if name == ctx.provider or (head.is_core(name) and svc.interface.auths()):
        sel.add(Phase.TF_AUTH_CORE, None, reason)


def select_removed(sel: Selection, ctx: ChangeContext, change: ServiceDiff) -> None:
    """A removed service: DNS and proxy stop pointing at it (its destroy step comes later)."""
    old = ctx.base_services[change.service]
    reason = change.path(change.fields[0] if change.fields else None)
    if old.hostname:
        sel.add(Phase.NIX_CORE, ctx.options.dns_service, reason)
    if old.interface.proxies():
        sel.add(Phase.NIX_CORE, ctx.options.proxy_service, reason)
    if old.interface.auths() and ctx.base.is_core(change.service):
        sel.add(Phase.TF_AUTH_CORE, None, reason)


def select_global(sel: Selection, ctx: ChangeContext, fields: Iterable[str]) -> bool:
    """Top-level changes; True when they need the full plan (`network.*`).

    `network.*` → everything; options that only tune verification (`health_check_timeout`,
    `retry_*`, `deployment_phases`, `enable_*`) → verify of every service; any other top-level
    key (host configurations may read it) → nix and verify of every service.
    """
    needs_full = False
    for path in fields:
        top = path.split(".")[0]
        if top == "network":
            needs_full = True
            sel.add_all(path)
        elif top in VERIFY_ALL_FIELDS or top.startswith("enable_"):
            for name in sel.enabled:
                sel.add(Phase.VERIFY, name, path)
        else:
            for name in sel.enabled:
                apply_effects(sel, ctx, name, {Effect.NIX, Effect.VERIFY}, path)
    return needs_full


def hit_services(sel: Selection, ctx: ChangeContext, hit: FileHit) -> list[str]:
    """The services a file that belongs to no one service counts for.

    The auth root's terraform (tf:auth-core) concerns the provider and services using auth;
    anything else (global globs, shared modules, the infra root) every service.
    """
    if Effect.AUTH_CORE not in hit.effects:
        return sorted(sel.enabled)
    return sorted(
        name
        for name, svc in ctx.head_enabled.items()
        if name == ctx.provider or svc.interface.auths()
    )


def reverify_dependents(sel: Selection, graph: nx.DiGraph) -> None:
    """A redeployed core service: re-verify every service that depends on it, transitively."""
    for core, reasons in sorted(sel.redeployed_core.items()):
        for dependent in sorted(nx.ancestors(graph, core)):
            for reason in reasons:
                sel.add(Phase.VERIFY, dependent, reason)


def keep_only(sel: Selection, services: set[str]) -> None:
    """Drop selected steps of services outside `services` (`--service`)."""
    for sid in list(sel.reasons):
        owner = sel.owner[sid]
        if owner is not None and owner not in services:
            del sel.reasons[sid]
    sel.infra_targets &= services
    if not sel.infra_targets:
        sel.reasons.pop(step_id(Phase.TF_INFRA), None)

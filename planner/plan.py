"""Plans: phased, dependency-ordered steps built from a validated manifest."""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, Field

from planner import digraph as nx  # networkx's API, without its 0.2 s import
from planner.diff import (
    VERIFY_ALL_FIELDS,
    DiffKind,
    Effect,
    FileHit,
    ManifestDiff,
    PathsConfig,
    ServiceDiff,
    diff_manifests,
    dump,
    field_effects,
    match_files,
)
from planner.findings import Finding, Severity, warning
from planner.graph import (
    Dependency,
    dependencies,
    host_index,
    orders_deployment,
    service_graph,
)
from planner.models import Manifest, Service
from planner.validate import (
    check_addresses,
    check_cycles,
    check_dependencies,
    check_duplicates,
    validate,
)

if TYPE_CHECKING:
    import networkx


class Phase(StrEnum):
    TF_INFRA = "tf:infra"
    NIX_CORE = "nix:core"
    TF_AUTH_CORE = "tf:auth-core"
    TF_SERVICE_INFRA = "tf:service-infra"
    NIX_SERVICE_CONFIG = "nix:service-config"
    TF_SERVICE_CONFIG = "tf:service-config"
    VERIFY = "verify"
    TF_DESTROY = "tf:destroy"


GLOBAL_PHASES = frozenset({Phase.TF_INFRA, Phase.TF_AUTH_CORE})
NIX_PHASES = frozenset({Phase.NIX_CORE, Phase.NIX_SERVICE_CONFIG})
TF_PHASES = frozenset(
    {
        Phase.TF_INFRA,
        Phase.TF_AUTH_CORE,
        Phase.TF_SERVICE_INFRA,
        Phase.TF_SERVICE_CONFIG,
        Phase.TF_DESTROY,
    }
)


class ChangeKind(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


_PREFIX = {phase: f"{phase.value}:" for phase in Phase}
_PHASE_BY_VALUE = {phase.value: phase for phase in Phase}


def step_id(phase: Phase, service: str | None = None) -> str:
    # a dict lookup: formatting a StrEnum member is slow, and plans have 20,000 ids
    return _PREFIX[phase] + service if service else _PREFIX[phase][:-1]


_M = TypeVar("_M", bound=BaseModel)
_set_attr = object.__setattr__


def trusted(cls: type[_M], fields: dict[str, Any]) -> _M:
    """A model from values the planner built itself: `fields` holds every field, in order.

    What `model_construct` does, without its per-field alias and default handling: plans build
    20,000 steps and dependencies, and `model_construct` was a fifth of planning time.
    """
    model = cls.__new__(cls)
    _set_attr(model, "__dict__", fields)
    _set_attr(model, "__pydantic_fields_set__", set(fields))
    _set_attr(model, "__pydantic_extra__", None)
    _set_attr(model, "__pydantic_private__", None)
    return model


class Step(BaseModel):
    """One unit of work: a phase applied to a service (or globally)."""

    id: str
    phase: Phase
    service: str | None = None
    needs: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    targets: list[str] = Field(default_factory=list)


class DependencyInfo(BaseModel):
    """A service dependency as the plan shows it (inferred ones say from which field)."""

    service: str
    target: str
    kind: str
    field: str
    inferred: bool
    orders: bool = True  # False: set up later by tf:auth-core, does not order the steps


class Change(BaseModel):
    """What changed for one service (`service=None`: a global change such as `network.*`)."""

    service: str | None
    kind: ChangeKind
    fields: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class PlanOptions:
    """Which services play the roles the phases refer to, and where the global roots live.

    The roots mirror the runner's defaults (`runners.config.DEFAULT_ROOTS`); a changed file
    under one selects its step. `[paths]` of `.nixmox.toml` may override them.
    """

    proxy_service: str = "caddy"
    dns_service: str = "dns"
    auth_service: str = "authentik"
    infra_root: str | None = "terraform/infrastructure"
    auth_root: str | None = "terraform/authentik"


class Plan(BaseModel):
    """A DAG of steps with its waves, revisions, changes, findings and digest."""

    steps: list[Step] = Field(default_factory=list)
    waves: list[list[str]] = Field(default_factory=list)
    warnings: list[Finding] = Field(default_factory=list)
    errors: list[Finding] = Field(default_factory=list)
    base: str | None = None
    head: str | None = None
    changes: list[Change] = Field(default_factory=list)
    note: str | None = None
    dependencies: list[DependencyInfo] = Field(default_factory=list)
    digest: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors

    def by_id(self) -> dict[str, Step]:
        return {step.id: step for step in self.steps}

    def services(self) -> list[str]:
        """Services with at least one step, sorted."""
        return sorted({step.service for step in self.steps if step.service})

    def graph(self) -> networkx.DiGraph:
        """The step DAG: an edge `a -> b` means b needs a."""
        import networkx  # imported where used: it costs 0.2 s at import

        graph = networkx.DiGraph()
        for step in self.steps:
            graph.add_node(step.id)
            graph.add_edges_from((need, step.id) for need in step.needs)
        return graph

    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape (`nixmox plan --format json`)."""
        return {
            "digest": self.digest,
            "base": self.base,
            "head": self.head,
            "steps": [step.model_dump(mode="json") for step in self.steps],
            "waves": self.waves,
            "changes": [change.model_dump(mode="json") for change in self.changes],
            "warnings": [finding.render() for finding in self.warnings],
            "errors": [finding.render() for finding in self.errors],
            "note": self.note,
            "dependencies": [dep.model_dump(mode="json") for dep in self.dependencies],
        }


def canonical_digest(steps: Iterable[Step], base: str | None, head: str | None) -> str:
    """sha256 of what would run (steps, needs, targets) and the revisions it runs from."""
    body = {
        "base": base,
        "head": head,
        "steps": sorted(
            ([s.id, str(s.phase), s.service, sorted(s.needs), sorted(s.targets)] for s in steps),
            key=lambda item: item[0],
        ),
    }
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def finalize(
    steps: dict[str, Step],
    *,
    base: str | None = None,
    head: str | None = None,
    changes: list[Change] | None = None,
    warnings: list[Finding] | None = None,
    note: str | None = None,
) -> Plan:
    """Order steps into stable waves (topological generations, sorted) and seal the digest."""
    for step in steps.values():
        step.needs = sorted(set(step.needs))
    waves = generations(steps)
    ordered = [steps[sid] for wave in waves for sid in wave]
    return Plan(
        steps=ordered,
        waves=waves,
        warnings=warnings or [],
        base=base,
        head=head,
        changes=changes or [],
        note=note,
        digest=canonical_digest(ordered, base, head),
    )


def generations(steps: dict[str, Step]) -> list[list[str]]:
    """Topological generations, each sorted by id (Kahn's algorithm).

    Plain dicts rather than a networkx graph: building a DiGraph of 20,000 steps costs more
    than planning them.
    """
    waiting = {sid: len(step.needs) for sid, step in steps.items()}
    dependents: dict[str, list[str]] = {sid: [] for sid in steps}
    for sid, step in steps.items():
        for need in step.needs:
            if need not in dependents:
                raise ValueError(f"step {sid} needs {need}, which is not in the plan")
            dependents[need].append(sid)
    wave = sorted(sid for sid, count in waiting.items() if count == 0)
    waves: list[list[str]] = []
    while wave:
        waves.append(wave)
        ready = []
        for sid in wave:
            for dependent in dependents[sid]:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    ready.append(dependent)
        wave = sorted(ready)
    if sum(map(len, waves)) != len(steps):
        raise ValueError("the steps' needs form a cycle")
    return waves


def invalid_plan(
    findings: list[Finding], *, base: str | None = None, head: str | None = None
) -> Plan:
    """A plan that carries validation errors instead of steps."""
    return Plan(
        errors=[f for f in findings if f.severity is Severity.ERROR],
        warnings=[f for f in findings if f.severity is Severity.WARNING],
        base=base,
        head=head,
        note="the manifest is invalid; nothing can be deployed",
    )


def manifest_digest(manifest: Manifest) -> str:
    """A content identity for a manifest that has no Git revision."""
    return "sha256:" + hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()


@dataclass
class Analysis:
    """A parsed manifest with its dependencies, service graph and findings."""

    manifest: Manifest
    deps: list[Dependency]
    graph: nx.DiGraph
    findings: list[Finding]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.WARNING]


def analyse(manifest: Manifest) -> Analysis:
    """Dependencies, graph and validation findings of a manifest."""
    deps = dependencies(manifest)
    graph = service_graph(manifest, deps)
    return Analysis(manifest, deps, graph, validate(manifest, deps, graph))


def auth_provider(manifest: Manifest, options: PlanOptions) -> str | None:
    """The identity provider `tf:auth-core` configures, if it is a planned service."""
    enabled = manifest.enabled()
    if options.auth_service in enabled:
        return options.auth_service
    named = sorted(
        {
            auth.provider
            for svc in enabled.values()
            for auth in svc.interface.auths().values()
            if auth.provider in enabled
        }
    )
    return named[0] if named else None


def service_chain(manifest: Manifest, name: str) -> list[Phase]:
    """The phases one service goes through, in order."""
    svc = manifest.all_services()[name]
    has_tf = svc.interface.terraform is not None
    if manifest.is_core(name):
        return [*([Phase.TF_SERVICE_INFRA] if has_tf else []), Phase.NIX_CORE, Phase.VERIFY]
    chain = [Phase.TF_SERVICE_INFRA] if has_tf else []
    chain.append(Phase.NIX_SERVICE_CONFIG)
    if has_tf or svc.interface.auths():
        chain.append(Phase.TF_SERVICE_CONFIG)
    chain.append(Phase.VERIFY)
    return chain


def full_steps(
    analysis: Analysis, services: Iterable[str], options: PlanOptions
) -> dict[str, Step]:
    """Every step of deploying `services` from nothing, with the full plan's needs."""
    manifest, graph = analysis.manifest, analysis.graph
    planned = sorted(services)
    steps: dict[str, Step] = {}
    infra = Step(
        id=step_id(Phase.TF_INFRA),
        phase=Phase.TF_INFRA,
        targets=planned,
        reasons=[f"containers of {len(planned)} services"],
    )
    steps[infra.id] = infra
    provider = auth_provider(manifest, options)
    auth_core = None
    if provider in planned:
        auth_core = Step(
            id=step_id(Phase.TF_AUTH_CORE),
            phase=Phase.TF_AUTH_CORE,
            needs=[step_id(Phase.VERIFY, provider)],
            reasons=[f"identity provider {provider}: outposts and core apps"],
        )
        steps[auth_core.id] = auth_core
    planned_set = set(planned)
    for name in planned:
        prefix = "core_services" if manifest.is_core(name) else "services"
        waits = [step_id(Phase.VERIFY, dep) for dep in graph.successors(name) if dep in planned_set]
        previous: str | None = None
        for phase in service_chain(manifest, name):
            needs = [previous] if previous else (waits or [infra.id])
            if phase is Phase.NIX_CORE:
                needs = sorted({*needs, infra.id})
            if phase is Phase.TF_SERVICE_CONFIG and auth_core is not None:
                needs.append(auth_core.id)
            # trusted: these values are built here, validating 20,000 of them is waste
            step = trusted(
                Step,
                {
                    "id": step_id(phase, name),
                    "phase": phase,
                    "service": name,
                    "needs": needs,
                    "reasons": [f"{prefix}.{name}"],
                    "targets": [],
                },
            )
            steps[step.id] = step
            previous = step.id
    return steps


def required_services(analysis: Analysis, service: str) -> set[str]:
    """A service and everything it needs, transitively."""
    return {service, *nx.descendants(analysis.graph, service)}


class UnknownService(ValueError):
    """`--service` names a service that is not planned."""


def plan_full(
    manifest: Manifest,
    *,
    service: str | None = None,
    options: PlanOptions | None = None,
    base: str | None = None,
    head: str | None = None,
) -> Plan:
    """The plan of a full deployment (no previous state), optionally of one service's closure."""
    with gc_paused():
        return _plan_full(manifest, service, options or PlanOptions(), base, head)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: planning allocates ~100,000 short-lived objects and none form cycles
    that must be freed mid-plan; collections would cost ~40 % of planning time at 5,000 services."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            promote_young_objects()
            gc.enable()


def promote_young_objects() -> None:
    """Move every object allocated while paused to the oldest GC generation, unscanned.

    Re-enabling the GC would otherwise collect the young generation at once, scanning every
    object planning left alive (~0.1 s at 5,000 services). Cyclic garbage among them is still
    freed, by the next full collection. Skipped if the process froze objects on purpose
    (`gc.unfreeze` would thaw them).
    """
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


def _plan_full(
    manifest: Manifest,
    service: str | None,
    options: PlanOptions,
    base: str | None,
    head: str | None,
) -> Plan:
    analysis = analyse(manifest)
    head = head or manifest_digest(manifest)
    if analysis.errors:
        return invalid_plan(analysis.findings, base=base, head=head)
    services: Iterable[str] = analysis.graph.nodes
    if service is not None:
        if service not in analysis.graph:
            known = ", ".join(sorted(analysis.graph.nodes))
            raise UnknownService(f'no enabled service "{service}" in the manifest (known: {known})')
        services = required_services(analysis, service)
    steps = full_steps(analysis, services, options)
    plan = finalize(steps, base=base, head=head, warnings=analysis.warnings)
    plan.dependencies = dependency_infos(analysis, set(services))
    return plan


def dependency_infos(analysis: Analysis, services: set[str]) -> list[DependencyInfo]:
    """The dependencies among planned services, explicit and inferred, for display."""
    manifest = analysis.manifest
    return [
        trusted(
            DependencyInfo,
            {
                "service": dep.service,
                "target": dep.target,
                "kind": dep.kind.value,
                "field": dep.field,
                "inferred": dep.inferred,
                "orders": orders_deployment(manifest, dep),
            },
        )
        for dep in analysis.deps
        if dep.service in services and dep.target in services
    ]


def restrict(full: dict[str, Step], selected: dict[str, list[str]]) -> dict[str, Step]:
    """Keep only `selected` steps (id -> reasons), each needing its nearest selected ancestors.

    This keeps the full plan's order: if a step needs an unselected step, it inherits that
    step's needs, transitively.
    """
    memo: dict[str, set[str]] = {}
    kept: dict[str, Step] = {}
    for sid, reasons in selected.items():
        base = full[sid]
        needs = sorted(nearest_selected(lambda step: full[step].needs, selected, sid, memo))
        kept[sid] = base.model_copy(update={"needs": needs, "reasons": reasons})
    return kept


def nearest_selected(
    needs_of: Callable[[str], list[str]],
    selected: Mapping[str, object],
    start: str,
    memo: dict[str, set[str]],
) -> set[str]:
    """The selected steps `start` needs through unselected ones (iterative: deep DAGs are fine)."""
    stack = [start]
    while stack:
        sid = stack[-1]
        if sid in memo:
            stack.pop()
            continue
        needs = needs_of(sid)
        pending = [n for n in needs if n not in selected and n not in memo]
        if pending:
            stack.extend(pending)
            continue
        found: set[str] = set()
        for need in needs:
            if need in selected:
                found.add(need)
            else:
                found |= memo[need]
        memo[sid] = found
        stack.pop()
    return memo[start]


# --- diff-aware planning -------------------------------------------------------------------
#
# A change selects steps of the head's full plan, each with the reasons that caused it; each
# selected step then needs its nearest selected ancestors in the full plan (computed on demand
# by FullPlanNeeds), which keeps the full plan's order. Removals add `tf:destroy` steps, which
# no plan of the head contains.

NOTE_SAME_MANIFEST = "the manifest evaluates to the same services and settings"
NOTE_NO_FILES = "no changed file belongs to a service"
NOTE_DISABLED_ONLY = "only disabled services changed ({names})"
NOTE_BASE_INVALID = "the base manifest could not be used ({why}); this is the full plan of head"
ANALYSIS_MEMO_SIZE = 8


class AnalysisMemo:
    """Analyses of manifest objects already seen (a bot re-plans the same revisions).

    Keyed by object identity, so only hand it manifests that are not mutated afterwards, such
    as those `planner.source.EvalCache` returns (it owns one of these for that reason).
    """

    def __init__(self, size: int = ANALYSIS_MEMO_SIZE) -> None:
        self.size = size
        # id -> (the manifest, kept alive so its id stays its own; analysis; errors only?)
        self._items: dict[int, tuple[Manifest, Analysis, bool]] = {}
        self._dumps: dict[int, tuple[Manifest, dict[str, Any]]] = {}

    def analyse(self, manifest: Manifest, *, warnings: bool = True) -> Analysis:
        """The manifest's analysis; `warnings=False` may skip the warning checks (base)."""
        found = self._items.pop(id(manifest), None)
        if found is None or found[0] is not manifest or (warnings and found[2]):
            analysis = analyse(manifest) if warnings else analyse_errors(manifest)
            found = (manifest, analysis, not warnings)
        self._items[id(manifest)] = found
        while len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))
        return found[1]

    def dump(self, manifest: Manifest) -> dict[str, Any]:
        """The manifest's JSON-like data for the diff (a base was usually a head before)."""
        found = self._dumps.pop(id(manifest), None)
        if found is None or found[0] is not manifest:
            found = (manifest, dump(manifest))
        self._dumps[id(manifest)] = found
        while len(self._dumps) > self.size:
            self._dumps.pop(next(iter(self._dumps)))
        return found[1]


def analyse_errors(manifest: Manifest) -> Analysis:
    """Dependencies, graph and validation errors only (a base manifest needs no warnings)."""
    deps = dependencies(manifest)
    graph = service_graph(manifest, deps)
    findings = [
        *check_dependencies(manifest, deps),
        *check_cycles(manifest, deps, graph),
        *check_duplicates(manifest),
        *check_addresses(manifest),
    ]
    return Analysis(manifest, deps, graph, findings)


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


def nix_phase(manifest: Manifest, service: str) -> Phase:
    """The phase that builds a service's NixOS configuration."""
    return Phase.NIX_CORE if manifest.is_core(service) else Phase.NIX_SERVICE_CONFIG


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


REUSED_FIELDS = ("vmid", "ip", "hostname")


@dataclass(frozen=True)
class Reuse:
    """A head service taking over a removed service's vmid, ip or hostname."""

    removed: str  # base service
    service: str  # head service
    field: str
    reason: str


def replacements(
    ctx: ChangeContext, diff: ManifestDiff, removed: list[ServiceDiff]
) -> dict[str, list[Reuse]]:
    """Removed service -> the added (or readdressed) services reusing its vmid, ip or hostname.

    Proxmox refuses a second container with the same vmid, and two live containers sharing an
    address confuse nixos-rebuild: such a removed container must be destroyed first.
    """
    if not removed:
        return {}
    claimed: dict[str, list[tuple[str, str]]] = {}  # "<field>=<value>" -> [(service, path)]
    for change in diff.services:
        if not change.enabled_in_head or change.kind is DiffKind.REMOVED:
            continue
        tops = {path.split(".")[0] for path in change.fields}
        svc = ctx.head_services[change.service]
        for name in REUSED_FIELDS:
            value = getattr(svc, name)
            if value is not None and (change.kind is DiffKind.ADDED or name in tops):
                claimed.setdefault(f"{name}={value}", []).append((change.service, change.path()))
    found: dict[str, list[Reuse]] = {}
    for change in removed:
        old = ctx.base_services[change.service]
        for name in REUSED_FIELDS:
            value = getattr(old, name)
            for service, path in claimed.get(f"{name}={value}", []) if value is not None else ():
                reason = f"{path}.{name} reuses removed {change.path()}.{name}"
                found.setdefault(change.service, []).append(
                    Reuse(change.service, service, name, reason)
                )
    return found


def destroy_before_reuse(
    steps: dict[str, Step], sel: Selection, replaced: Mapping[str, list[Reuse]]
) -> None:
    """tf:infra and each reusing service's first step wait for the reused container's destroy."""
    infra = steps.get(step_id(Phase.TF_INFRA))
    for old, reuses in sorted(replaced.items()):
        destroy = step_id(Phase.TF_DESTROY, old)
        for reuse in reuses:
            first = next(
                (
                    steps[sid]
                    for phase in sel.chain(reuse.service)
                    if (sid := step_id(phase, reuse.service)) in steps
                ),
                None,
            )
            for step in (infra, first):
                if step is None:
                    continue
                if destroy not in step.needs:
                    step.needs = sorted([*step.needs, destroy])
                if reuse.reason not in step.reasons:
                    step.reasons = [*step.reasons, reuse.reason]


def destroy_steps(
    kept: dict[str, Step],
    removed: list[ServiceDiff],
    base_graph: nx.DiGraph,
    replaced: Mapping[str, list[Reuse]] | None = None,
) -> dict[str, Step]:
    """`tf:destroy:<svc>` for removed services, after every dependent is gone or reconfigured.

    Core reconfiguration (DNS records, proxy routes) goes first, so nothing points at a
    container that no longer exists. A container whose vmid, ip or hostname a head service
    reuses (`replaced`) is destroyed before anything else instead (tf:infra will need it), so
    its destroy, and those of its removed dependents, need only each other: DNS and proxy are
    reconfigured afterwards, with the new service.
    """
    replaced = replaced or {}
    gone = {change.service for change in removed}
    early = early_destroys(set(replaced), gone, base_graph)
    by_service: dict[str, list[str]] = {}
    for sid, step in kept.items():
        if step.service:
            by_service.setdefault(step.service, []).append(sid)
    core_first = [sid for sid, step in kept.items() if step.phase is Phase.NIX_CORE]
    steps: dict[str, Step] = {}
    for change in removed:
        name = change.service
        needs: set[str] = set() if name in early else set(core_first)
        for dependent in base_graph.predecessors(name) if name in base_graph else ():
            if dependent in gone:
                needs.add(step_id(Phase.TF_DESTROY, dependent))
            elif name in early:
                continue  # it is reconfigured after the new container exists
            elif step_id(Phase.VERIFY, dependent) in kept:
                needs.add(step_id(Phase.VERIFY, dependent))
            else:
                needs.update(by_service.get(dependent, []))
        step = Step(
            id=step_id(Phase.TF_DESTROY, name),
            phase=Phase.TF_DESTROY,
            service=name,
            needs=sorted(needs),
            reasons=[
                change.path(change.fields[0] if change.fields else None),
                *(reuse.reason for reuse in replaced.get(name, [])),
            ],
            targets=[name],
        )
        steps[step.id] = step
    return steps


def early_destroys(replaced: set[str], gone: set[str], base_graph: nx.DiGraph) -> set[str]:
    """Removed services destroyed before tf:infra: the replaced ones and their removed dependents."""
    early = set(replaced)
    stack = list(replaced)
    while stack:
        name = stack.pop()
        for dependent in base_graph.predecessors(name) if name in base_graph else ():
            if dependent in gone and dependent not in early:
                early.add(dependent)
                stack.append(dependent)
    return early


def changes_of(diff: ManifestDiff) -> list[Change]:
    """The JSON `changes` list: per service, and one global entry (`service: null`)."""
    changes = [
        Change(service=item.service, kind=ChangeKind(item.kind.value), fields=list(item.fields))
        for item in diff.services
    ]
    if diff.global_fields:
        changes.append(
            Change(service=None, kind=ChangeKind.CHANGED, fields=list(diff.global_fields))
        )
    return changes


def empty_note(diff: ManifestDiff, files: list[str], service: str | None) -> str:
    """Why a change needs no deployment, in plain words."""
    if service is not None and (not diff.empty or files):
        return f"nothing that {service} needs has changed"
    parts: list[str] = []
    if diff.empty:
        parts.append(NOTE_SAME_MANIFEST + " (only comments or formatting changed, if anything)")
    else:
        names = ", ".join(sorted({item.service for item in diff.services}))
        parts.append(NOTE_DISABLED_ONLY.format(names=names))
    if files:
        count = len(files)
        parts.append(f"{NOTE_NO_FILES} ({count} file{'s' if count != 1 else ''} changed)")
    return "; ".join(parts)


def plan_changes(
    base: Manifest | None,
    head: Manifest,
    *,
    changed_files: Iterable[str] = (),
    paths_config: PathsConfig | None = None,
    service: str | None = None,
    options: PlanOptions | None = None,
    base_rev: str | None = None,
    head_rev: str | None = None,
    manifest_path: str | None = None,
    memo: AnalysisMemo | None = None,
) -> Plan:
    """The plan of exactly what going from `base` to `head` needs (pure; no base: full plan).

    `changed_files` are repository paths changed between the revisions; `manifest_path` (the
    manifest file itself) is left to the semantic diff. An invalid head gives a plan carrying
    the errors; an invalid base gives the full plan of head, with a warning saying so.
    """
    with gc_paused():
        return _plan_changes(
            base,
            head,
            files=[path for path in dict.fromkeys(changed_files) if path != manifest_path],
            paths_config=paths_config,
            service=service,
            options=options or PlanOptions(),
            base_rev=base_rev,
            head_rev=head_rev or manifest_digest(head),
            memo=memo or AnalysisMemo(),
        )


def _plan_changes(
    base: Manifest | None,
    head: Manifest,
    *,
    files: list[str],
    paths_config: PathsConfig | None,
    service: str | None,
    options: PlanOptions,
    base_rev: str | None,
    head_rev: str,
    memo: AnalysisMemo,
) -> Plan:
    if base is None:
        return full_plan_as_change(head, service, options, base_rev, head_rev)
    analysis = memo.analyse(head)
    if analysis.errors:
        return invalid_plan(analysis.findings, base=base_rev, head=head_rev)
    base_analysis = memo.analyse(base, warnings=False)
    if base_analysis.errors:
        why = f"{len(base_analysis.errors)} validation error(s), first: "
        why += base_analysis.errors[0].render()
        return full_plan_as_change(head, service, options, base_rev, head_rev, base_problem=why)
    if service is not None and service not in analysis.graph:
        known = ", ".join(sorted(analysis.graph.nodes))
        raise UnknownService(f'no enabled service "{service}" in the manifest (known: {known})')

    diff = diff_manifests(base, head, base_data=memo.dump(base), head_data=memo.dump(head))
    provider = auth_provider(head, options)
    sel = Selection(head, provider)
    ctx = ChangeContext(base, head, options, provider)
    needs_full = select_global(sel, ctx, diff.global_fields)
    removed: list[ServiceDiff] = []
    for change in diff.services:
        if change.kind is DiffKind.REMOVED:
            removed.append(change)
            select_removed(sel, ctx, change)
        elif change.kind is DiffKind.ADDED:
            select_added(sel, ctx, change)
        elif change.enabled_in_head:
            for path in change.fields:
                apply_effects(
                    sel, ctx, change.service, field_effects(path), change.path(path), path
                )
    hits = match_files(
        files, head, paths_config, infra_root=options.infra_root, auth_root=options.auth_root
    )
    for hit in hits:
        for name in [hit.service] if hit.service else hit_services(sel, ctx, hit):
            apply_effects(sel, ctx, name, hit.effects, hit.path)
    reverify_dependents(sel, analysis.graph)
    if service is not None:
        removed = []  # a one-service plan never destroys other services
        keep_only(sel, required_services(analysis, service))

    steps = selected_steps(sel, analysis, options, needs_full)
    replaced = replacements(ctx, diff, removed)
    steps.update(destroy_steps(steps, removed, base_analysis.graph, replaced))
    destroy_before_reuse(steps, sel, replaced)
    plan = finalize(
        steps,
        base=base_rev,
        head=head_rev,
        changes=changes_of(diff),
        warnings=analysis.warnings,
        note=None if steps else empty_note(diff, files, service),
    )
    plan.dependencies = dependency_infos(analysis, set(plan.services()))
    return plan


def keep_only(sel: Selection, services: set[str]) -> None:
    """Drop selected steps of services outside `services` (`--service`)."""
    for sid in list(sel.reasons):
        owner = sel.owner[sid]
        if owner is not None and owner not in services:
            del sel.reasons[sid]
    sel.infra_targets &= services
    if not sel.infra_targets:
        sel.reasons.pop(step_id(Phase.TF_INFRA), None)


def selected_steps(
    sel: Selection, analysis: Analysis, options: PlanOptions, needs_full: bool
) -> dict[str, Step]:
    """The selected steps, each needing its nearest selected steps in the full plan's order."""
    if not sel.reasons:
        return {}
    if needs_full:
        return restrict(full_steps(analysis, analysis.graph.nodes, options), sel.reasons)
    needs_of = FullPlanNeeds(analysis, options)
    memo: dict[str, set[str]] = {}
    steps: dict[str, Step] = {}
    for sid, reasons in sel.reasons.items():
        phase, service = needs_of.parse(sid)
        needs = sorted(nearest_selected(needs_of, sel.reasons, sid, memo))
        steps[sid] = Step(id=sid, phase=phase, service=service, needs=needs, reasons=reasons)
    infra = steps.get(step_id(Phase.TF_INFRA))
    if infra is not None:
        infra.targets = sorted(sel.infra_targets)
    return steps


class FullPlanNeeds:
    """The needs of any step of the full plan, computed on demand (no Step objects).

    Mirrors `full_steps` for the whole manifest, so that a small change in a large manifest
    does not pay for building every step; tests check both agree on every step.
    """

    def __init__(self, analysis: Analysis, options: PlanOptions) -> None:
        self.manifest = analysis.manifest
        self.graph = analysis.graph
        provider = auth_provider(self.manifest, options)
        self.provider = provider if provider in self.graph else None
        self.infra = step_id(Phase.TF_INFRA)
        self.auth_core = step_id(Phase.TF_AUTH_CORE) if self.provider else None
        self._chains: dict[str, list[Phase]] = {}

    def parse(self, sid: str) -> tuple[Phase, str | None]:
        """`nix:core:caddy` -> (Phase.NIX_CORE, "caddy")."""
        # dict lookups of the one- and two-part prefixes (a phase is `verify` or `tf:infra`):
        # a change deep in a large manifest parses ~10,000 ids
        parts = sid.split(":", 2)
        for count in (2, 1):
            phase = _PHASE_BY_VALUE.get(":".join(parts[:count])) if len(parts) >= count else None
            if phase is not None:
                return phase, ":".join(parts[count:]) if len(parts) > count else None
        raise KeyError(sid)

    def chain(self, service: str) -> list[Phase]:
        if service not in self._chains:
            self._chains[service] = service_chain(self.manifest, service)
        return self._chains[service]

    def __call__(self, sid: str) -> list[str]:
        phase, service = self.parse(sid)
        if service is None:
            if phase is Phase.TF_AUTH_CORE and self.provider:
                return [step_id(Phase.VERIFY, self.provider)]
            return []
        chain = self.chain(service)
        index = chain.index(phase)
        if index:
            needs = [step_id(chain[index - 1], service)]
        else:
            waits = [step_id(Phase.VERIFY, dep) for dep in self.graph.successors(service)]
            needs = waits or [self.infra]
        if phase is Phase.NIX_CORE:
            needs = sorted({*needs, self.infra})
        if phase is Phase.TF_SERVICE_CONFIG and self.auth_core is not None:
            needs.append(self.auth_core)
        return needs


def full_plan_as_change(
    head: Manifest,
    service: str | None,
    options: PlanOptions,
    base_rev: str | None,
    head_rev: str,
    *,
    base_problem: str | None = None,
) -> Plan:
    """The full plan of head, reported as every enabled service being added."""
    plan = plan_full(head, service=service, options=options, base=base_rev, head=head_rev)
    if not plan.ok:
        return plan
    plan.changes = [Change(service=name, kind=ChangeKind.ADDED) for name in sorted(head.enabled())]
    if base_problem is not None:
        plan.note = NOTE_BASE_INVALID.format(why=base_problem)
        plan.warnings = [
            warning("base-invalid", plan.note, hint="fix the base branch's manifest"),
            *plan.warnings,
        ]
    return plan

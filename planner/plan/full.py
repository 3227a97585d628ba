"""The full plan: every step of deploying services from nothing, in dependency order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from planner import digraph as nx  # networkx's API, without its 0.2 s import
from planner.findings import Finding, Severity
from planner.graph import Dependency, dependencies, orders_deployment, service_graph
from planner.models import Manifest
from planner.plan.model import (
    DependencyInfo,
    Phase,
    Plan,
    PlanOptions,
    Step,
    UnknownService,
    finalize,
    invalid_plan,
    manifest_digest,
    parse_step_id,
    step_id,
    trusted,
)
from planner.validate import (
    check_addresses,
    check_cycles,
    check_dependencies,
    check_duplicates,
    validate,
)

__all__ = [
    "Analysis",
    "FullPlanNeeds",
    "analyse",
    "analyse_errors",
    "auth_provider",
    "check_service",
    "dependency_infos",
    "full_steps",
    "nearest_selected",
    "plan_full",
    "required_services",
    "restrict",
    "service_chain",
]


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


def check_service(analysis: Analysis, service: str) -> None:
    """Raise `UnknownService` unless `service` is an enabled service of the manifest."""
    if service not in analysis.graph:
        known = ", ".join(sorted(analysis.graph.nodes))
        raise UnknownService(f'no enabled service "{service}" in the manifest (known: {known})')


def required_services(analysis: Analysis, service: str) -> set[str]:
    """A service and everything it needs, transitively."""
    return {service, *nx.descendants(analysis.graph, service)}


def plan_full(
    manifest: Manifest,
    *,
    service: str | None = None,
    options: PlanOptions | None = None,
    base: str | None = None,
    head: str | None = None,
) -> Plan:
    """The plan of a full deployment (no previous state), optionally of one service's closure."""
    options = options or PlanOptions()
    analysis = analyse(manifest)
    head = head or manifest_digest(manifest)
    if analysis.errors:
        return invalid_plan(analysis.findings, base=base, head=head)
    services: Iterable[str] = analysis.graph.nodes
    if service is not None:
        check_service(analysis, service)
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
        return parse_step_id(sid)

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

"""Plans: phased, dependency-ordered steps built from a validated manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import networkx as nx
from pydantic import BaseModel, Field

from planner.findings import Finding, Severity
from planner.graph import Dependency, dependencies, service_graph
from planner.models import Manifest
from planner.validate import validate


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


def step_id(phase: Phase, service: str | None = None) -> str:
    return f"{phase}:{service}" if service else str(phase)


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


class Change(BaseModel):
    """What changed for one service (`service=None`: a global change such as `network.*`)."""

    service: str | None
    kind: ChangeKind
    fields: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class PlanOptions:
    """Which services play the roles the phases refer to."""

    proxy_service: str = "caddy"
    dns_service: str = "dns"
    auth_service: str = "authentik"


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

    def graph(self) -> nx.DiGraph:
        """The step DAG: an edge `a -> b` means b needs a."""
        graph = nx.DiGraph()
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
            ([s.id, s.phase.value, s.service, sorted(s.needs), sorted(s.targets)] for s in steps),
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
    graph = nx.DiGraph()
    graph.add_nodes_from(steps)
    for step in steps.values():
        step.needs = sorted(set(step.needs))
        graph.add_edges_from((need, step.id) for need in step.needs)
    waves = [sorted(generation) for generation in nx.topological_generations(graph)]
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
    data = manifest.model_dump(mode="json")
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


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
    return Analysis(manifest, deps, service_graph(manifest, deps), validate(manifest, deps))


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
            step = Step(
                id=step_id(phase, name), phase=phase, service=name, reasons=[f"{prefix}.{name}"]
            )
            if previous is None:
                step.needs = [*waits] or [infra.id]
            else:
                step.needs = [previous]
            if phase is Phase.NIX_CORE:
                step.needs = sorted({*step.needs, infra.id})
            if phase is Phase.TF_SERVICE_CONFIG and auth_core is not None:
                step.needs.append(auth_core.id)
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
    options = options or PlanOptions()
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
    return [
        DependencyInfo(
            service=dep.service,
            target=dep.target,
            kind=dep.kind.value,
            field=dep.field,
            inferred=dep.inferred,
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

    def nearest(step: str) -> set[str]:
        if step in memo:
            return memo[step]
        found: set[str] = set()
        for need in full[step].needs:
            found |= {need} if need in selected else nearest(need)
        memo[step] = found
        return found

    kept: dict[str, Step] = {}
    for sid, reasons in selected.items():
        base = full[sid]
        kept[sid] = base.model_copy(update={"needs": sorted(nearest(sid)), "reasons": reasons})
    return kept

"""The plan's data model: phases, steps, the plan itself, its waves and its digest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, Field

from planner.findings import Finding, Severity
from planner.models import Manifest
from planner.output import Output

__all__ = [
    "GLOBAL_PHASES",
    "NIX_PHASES",
    "TF_PHASES",
    "Change",
    "ChangeKind",
    "DependencyInfo",
    "Phase",
    "Plan",
    "PlanOptions",
    "Step",
    "UnknownService",
    "canonical_digest",
    "finalize",
    "generations",
    "invalid_plan",
    "manifest_digest",
    "parse_step_id",
    "step_id",
    "trusted",
]

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


def nix_phase(manifest: Manifest, service: str) -> Phase:
    """The phase that builds a service's NixOS configuration."""
    return Phase.NIX_CORE if manifest.is_core(service) else Phase.NIX_SERVICE_CONFIG


def parse_step_id(sid: str) -> tuple[Phase, str | None]:
    """`nix:core:caddy` -> (Phase.NIX_CORE, "caddy")."""
    # dict lookups of the one- and two-part prefixes (a phase is `verify` or `tf:infra`):
    # a change deep in a large manifest parses ~10,000 ids
    parts = sid.split(":", 2)
    for count in (2, 1):
        phase = _PHASE_BY_VALUE.get(":".join(parts[:count])) if len(parts) >= count else None
        if phase is not None:
            return phase, ":".join(parts[count:]) if len(parts) > count else None
    raise KeyError(sid)


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


class Step(Output):
    """One unit of work: a phase applied to a service (or globally)."""

    id: str
    phase: Phase
    service: str | None = None
    needs: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    targets: list[str] = Field(default_factory=list)


class DependencyInfo(Output):
    """A service dependency as the plan shows it (inferred ones say from which field)."""

    service: str
    target: str
    kind: str
    field: str
    inferred: bool
    orders: bool = True  # False: set up later by tf:auth-core, does not order the steps


class Change(Output):
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


class FileNote(Output):
    """A changed file: the steps it selected and why, or why it selected none."""

    path: str
    steps: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    note: str | None = None


class Plan(Output):
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
    files: list[FileNote] = Field(default_factory=list)  # diff plans: `--explain-files`

    @property
    def ok(self) -> bool:
        return not self.errors

    def by_id(self) -> dict[str, Step]:
        return {step.id: step for step in self.steps}

    def services(self) -> list[str]:
        """Services with at least one step, sorted."""
        return sorted({step.service for step in self.steps if step.service})

    def graph(self) -> networkx.DiGraph[str]:
        """The step DAG: an edge `a -> b` means b needs a."""
        import networkx  # imported where used: it costs 0.2 s at import

        graph: networkx.DiGraph[str] = networkx.DiGraph()
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
            key=lambda item: str(item[0]),  # the step id
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


class UnknownService(ValueError):
    """`--service` names a service that is not planned."""

"""Removals: `tf:destroy` steps, and destroying a container before another reuses its identity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from planner import digraph as nx  # networkx's API, without its 0.2 s import
from planner.diff import DiffKind, ManifestDiff, ServiceDiff
from planner.plan.model import Phase, Step, step_id
from planner.plan.selection import ChangeContext, Selection

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

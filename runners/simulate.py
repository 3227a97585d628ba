"""The simulated runner (`--runner simulate`): sleeps, fails on request, and keeps system paths.

It keeps one "running system" per service, so a deployment and its rollback are observable:
a nix step records the running system and activates a new one derived from the revision;
rollback activates the recorded one. A verify step listed in `fail` fails while the service
runs what this process deployed, and passes once the service has been rolled back.

With a `build` duration (`--simulate-duration build=SECONDS`), a nix step is a build and a
switch, simulated apart: every build starts with the deployment, `build_parallel` at once, and
the nix step (its own duration: the switch) waits for its build.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from planner.plan import NIX_PHASES, Phase, Plan, Step
from runners.base import Context
from runners.builds import BuildResult, BuildScheduler, finish_deployment_builds
from runners.config import SimulateConfig
from state.events import StepResult

BUILD = "build"

SIMULATED_FAILURE = "simulated failure of {step}"


def system_path(service: str, seed: str) -> str:
    """A store-path-like name for a simulated system."""
    digest = hashlib.sha256(f"{seed}:{service}".encode()).hexdigest()[:32]
    return f"/nix/store/{digest}-nixos-system-{service}"


@dataclass
class SimulatedHosts:
    """What each simulated host runs, and every activation in order."""

    running: dict[str, str] = field(default_factory=dict)
    activations: list[tuple[str, str]] = field(default_factory=list)
    rolled_back: set[str] = field(default_factory=set)

    def current(self, service: str) -> str:
        return self.running.setdefault(service, system_path(service, "initial"))

    def activate(self, service: str, path: str) -> None:
        self.running[service] = path
        self.activations.append((service, path))


class SimulatedRunner:
    """Runs every phase by sleeping; also the rollback runner of the simulated set."""

    def __init__(self, config: SimulateConfig | None = None, *, build_parallel: int = 4) -> None:
        self.config = config or SimulateConfig()
        self.hosts = SimulatedHosts()
        self.fail = set(self.config.fail)
        self.build_parallel = build_parallel
        self.schedulers: dict[str, BuildScheduler] = {}

    @property
    def builds_apart(self) -> bool:
        return BUILD in self.config.durations

    def build_duration(self) -> float:
        return self.config.durations.get(BUILD, 0.0) * self.config.scale

    def start_builds(self, plan: Plan, ctx: Context) -> None:
        """Start every nix step's simulated build (only with a `build` duration)."""
        if not self.builds_apart:
            return
        services = [s.service for s in plan.steps if s.phase in NIX_PHASES and s.service]
        scheduler = BuildScheduler(self._build, self.build_parallel)
        self.schedulers[ctx.deployment_id] = scheduler
        scheduler.start(services)

    async def finish_builds(self, ctx: Context) -> None:
        await finish_deployment_builds(self.schedulers, ctx.deployment_id)

    async def _build(self, service: str) -> BuildResult:
        await asyncio.sleep(self.build_duration())
        return BuildResult(True, None, f"simulated build of {service}")

    async def _await_build(self, step: Step, ctx: Context) -> None:
        scheduler = self.schedulers.get(ctx.deployment_id)
        if scheduler is not None and step.phase in NIX_PHASES and step.service:
            await scheduler.result(step.service)

    def duration(self, step: Step) -> float:
        seconds = self.config.durations.get(step.phase.value, self.config.default_duration)
        return seconds * self.config.scale

    def estimate(self, step: Step) -> float:
        return self.duration(step)

    def commands(self, step: Step, ctx: Context) -> list[str]:
        return [f"simulate {step.id} ({self.duration(step):g}s)"]

    async def run(self, step: Step, ctx: Context) -> StepResult:
        await self._await_build(step, ctx)
        await asyncio.sleep(self.duration(step))
        commands = self.commands(step, ctx)
        if step.phase in NIX_PHASES and step.service:
            return self._activate(step, ctx, commands)
        if step.id in self.fail and not self._cured(step):
            return StepResult(False, SIMULATED_FAILURE.format(step=step.id), commands=commands)
        return StepResult(True, f"simulated {step.id}", commands=commands)

    def _cured(self, step: Step) -> bool:
        """A verify failure is caused by the new system: after a rollback it passes."""
        return step.phase is Phase.VERIFY and step.service in self.hosts.rolled_back

    def _activate(self, step: Step, ctx: Context, commands: list[str]) -> StepResult:
        service = step.service or ""
        previous = self.hosts.current(service)
        ctx.previous_systems.setdefault(service, previous)
        if step.id in self.fail:
            output = SIMULATED_FAILURE.format(step=step.id)
            return StepResult(False, output, previous_system=previous, commands=commands)
        new = system_path(service, ctx.revision or ctx.deployment_id)
        self.hosts.activate(service, new)
        self.hosts.rolled_back.discard(service)
        output = f"simulated switch of {service}: {previous} -> {new}"
        return StepResult(True, output, previous, new, commands)

    def rollback_commands(self, service: str, ctx: Context, target: str) -> list[str]:
        return [f"simulate rollback {service} to {target}"]

    async def rollback(self, service: str, ctx: Context) -> StepResult:
        target = ctx.previous_systems.get(service)
        current = self.hosts.current(service)
        if target is None:
            return StepResult(False, f"no recorded system to roll {service} back to")
        command = self.rollback_commands(service, ctx, target)
        await asyncio.sleep(self.config.durations.get("rollback", 0.0) * self.config.scale)
        if service in self.config.fail_rollback:
            output = f"simulated rollback failure of {service}"
            return StepResult(False, output, current, None, command)
        self.hosts.activate(service, target)
        self.hosts.rolled_back.add(service)
        return StepResult(True, f"rolled {service} back to {target}", current, target, command)

"""Which runner handles which phase: `build_runners("real"|"simulate", config) -> RunnerSet`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from planner.plan import NIX_PHASES, TF_PHASES, Phase, Step
from runners.base import Context, RollbackRunner, Runner
from runners.config import RunnerConfig, TransportKind
from runners.redact import Redactor
from runners.transport import LocalTransport, SshTransport, Transport
from state.events import StepResult

__all__ = ["RunnerConfig", "RunnerKind", "RunnerSet", "build_runners", "build_transport"]


class RunnerKind(StrEnum):
    REAL = "real"
    SIMULATE = "simulate"


@runtime_checkable
class Describing(Protocol):
    """A runner that can say exactly which command lines a step would run (dry-run)."""

    def commands(self, step: Step, ctx: Context) -> list[str]: ...


@runtime_checkable
class Estimating(Protocol):
    """A runner that knows roughly how long a step takes (for scheduling priorities)."""

    def estimate(self, step: Step) -> float: ...


# relative weights when a runner gives no estimate: a NixOS switch is the slow part
DEFAULT_ESTIMATES: dict[Phase, float] = {
    Phase.TF_INFRA: 3.0,
    Phase.NIX_CORE: 6.0,
    Phase.TF_AUTH_CORE: 2.0,
    Phase.TF_SERVICE_INFRA: 2.0,
    Phase.NIX_SERVICE_CONFIG: 6.0,
    Phase.TF_SERVICE_CONFIG: 2.0,
    Phase.VERIFY: 1.0,
    Phase.TF_DESTROY: 2.0,
}


class NoRunner(LookupError):
    """No runner is configured for a phase."""


@dataclass
class RunnerSet:
    """The runners of one kind, by phase, plus the ones rollback and re-verification use."""

    kind: RunnerKind
    by_phase: Mapping[Phase, Runner]
    rollback: RollbackRunner | None
    redactor: Redactor = field(default_factory=Redactor)
    transport: Transport | None = None
    _estimators: dict[Phase, Callable[[Step], float] | None] = field(
        default_factory=dict, init=False, repr=False
    )

    def runner_for(self, step: Step) -> Runner:
        try:
            return self.by_phase[step.phase]
        except KeyError:
            raise NoRunner(f"no runner configured for phase {step.phase}") from None

    @property
    def verify(self) -> Runner:
        return self.by_phase[Phase.VERIFY]

    def commands(self, step: Step, ctx: Context) -> list[str]:
        """The exact command lines a step would run (redacted like its output)."""
        runner = self.runner_for(step)
        if isinstance(runner, Describing):
            return [self.redactor.text(line) for line in runner.commands(step, ctx)]
        return [f"# {type(runner).__name__} runs {step.id}"]

    def estimate(self, step: Step) -> float:
        """Roughly how long a step takes (scheduling priority: longest remaining chain first)."""
        if step.phase not in self._estimators:
            # protocol checks are slow: decide once per phase
            runner = self.by_phase.get(step.phase)
            self._estimators[step.phase] = (
                runner.estimate if isinstance(runner, Estimating) else None
            )
        estimator = self._estimators[step.phase]
        if estimator is None:
            return DEFAULT_ESTIMATES.get(step.phase, 1.0)
        return max(estimator(step), 0.0)

    def redact(self, result: StepResult) -> StepResult:
        """The result with configured patterns replaced in its output and commands."""
        result.output = self.redactor.text(result.output)
        result.commands = [self.redactor.text(line) for line in result.commands]
        return result

    async def close(self) -> None:
        """Release connections (ssh control masters)."""
        if self.transport is not None:
            await self.transport.close()


def build_transport(config: RunnerConfig) -> Transport:
    if config.transport.kind is TransportKind.LOCAL:
        return LocalTransport()
    return SshTransport(config.transport.ssh)


def build_runners(
    kind: RunnerKind | str,
    config: RunnerConfig | None = None,
    *,
    transport: Transport | None = None,
) -> RunnerSet:
    """The runner set for `--runner real|simulate`."""
    config = config or RunnerConfig()
    kind = RunnerKind(kind)
    redactor = Redactor(config.redact.patterns)
    if kind is RunnerKind.SIMULATE:
        from runners.simulate import SimulatedRunner

        sim = SimulatedRunner(config.simulate, build_parallel=config.nixos.build_parallel)
        return RunnerSet(kind, dict.fromkeys(Phase, sim), sim, redactor)

    from runners.health import HealthRunner
    from runners.nixos import HostResolver, NixosRunner
    from runners.terraform import TerraformRunner

    transport = transport or build_transport(config)
    hosts = HostResolver(config.transport)
    terraform = TerraformRunner(config.terraform, redactor=redactor)
    nixos = NixosRunner(config.nixos, transport, hosts, ssh=config.transport)
    health = HealthRunner(config.health, transport, hosts)
    by_phase: dict[Phase, Runner] = {phase: terraform for phase in TF_PHASES}
    by_phase.update({phase: nixos for phase in NIX_PHASES})
    by_phase[Phase.VERIFY] = health
    return RunnerSet(kind, by_phase, nixos, redactor, transport)

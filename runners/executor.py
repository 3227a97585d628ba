"""The executor: walks a Plan's DAG with asyncio, in parallel, with failure skips and rollback.

A step starts as soon as every step it needs has succeeded, up to `parallel` at once; among
ready steps, the one heading the longest remaining chain goes first, so long chains are not
starved by wide waves. When a step fails, every step that needs it (transitively) is skipped;
unrelated branches finish. When a `nix:*` or `verify` step of a service fails and auto-rollback
is on, the service is rolled back to the system recorded before this deployment touched it and
re-verified; the step then ends `rolled_back`. A failed verify of a service this deployment
did not redeploy instead rolls back the redeployed services upstream of it in the plan, re-verifies
them, then re-verifies the failing service. Every transition is an Event. The `recorder`
(the state store) is awaited for each one before the execution goes on: if it fails, the
execution stops with `RecordingFailed` rather than run on unrecorded. Notifiers are
subscribers, each fed in order through its own queue: a slow, hanging or failing subscriber
never slows or breaks the deployment.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

import networkx as nx

from planner.plan import NIX_PHASES, Phase, Plan, Step, finalize, step_id
from runners.base import Context, Runner
from runners.builds import BuildFailed, Prebuilding
from runners.event_bus import EventBus
from runners.outcome import ExecutionResult, RecordingFailed, StepOutcome, overall_state
from runners.registry import RunnerSet
from state.events import (
    DeploymentFinished,
    DeploymentKind,
    DeploymentStarted,
    Event,
    RollbackFinished,
    RollbackStarted,
    StepFinished,
    StepOutput,
    StepResult,
    StepStarted,
    StepState,
    Subscriber,
    utcnow,
)

log = logging.getLogger(__name__)

ROLLBACK_PHASES = frozenset({*NIX_PHASES, Phase.VERIFY})
NO_PREVIOUS_SYSTEM = "no recorded previous system for {service}: cannot roll back"
# the failure's own reason comes first; what the rollback did (or could not do) is appended
WITH_NOTE = "{failure}; {note}"
UNCHANGED = "nothing was changed on {service}: it still runs {system}"
SKIP_REASON = "needs {step}, which {state}"
ROLLBACK_REASON = "{service} rolled back to {system} after {step} failed"
ROLLBACK_FAILED = "rollback of {service} failed: {detail}"
REVERIFY_FAILED = "{service} was rolled back to {system}, but re-verification failed: {detail}"
UPSTREAM_ROLLED_BACK = "{service} rolled back to {system}"
UPSTREAM_REASON = "{rolled_back}: {step} failed after its redeploy"
UPSTREAM_STILL_FAILING = "{rolled_back}, but {step} still failed: {detail}"
RUNNER_CRASHED = "runner error: {error}"
INTERRUPTED = "the deployment was interrupted"
NOT_RECORDED = "the state store could not record {event}: {error}"


def remaining_path(
    plan: Plan, weight: Callable[[Step], float], graph: nx.DiGraph[str] | None = None
) -> dict[str, float]:
    """For each step, the weight of the longest chain from it to the end of the plan."""
    graph = plan.graph() if graph is None else graph
    by_id = plan.by_id()
    longest: dict[str, float] = {}
    for sid in reversed(list(nx.topological_sort(graph))):
        own = weight(by_id[sid]) if sid in by_id else 0.0
        longest[sid] = own + max((longest[d] for d in graph.successors(sid)), default=0.0)
    return longest


def critical_path(plan: Plan, weight: Callable[[Step], float]) -> float:
    """The plan's shortest possible duration with unlimited parallelism."""
    return max(remaining_path(plan, weight).values(), default=0.0)


class _RollbackRunner:
    """Runs the steps of an explicit rollback: activate a target system, then re-verify."""

    def __init__(self, runners: RunnerSet, targets: Mapping[str, str]) -> None:
        self.runners = runners
        self.targets = targets

    async def run(self, step: Step, ctx: Context) -> StepResult:
        if step.phase is Phase.VERIFY:
            return await self.runners.verify.run(step, ctx)
        service = step.service or ""
        if self.runners.rollback is None:
            return StepResult(False, f"the {self.runners.kind} runners cannot roll back")
        ctx.previous_systems[service] = self.targets[service]
        return await self.runners.rollback.rollback(service, ctx)

    def commands(self, step: Step, ctx: Context) -> list[str]:
        if step.phase is Phase.VERIFY:
            return self.runners.commands(step, ctx)
        rollback = self.runners.rollback
        describe = getattr(rollback, "rollback_commands", None)
        if describe is None or step.service is None:
            return [f"# roll {step.service} back to {self.targets.get(step.service or '')}"]
        return list(describe(step.service, ctx, self.targets[step.service]))


class Executor:
    """Runs plans with a runner set; see the module docstring for the semantics."""

    def __init__(
        self,
        runners: RunnerSet,
        *,
        parallel: int = 4,
        auto_rollback: bool = True,
        subscribers: Iterable[Subscriber] = (),
        subscriber_timeout: float = 30.0,
        drain_timeout: float = 30.0,
        recorder: Subscriber | None = None,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.runners = runners
        self.parallel = parallel
        self.auto_rollback = auto_rollback
        self.subscribers = list(subscribers)
        self.subscriber_timeout = subscriber_timeout
        self.drain_timeout = drain_timeout
        # awaited for every event (not a best-effort subscriber): the record must not lag
        self.recorder = recorder

    def dry_run(self, plan: Plan, ctx: Context) -> list[tuple[str, list[str]]]:
        """Each step (wave order) with the exact command lines it would run."""
        by_id = plan.by_id()
        return [
            (sid, self.runners.commands(by_id[sid], ctx)) for wave in plan.waves for sid in wave
        ]

    async def execute(self, plan: Plan, ctx: Context) -> ExecutionResult:
        """Run every step of the plan; returns when all are final."""
        run = _Run(self, plan, ctx, DeploymentKind.DEPLOY, self.runners.runner_for)
        return await run.go(self.auto_rollback)

    def rollback_plan(
        self, services: Iterable[str], ctx: Context, targets: Mapping[str, str]
    ) -> Plan:
        """An explicit rollback as a plan: per service, activate its target, then verify."""
        steps: dict[str, Step] = {}
        for service in sorted(set(services)):
            phase = Phase.NIX_CORE if ctx.manifest.is_core(service) else Phase.NIX_SERVICE_CONFIG
            activate = Step(
                id=step_id(phase, service),
                phase=phase,
                service=service,
                reasons=[f"roll back to {targets[service]}"],
            )
            verify = Step(
                id=step_id(Phase.VERIFY, service),
                phase=Phase.VERIFY,
                service=service,
                needs=[activate.id],
                reasons=[f"re-verify {service} after its rollback"],
            )
            steps[activate.id], steps[verify.id] = activate, verify
        return finalize(steps, base=ctx.plan.base, head=ctx.plan.head, note="rollback")

    async def rollback_services(
        self, services: Iterable[str], ctx: Context, targets: Mapping[str, str]
    ) -> ExecutionResult:
        """Activate each service's recorded system (`targets`: service -> system path) and
        re-verify it; a rollback is a deployment of kind `rollback`."""
        services = list(services)
        missing = [service for service in services if service not in targets]
        if missing:
            raise ValueError(f"no system to roll back to for: {', '.join(sorted(missing))}")
        plan = self.rollback_plan(services, ctx, targets)
        runner = _RollbackRunner(self.runners, targets)
        run = _Run(self, plan, ctx, DeploymentKind.ROLLBACK, lambda step: runner)
        return await run.go(auto_rollback=False)

    def rollback_dry_run(
        self, services: Iterable[str], ctx: Context, targets: Mapping[str, str]
    ) -> list[tuple[str, list[str]]]:
        plan = self.rollback_plan(services, ctx, targets)
        runner = _RollbackRunner(self.runners, targets)
        by_id = plan.by_id()
        return [(sid, runner.commands(by_id[sid], ctx)) for wave in plan.waves for sid in wave]


class _Run:
    """The state of one execution."""

    def __init__(
        self,
        executor: Executor,
        plan: Plan,
        ctx: Context,
        kind: DeploymentKind,
        runner_for: Callable[[Step], Runner],
    ) -> None:
        self.executor = executor
        self.runners = executor.runners
        self.plan = plan
        self.ctx = ctx
        self.kind = kind
        self.runner_for = runner_for
        self.by_id = plan.by_id()
        self.outcomes = {step.id: StepOutcome(step) for step in plan.steps}
        self.graph = plan.graph()
        self.bus = EventBus(executor.subscribers, timeout=executor.subscriber_timeout)
        self.rollbacks: dict[str, StepResult] = {}
        self.redeployed = {
            step.service for step in plan.steps if step.phase in NIX_PHASES and step.service
        }
        # dependents failing at once must not roll the same upstream service back twice
        self.upstream_lock = asyncio.Lock()
        self.auto_rollback = True
        self.unrecorded: RecordingFailed | None = None
        self.stopping = False  # cancelled or unrecordable: recording is best effort from here

    async def emit(self, event: Event) -> None:
        """Record the event (awaited), then hand it to the notifiers."""
        await self._record(event)
        self.bus.publish(event)

    async def _record(self, event: Event) -> None:
        recorder = self.executor.recorder
        if recorder is None or self.unrecorded is not None:
            return
        try:
            await recorder(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.stopping:
                log.exception("could not record %s while stopping", event)
                return
            log.exception("could not record %s; stopping the deployment", event)
            self.unrecorded = RecordingFailed(
                NOT_RECORDED.format(event=type(event).__name__, error=exc)
            )
            raise self.unrecorded from exc

    async def go(self, auto_rollback: bool) -> ExecutionResult:
        self.auto_rollback = auto_rollback
        started = utcnow()
        self.bus.start()
        try:
            await self.emit(DeploymentStarted(self.ctx.deployment_id, self.plan, self.kind))
            builders = self._start_builds()
            try:
                await self._schedule()
            finally:
                for builder in builders:
                    await builder.finish_builds(self.ctx)
        except (asyncio.CancelledError, RecordingFailed):
            self.stopping = True
            await self._interrupt()
            await self._finish(started, drain=False)
            raise
        return await self._finish(started)

    def _start_builds(self) -> list[Prebuilding]:
        """Builds start with the deployment (deploys only: a rollback builds nothing)."""
        if self.kind is not DeploymentKind.DEPLOY:
            return []
        builders: list[Prebuilding] = []
        for runner in {id(r): r for r in self.runners.by_phase.values()}.values():
            if isinstance(runner, Prebuilding):
                runner.start_builds(self.plan, self.ctx)
                builders.append(runner)
        return builders

    async def _finish(self, started: datetime, *, drain: bool = True) -> ExecutionResult:
        state = overall_state(self.outcomes.values())
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome.state.value] = counts.get(outcome.state.value, 0) + 1
        try:
            await self.emit(DeploymentFinished(self.ctx.deployment_id, state, {"steps": counts}))
        finally:
            await self.bus.close(self.executor.drain_timeout if drain else 1.0)
        return ExecutionResult(
            self.ctx.deployment_id,
            self.kind,
            state,
            self.outcomes,
            started,
            utcnow(),
            self.rollbacks,
        )

    async def _interrupt(self) -> None:
        now = utcnow()
        for outcome in self.outcomes.values():
            if outcome.state in (StepState.PENDING, StepState.RUNNING):
                outcome.state, outcome.reason = StepState.INTERRUPTED, INTERRUPTED
                outcome.finished_at = now
                await self.emit(
                    StepFinished(
                        self.ctx.deployment_id, outcome.step, outcome.state, None, INTERRUPTED
                    )
                )

    async def _schedule(self) -> None:
        priority = remaining_path(self.plan, self.runners.estimate, self.graph)
        order = {sid: index for index, sid in enumerate(sid for w in self.plan.waves for sid in w)}
        waiting = {
            sid: {need for need in step.needs if need in self.by_id}
            for sid, step in self.by_id.items()
        }
        ready: list[tuple[float, int, str]] = []
        for sid, needs in waiting.items():
            if not needs:
                heapq.heappush(ready, (-priority[sid], order.get(sid, 0), sid))
        # finished steps report here: O(1) per completion, however many steps run at once
        done: asyncio.Queue[tuple[str, StepState]] = asyncio.Queue()
        running: dict[str, asyncio.Task[None]] = {}

        async def run(step: Step) -> None:
            state = StepState.FAILED
            try:
                state = await self._run_step(step)
            except RecordingFailed:
                pass  # kept in self.unrecorded; the loop below stops the execution
            finally:
                done.put_nowait((step.id, state))

        try:
            while ready or running:
                while ready and len(running) < self.executor.parallel:
                    _, _, sid = heapq.heappop(ready)
                    if self.outcomes[sid].state is StepState.PENDING:
                        running[sid] = asyncio.create_task(run(self.by_id[sid]))
                if not running:
                    break
                finished = [await done.get()]
                while not done.empty():
                    finished.append(done.get_nowait())
                if self.unrecorded is not None:
                    raise self.unrecorded
                for sid, state in finished:
                    running.pop(sid, None)
                    if state is not StepState.SUCCEEDED:
                        await self._skip_dependents(sid)
                        continue
                    for dependent in self.graph.successors(sid):
                        waiting[dependent].discard(sid)
                        if not waiting[dependent]:
                            item = (-priority[dependent], order.get(dependent, 0), dependent)
                            heapq.heappush(ready, item)
        finally:
            for task in running.values():
                task.cancel()
            if running:
                await asyncio.gather(*running.values(), return_exceptions=True)

    async def _skip_dependents(self, sid: str) -> None:
        state = self.outcomes[sid].state
        reason = SKIP_REASON.format(step=sid, state=state.value.replace("_", " "))
        for dependent in nx.lexicographical_topological_sort(
            self.graph.subgraph(nx.descendants(self.graph, sid))
        ):
            outcome = self.outcomes[dependent]
            if outcome.state is not StepState.PENDING:
                continue
            outcome.state, outcome.reason, outcome.finished_at = StepState.SKIPPED, reason, utcnow()
            await self.emit(
                StepFinished(self.ctx.deployment_id, outcome.step, StepState.SKIPPED, None, reason)
            )

    async def _run_step(self, step: Step) -> StepState:
        outcome = self.outcomes[step.id]
        outcome.state, outcome.attempt, outcome.started_at = StepState.RUNNING, 1, utcnow()
        await self.emit(StepStarted(self.ctx.deployment_id, step, outcome.attempt))
        result = await self._call(lambda: self.runner_for(step), step)
        if result.output:
            await self.emit(StepOutput(self.ctx.deployment_id, step.id, result.output))
        state, reason = (StepState.SUCCEEDED, None) if result.ok else (StepState.FAILED, None)
        if isinstance(result, BuildFailed):
            # the build failed before the host was touched: there is nothing to roll back
            previous = result.previous_system or "its recorded system"
            note = UNCHANGED.format(service=step.service, system=previous)
            reason = WITH_NOTE.format(failure=_last_line(result.output) or step.id, note=note)
        elif not result.ok:
            reason = _last_line(result.output) or f"{step.id} failed"
            if self._should_roll_back(step):
                state, note = await self._roll_back(step)
                if state is StepState.FAILED:
                    reason = WITH_NOTE.format(failure=reason, note=note)
                else:
                    reason = note
        outcome.state, outcome.result, outcome.reason = state, result, reason
        outcome.finished_at = utcnow()
        await self.emit(StepFinished(self.ctx.deployment_id, step, state, result, reason))
        return state

    async def _call(self, runner: Callable[[], Runner], step: Step) -> StepResult:
        """Run one step; an exception in a runner (or no runner for its phase) is that step's
        failure, never the executor's."""
        try:
            result = await runner().run(step, self.ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("runner failed on %s", step.id)
            result = StepResult(False, RUNNER_CRASHED.format(error=exc))
        return self.runners.redact(result)

    def _should_roll_back(self, step: Step) -> bool:
        return (
            self.auto_rollback
            and step.phase in ROLLBACK_PHASES
            and step.service is not None
            and self.runners.rollback is not None
        )

    async def _roll_back(self, step: Step) -> tuple[StepState, str]:
        """Roll the step's service back to its recorded system and re-verify it; a verify of a
        service this deployment did not redeploy rolls back what it did redeploy upstream."""
        service = step.service or ""
        if step.phase is Phase.VERIFY and service not in self.redeployed:
            upstream = self._redeployed_upstream(step)
            if upstream:
                return await self._roll_back_upstream(step, upstream)
        target = self.ctx.previous_systems.get(service)
        if target is None:
            return StepState.FAILED, NO_PREVIOUS_SYSTEM.format(service=service)
        result = await self._activate_previous(service, step)
        if not result.ok:
            detail = _last_line(result.output) or "no output"
            return StepState.FAILED, ROLLBACK_FAILED.format(service=service, detail=detail)
        if result.previous_system == target:
            # the runner read the host before rolling back: it still ran the recorded system,
            # so the step failed before activation (a build error) and changed nothing
            return StepState.FAILED, UNCHANGED.format(service=service, system=target)
        check = await self._reverify(service, step)
        if not check.ok:
            detail = _last_line(check.output) or "no output"
            return StepState.FAILED, REVERIFY_FAILED.format(
                service=service, system=target, detail=detail
            )
        return StepState.ROLLED_BACK, ROLLBACK_REASON.format(
            service=service, system=target, step=step.id
        )

    def _redeployed_upstream(self, step: Step) -> list[str]:
        """Services upstream of the step (plan order) whose nix step ran in this deployment
        and recorded the system they ran before."""
        nix_ancestors = [
            self.by_id[sid]
            for sid in nx.ancestors(self.graph, step.id)
            if sid in self.by_id and self.by_id[sid].phase in NIX_PHASES
        ]
        services: list[str] = []
        for sid in nx.lexicographical_topological_sort(
            self.graph.subgraph(ancestor.id for ancestor in nix_ancestors)
        ):
            service = self.by_id[sid].service
            if (
                service
                and service in self.ctx.previous_systems
                and self.outcomes[sid].state is StepState.SUCCEEDED
                and service not in services
            ):
                services.append(service)
        return services

    async def _roll_back_upstream(self, step: Step, upstream: list[str]) -> tuple[StepState, str]:
        """Roll back the redeployed services the step's service depends on (dependents first),
        re-verify them (dependencies first), then re-verify the step's own service."""
        async with self.upstream_lock:
            for service in reversed(upstream):
                if service in self.rollbacks and self.rollbacks[service].ok:
                    continue  # another failing dependent already rolled it back
                result = await self._activate_previous(service, step)
                if not result.ok:
                    detail = _last_line(result.output) or "no output"
                    return StepState.FAILED, ROLLBACK_FAILED.format(service=service, detail=detail)
            for service in upstream:
                check = await self._reverify(service, step)
                if not check.ok:
                    detail = _last_line(check.output) or "no output"
                    return StepState.FAILED, REVERIFY_FAILED.format(
                        service=service, system=self.ctx.previous_systems[service], detail=detail
                    )
        rolled_back = ", ".join(
            UPSTREAM_ROLLED_BACK.format(service=service, system=self.ctx.previous_systems[service])
            for service in upstream
        )
        check = await self._reverify(step.service or "", step)
        if not check.ok:
            detail = _last_line(check.output) or "no output"
            return StepState.FAILED, UPSTREAM_STILL_FAILING.format(
                rolled_back=rolled_back, step=step.id, detail=detail
            )
        return StepState.ROLLED_BACK, UPSTREAM_REASON.format(rolled_back=rolled_back, step=step.id)

    async def _activate_previous(self, service: str, step: Step) -> StepResult:
        """Activate the service's recorded system, between RollbackStarted and RollbackFinished."""
        deployment = self.ctx.deployment_id
        await self.emit(RollbackStarted(deployment, service, step.id))
        rollback = self.runners.rollback
        assert rollback is not None  # checked by _should_roll_back
        try:
            result = self.runners.redact(await rollback.rollback(service, self.ctx))
        except Exception as exc:
            log.exception("rollback of %s failed", service)
            result = StepResult(False, RUNNER_CRASHED.format(error=exc))
        self.rollbacks[service] = result
        await self.emit(RollbackFinished(deployment, service, result.ok, result))
        return result

    async def _reverify(self, service: str, step: Step) -> StepResult:
        """Run the service's verify again; its output is attributed to the failing step."""
        verify = self.by_id.get(step_id(Phase.VERIFY, service)) or Step(
            id=step_id(Phase.VERIFY, service), phase=Phase.VERIFY, service=service
        )
        check = await self._call(lambda: self.runners.verify, verify)
        if check.output:
            await self.emit(StepOutput(self.ctx.deployment_id, step.id, check.output))
        return check


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""

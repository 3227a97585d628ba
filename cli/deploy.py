"""`nixmox deploy`, `rollback`, `status`, `history` and `unlock`: execution from the command line."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from bot.config import Settings, load_settings
from planner.findings import ManifestError
from planner.plan import Plan, UnknownService, plan_full
from planner.render import render_text, summary
from planner.source import EvalLimits, PlanningError, load_manifest
from runners.base import (
    DeploymentFinished,
    DeploymentKind,
    DeploymentState,
    Event,
    RollbackFinished,
    RollbackStarted,
    StepFinished,
    StepStarted,
    StepState,
    Trigger,
)
from runners.config import RunnerConfig
from runners.deploy import (
    DeployError,
    DeploymentRefused,
    RollbackPlan,
    check_health,
    plan_for_deploy,
    prepare_rollback,
    preview_deployment,
    run_deployment,
    run_rollback,
)
from runners.registry import RunnerKind
from state.base import StoreError
from state.deployments import DeploymentRecord
from state.store import Store

EXIT_OK, EXIT_FAILED, EXIT_EVAL, EXIT_REFUSED = 0, 1, 2, 3
DEFAULT_LOCK_LEASE = 60.0
SHORT_REV = 12
STATUS_TITLE = "NixMox Service Status"
NOTHING_TO_DO = "No deployment needed"
STATE_MARKS = {
    StepState.SUCCEEDED: "✓",
    StepState.FAILED: "✗",
    StepState.SKIPPED: "-",
    StepState.ROLLED_BACK: "↺",
    StepState.INTERRUPTED: "!",
}

T = TypeVar("T")


def run_async(func: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Click callbacks are synchronous: run the coroutine to completion."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return asyncio.run(func(*args, **kwargs))

    return wrapper


# --- shared options ----------------------------------------------------------------------------


def store_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--database-url",
        help="State store URL (default NIXMOX_DATABASE_URL, else sqlite under .nixmox/).",
    )(func)
    func = click.option(
        "--config",
        "config_file",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="NIXMOX_CONFIG",
        help="TOML file with settings and a [runners] table.",
    )(func)
    return func


def runner_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--runner",
            type=click.Choice([kind.value for kind in RunnerKind]),
            help="real (terraform, nixos, ssh) or simulate (sleeps; for trying things out).",
        ),
        click.option(
            "--simulate-fail",
            multiple=True,
            metavar="STEP_ID",
            help="With --runner simulate: make this step fail (repeatable).",
        ),
        click.option(
            "--simulate-duration",
            multiple=True,
            metavar="PHASE=SECONDS",
            help="With --runner simulate: how long a phase takes (repeatable).",
        ),
        click.option(
            "--simulate-scale",
            type=float,
            help="With --runner simulate: multiply every duration (0.01: 100× faster).",
        ),
        click.option("--parallel", type=click.IntRange(min=1), help="Steps run at once."),
        click.option(
            "--lock-wait",
            type=float,
            default=0.0,
            show_default=True,
            help="Seconds to wait for services locked by another deployment.",
        ),
        click.option(
            "--lock-lease",
            type=float,
            default=DEFAULT_LOCK_LEASE,
            show_default=True,
            envvar="NIXMOX_LOCK_LEASE",
            help="Seconds a lock outlives a crashed deployment (renewed while it runs).",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Show every step's output."),
        click.option("--json", "as_json", is_flag=True, help="Print the final record as JSON."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def settings_for(config_file: Path | None, database_url: str | None) -> Settings:
    overrides: dict[str, Any] = {}
    if database_url:
        overrides["database_url"] = database_url
    try:
        return load_settings(config_file, **overrides)
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None


def runner_config_for(
    config_file: Path | None,
    fail: tuple[str, ...] = (),
    durations: tuple[str, ...] = (),
    scale: float | None = None,
) -> RunnerConfig:
    """The `[runners]` table of the config file, with the simulate options applied."""
    try:
        config = RunnerConfig.from_toml(config_file) if config_file else RunnerConfig()
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"{config_file}: {exc}") from None
    simulate = config.simulate
    simulate.fail = [*simulate.fail, *fail]
    for item in durations:
        phase, sep, seconds = item.partition("=")
        try:
            simulate.durations[phase.strip()] = float(seconds)
        except ValueError:
            sep = ""
        if not sep:
            raise click.BadParameter(
                f"{item!r}: expected PHASE=SECONDS", param_hint="--simulate-duration"
            )
    if scale is not None:
        simulate.scale = scale
    return config


async def open_store(settings: Settings, err: TextIO | None = None) -> Store:
    """Open the store and report deployments a dead process left running."""
    try:
        store = await Store.open(settings.database_url)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # a server that is down, a file we cannot write
        url = settings.database_url.split("@")[-1]
        raise click.ClickException(f"cannot open the state store ({url}): {exc}") from None
    for record in await store.deployments.recover_interrupted():
        click.echo(f"warning: deployment {record.id} was interrupted: {record.note}", err=True)
    return store


def whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


# --- live progress -----------------------------------------------------------------------------


class PlainProgress:
    """One line per transition, for logs and pipes."""

    def __init__(self, out: TextIO, verbose: bool = False) -> None:
        self.out = out
        self.verbose = verbose

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def __call__(self, event: Event) -> None:
        stamp = event.at.astimezone().strftime("%H:%M:%S")
        if isinstance(event, StepStarted):
            self.line(f"{stamp} {event.step.id}: started")
        elif isinstance(event, StepFinished):
            reason = f" ({event.reason})" if event.reason else ""
            self.line(f"{stamp} {event.step.id}: {event.state.value}{reason}")
            if self.verbose and event.result is not None and event.result.output:
                for text in event.result.output.rstrip().splitlines():
                    self.line(f"    {text}")
        elif isinstance(event, RollbackStarted):
            self.line(f"{stamp} {event.service}: rolling back after {event.cause} failed")
        elif isinstance(event, RollbackFinished):
            self.line(f"{stamp} {event.service}: rollback {'done' if event.ok else 'FAILED'}")
        elif isinstance(event, DeploymentFinished):
            self.line(f"{stamp} deployment {event.deployment_id}: {event.state.value}")

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class LiveProgress:
    """A rich progress display with one line per step, on a terminal."""

    def __init__(self, out: TextIO, plan: Plan, verbose: bool = False) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(file=out)
        self.verbose = verbose
        self.progress = Progress(
            SpinnerColumn(finished_text=" "),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.overall = self.progress.add_task(f"0/{len(plan.steps)} steps", total=len(plan.steps))
        self.tasks: dict[str, Any] = {}

    def _task(self, sid: str) -> Any:
        if sid not in self.tasks:
            self.tasks[sid] = self.progress.add_task(f"{sid}: waiting", total=1, start=False)
        return self.tasks[sid]

    async def __call__(self, event: Event) -> None:
        if isinstance(event, StepStarted):
            task = self._task(event.step.id)
            self.progress.start_task(task)
            self.progress.update(task, description=f"{event.step.id}: running")
        elif isinstance(event, StepFinished):
            task = self._task(event.step.id)
            mark = STATE_MARKS.get(event.state, "?")
            reason = f" ({event.reason})" if event.reason else ""
            self.progress.update(
                task,
                description=f"{mark} {event.step.id}: {event.state.value}{reason}",
                completed=1,
            )
            self.progress.stop_task(task)
            self.progress.advance(self.overall)
            done = sum(1 for t in self.progress.tasks if t.id != self.overall and t.finished)
            self.progress.update(self.overall, description=f"{done}/{len(self.tasks)} steps")
            if self.verbose and event.result is not None and event.result.output:
                self.progress.console.print(event.result.output.rstrip(), markup=False)
        elif isinstance(event, RollbackStarted):
            self.progress.console.print(f"↺ rolling {event.service} back ({event.cause} failed)")

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def progress_for(plan: Plan, as_json: bool, verbose: bool) -> PlainProgress | LiveProgress:
    """Live display on a terminal; plain lines otherwise (on stderr when stdout is JSON)."""
    out = sys.stderr if as_json else sys.stdout
    if out.isatty():
        return LiveProgress(out, plan, verbose)
    return PlainProgress(out, verbose)


# --- output ------------------------------------------------------------------------------------


def short(rev: str | None) -> str:
    """A commit id's first 12 characters; a manifest digest keeps its `sha256:` prefix."""
    if not rev:
        return "-"
    prefix = "sha256:" if rev.startswith("sha256:") else ""
    return prefix + rev[len(prefix) : len(prefix) + SHORT_REV]


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def duration(record: DeploymentRecord) -> str:
    if record.started_at and record.finished_at:
        return f"{(record.finished_at - record.started_at).total_seconds():.1f}s"
    return "-"


def step_counts(record: DeploymentRecord) -> str:
    counts: dict[str, int] = {}
    for step in record.steps:
        counts[step.state.value] = counts.get(step.state.value, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no steps"


def print_result(record: DeploymentRecord, as_json: bool, verbose: bool) -> None:
    if as_json:
        click.echo(json.dumps(record.to_json(), indent=2))
        return
    click.echo(
        f"{record.kind.value} {record.id} {record.state.value}: {step_counts(record)} "
        f"({duration(record)})"
    )
    if record.note:
        click.echo(f"  {record.note}")
    for step in record.steps:
        if step.state is not StepState.SUCCEEDED:
            reason = f": {step.reason}" if step.reason else ""
            click.echo(f"  {step.id} {step.state.value}{reason}")
            if not verbose and step.state is StepState.FAILED and step.output:
                for text in step.output.rstrip().splitlines()[-5:]:
                    click.echo(f"      {text}")


def exit_code(record: DeploymentRecord) -> int:
    return EXIT_OK if record.state is DeploymentState.SUCCEEDED else EXIT_FAILED


def nothing_to_do(plan: Plan, kind: DeploymentKind, as_json: bool) -> None:
    note = summary(plan)
    if as_json:
        body = {"id": None, "kind": kind.value, "state": "succeeded", "steps": [], "note": note}
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo(note)


def print_preview(preview: list[tuple[str, list[str]]], as_json: bool) -> None:
    if as_json:
        steps = [{"id": sid, "commands": commands} for sid, commands in preview]
        click.echo(json.dumps({"dry_run": True, "steps": steps}, indent=2))
        return
    click.echo("dry run: nothing is changed; these steps would run:")
    for sid, commands in preview:
        click.echo(f"{sid}:")
        for command in commands:
            click.echo(f"    {command}")


# --- deploy ------------------------------------------------------------------------------------


async def guarded(coro: Awaitable[T]) -> T:
    """Turn the expected failures into clear messages and exit codes, never stack traces."""
    try:
        return await coro
    except DeploymentRefused as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    except ManifestError as exc:
        for finding in exc.findings:
            click.echo(f"error: {finding.render()}", err=True)
        sys.exit(EXIT_EVAL if exc.evaluation_failed else EXIT_FAILED)
    except PlanningError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_EVAL)
    except UnknownService as exc:
        raise click.BadParameter(str(exc), param_hint="--service") from None
    except DeployError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)


@click.command()
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False), help="Git repository.")
@click.option("--ref", help="Revision to deploy from --repo (default HEAD).")
@click.option("--manifest", "manifest_path", help="Manifest path inside --repo.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory a PATH deploy runs its tools in (default: the manifest's directory).",
)
@click.option("--service", help="Deploy only this service and what it needs.")
@click.option("--dry-run", is_flag=True, help="Print what would run, with exact commands.")
@click.option(
    "--preview",
    is_flag=True,
    help="With --dry-run: build the hosts' systems and show what changes on them.",
)
@click.option("--no-auto-rollback", is_flag=True, help="Do not roll back a failing service.")
@runner_options
@store_options
@click.option("--eval-timeout", type=float, default=30.0, show_default=True)
@run_async
async def deploy(
    path: Path | None,
    repo: Path | None,
    ref: str | None,
    manifest_path: str | None,
    workdir: Path | None,
    service: str | None,
    dry_run: bool,
    preview: bool,
    no_auto_rollback: bool,
    runner: str | None,
    simulate_fail: tuple[str, ...],
    simulate_duration: tuple[str, ...],
    simulate_scale: float | None,
    parallel: int | None,
    lock_wait: float,
    lock_lease: float,
    verbose: bool,
    as_json: bool,
    database_url: str | None,
    config_file: Path | None,
    eval_timeout: float,
) -> None:
    """Deploy a manifest file (PATH) or a Git revision (--repo DIR --ref REF).

    With --repo, the plan starts from the last revision deployed successfully, so deploying
    the same revision twice has nothing to do. Exit 0 succeeded (or nothing to do), 1 failed,
    rolled back or interrupted, 2 the manifest could not be evaluated, 3 refused (locked).
    """
    if path is not None and (repo is not None or ref is not None):
        raise click.UsageError("give either a manifest PATH or --repo/--ref, not both")
    if path is None and repo is None and ref is None:
        raise click.UsageError("give a manifest PATH, or --repo DIR [--ref REF]")
    if preview and not dry_run:
        raise click.UsageError("--preview goes with --dry-run")
    settings = settings_for(config_file, database_url)
    config = runner_config_for(config_file, simulate_fail, simulate_duration, simulate_scale)
    limits = EvalLimits(timeout=eval_timeout)
    store = await open_store(settings)
    try:
        if path is not None:
            manifest = await guarded(asyncio.to_thread(load_manifest, path, None, limits))
            try:
                plan = plan_full(manifest, service=service)
            except UnknownService as exc:
                raise click.BadParameter(str(exc), param_hint="--service") from None
            source: dict[str, Any] = {"workdir": workdir or path.resolve().parent}
        else:
            repo_dir = repo or Path(".")
            plan = await guarded(
                plan_for_deploy(
                    store,
                    repo_dir,
                    ref or "HEAD",
                    service=service,
                    manifest_path=manifest_path or settings.manifest_path,
                    limits=limits,
                )
            )
            manifest = None
            source = {
                "repo_dir": repo_dir,
                "manifest_path": manifest_path or settings.manifest_path,
            }
        if not plan.ok:
            if not as_json:
                click.echo(render_text(plan))
            for finding in plan.errors:
                click.echo(f"error: {finding.render()}", err=True)
            sys.exit(EXIT_FAILED)
        if not plan.steps:
            nothing_to_do(plan, DeploymentKind.DEPLOY, as_json)
            return
        kind = RunnerKind(runner or settings.runner)
        if dry_run:
            if manifest is None:
                manifest = await guarded(_manifest_at(source, plan, limits))
            where = source.get("workdir") or source["repo_dir"]
            if preview:
                from cli.previews import print_host_previews

                await guarded(
                    print_host_previews(plan, manifest, source, config, config_file, as_json)
                )
                return
            steps = await preview_deployment(
                plan,
                manifest=manifest,
                workdir=where,
                revision=plan.head,
                runner_kind=kind,
                runner_config=config,
            )
            print_preview(steps, as_json)
            return
        if not as_json:
            click.echo(summary(plan))
        with progress_for(plan, as_json, verbose) as progress:
            record = await guarded(
                run_deployment(
                    store,
                    plan,
                    manifest=manifest,
                    kind=DeploymentKind.DEPLOY,
                    trigger=Trigger.CLI,
                    requested_by=whoami(),
                    scope=service,
                    runner_kind=kind,
                    runner_config=config,
                    parallel=parallel or settings.parallel,
                    auto_rollback=settings.auto_rollback and not no_auto_rollback,
                    subscribers=[progress],
                    lock_lease=timedelta(seconds=lock_lease),
                    lock_wait=lock_wait,
                    work_root=settings.workdir / "work",
                    **source,
                )
            )
    finally:
        await store.close()
    assert record is not None  # the plan has steps
    print_result(record, as_json, verbose)
    sys.exit(exit_code(record))


async def _manifest_at(source: dict[str, Any], plan: Plan, limits: EvalLimits) -> Any:
    from planner.source import load_manifest_at

    return await asyncio.to_thread(
        load_manifest_at, source["repo_dir"], plan.head, source["manifest_path"], limits=limits
    )


# --- rollback ----------------------------------------------------------------------------------


@click.command()
@click.argument("service", required=False)
@click.option(
    "--to",
    "to",
    metavar="DEPLOYMENT_ID|REF",
    help="The systems a deployment installed, or a Git revision to deploy (needs --repo).",
)
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False), help="Git repository.")
@click.option("--manifest", "manifest_path", help="Manifest path inside --repo.")
@click.option("--dry-run", is_flag=True, help="Print what the rollback would do.")
@runner_options
@store_options
@run_async
async def rollback(
    service: str | None,
    to: str | None,
    repo: Path | None,
    manifest_path: str | None,
    dry_run: bool,
    runner: str | None,
    simulate_fail: tuple[str, ...],
    simulate_duration: tuple[str, ...],
    simulate_scale: float | None,
    parallel: int | None,
    lock_wait: float,
    lock_lease: float,
    verbose: bool,
    as_json: bool,
    database_url: str | None,
    config_file: Path | None,
) -> None:
    """Roll back: by default each service of the last deployment (or SERVICE) to the system it
    ran before it; --to DEPLOYMENT_ID restores the systems that deployment installed; --to REF
    deploys that revision. Recorded as a deployment of kind rollback."""
    settings = settings_for(config_file, database_url)
    config = runner_config_for(config_file, simulate_fail, simulate_duration, simulate_scale)
    manifest_path = manifest_path or settings.manifest_path
    store = await open_store(settings)
    try:
        prepared: RollbackPlan = await guarded(
            prepare_rollback(
                store,
                service=service,
                to=to,
                repo_dir=repo or (Path(".") if to else None),
                manifest_path=manifest_path,
            )
        )
        if not prepared.plan.ok:
            for finding in prepared.plan.errors:
                click.echo(f"error: {finding.render()}", err=True)
            sys.exit(EXIT_FAILED)
        if not prepared.plan.steps:
            nothing_to_do(prepared.plan, DeploymentKind.ROLLBACK, as_json)
            return
        kind = RunnerKind(runner or settings.runner)
        if dry_run:
            preview = await preview_deployment(
                prepared.plan, manifest=prepared.manifest, runner_kind=kind, runner_config=config
            )
            if not as_json:
                click.echo(f"rollback: {prepared.description}")
            print_preview(preview, as_json)
            return
        click.echo(f"rollback: {prepared.description}", err=as_json)
        with progress_for(prepared.plan, as_json, verbose) as progress:
            record = await guarded(
                run_rollback(
                    store,
                    prepared,
                    trigger=Trigger.CLI,
                    requested_by=whoami(),
                    manifest_path=manifest_path,
                    runner_kind=kind,
                    runner_config=config,
                    parallel=parallel or settings.parallel,
                    subscribers=[progress],
                    lock_lease=timedelta(seconds=lock_lease),
                    lock_wait=lock_wait,
                    work_root=settings.workdir / "work",
                )
            )
    finally:
        await store.close()
    assert record is not None
    print_result(record, as_json, verbose)
    sys.exit(exit_code(record))


# --- status, history, unlock -------------------------------------------------------------------


@click.command()
@click.option("--check", is_flag=True, help="Run every service's health checks now.")
@click.option("--runner", type=click.Choice([kind.value for kind in RunnerKind]))
@click.option("--json", "as_json", is_flag=True)
@store_options
@run_async
async def status(
    check: bool,
    runner: str | None,
    as_json: bool,
    database_url: str | None,
    config_file: Path | None,
) -> None:
    """The NixMox Service Status: last deployment, and per service its deployed revision,
    system and health (--check runs the health checks live)."""
    settings = settings_for(config_file, database_url)
    store = await open_store(settings)
    try:
        last = await store.deployments.last(finished=False)
        checked: dict[str, tuple[bool, str]] = {}
        if check:
            manifest = last.manifest if last is not None else None
            if manifest is None:
                raise click.ClickException("no deployment recorded: nothing to check")
            checked = await check_health(
                store,
                manifest,
                sorted(manifest.enabled()),
                runner_kind=RunnerKind(runner or settings.runner),
                runner_config=runner_config_for(config_file),
                parallel=settings.parallel,
            )
        services = await store.services.all()
        locks = {lock.service: lock for lock in await store.locks.all()}
    finally:
        await store.close()
    if as_json:
        body = {
            "last_deployment": last.to_detail() if last is not None else None,
            "services": [record.to_json() for record in services.values()],
            "locks": [lock.to_json() for lock in locks.values()],
            "checked": {
                name: {"healthy": ok, "detail": detail} for name, (ok, detail) in checked.items()
            },
        }
        click.echo(json.dumps(body, indent=2))
    else:
        print_status(last, services, locks, checked)
    if check and not all(ok for ok, _ in checked.values()):
        sys.exit(EXIT_FAILED)


def format_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Plain aligned columns: readable on a terminal, in a log and in a pipe alike."""
    columns = zip(headers, *rows, strict=True)
    widths = [max(len(cell) for cell in column) for column in columns]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def print_status(
    last: DeploymentRecord | None,
    services: dict[str, Any],
    locks: dict[str, Any],
    checked: dict[str, tuple[bool, str]],
) -> None:
    click.echo(STATUS_TITLE)
    if last is None:
        click.echo("No deployment recorded yet.")
    else:
        by = f" by {last.requested_by}" if last.requested_by else ""
        click.echo(
            f"Last deployment: {last.id} {last.kind.value} {last.state.value} "
            f"({last.trigger}{by}) at {when(last.started_at or last.created_at)}, "
            f"revision {short(last.head)}"
        )
        click.echo(f"  plan: {summary(last.plan)}; steps: {step_counts(last)}")
        if last.note:
            click.echo(f"  {last.note}")
    names = sorted(set(services) | set(checked))
    if not names:
        return
    rows: list[tuple[str, ...]] = []
    for name in names:
        record = services.get(name)
        health = record.last_health if record is not None and record.last_health else "unknown"
        if name in checked:
            ok, detail = checked[name]
            health = ("healthy" if ok else f"unhealthy: {detail}") + " (checked now)"
        lock = locks.get(name)
        rows.append(
            (
                name,
                short(record.revision if record else None),
                health,
                (record.system_path or "-") if record else "-",
                (record.last_deployment_id or "-") if record else "-",
                lock.holder if lock else "",
            )
        )
    headers = ("SERVICE", "REVISION", "HEALTH", "SYSTEM", "DEPLOYMENT", "LOCKED BY")
    click.echo(format_table(headers, rows))


@click.command()
@click.argument("service", required=False)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@store_options
@run_async
async def history(
    service: str | None,
    limit: int,
    as_json: bool,
    database_url: str | None,
    config_file: Path | None,
) -> None:
    """Past deployments and rollbacks, newest first (only those touching SERVICE if given)."""
    settings = settings_for(config_file, database_url)
    store = await open_store(settings)
    try:
        records = await store.deployments.history(service, limit=limit)
    finally:
        await store.close()
    if as_json:
        click.echo(json.dumps([record.to_detail() for record in records], indent=2))
        return
    if not records:
        click.echo("No deployments recorded" + (f" for {service}." if service else "."))
        return
    headers = ("ID", "KIND", "STATE", "TRIGGER", "BY", "REVISION", "STARTED", "TOOK", "STEPS")
    rows = [
        (
            record.id,
            record.kind.value,
            record.state.value,
            record.trigger,
            record.requested_by or "-",
            short(record.head),
            when(record.started_at or record.created_at),
            duration(record),
            step_counts(record),
        )
        for record in records
    ]
    click.echo(format_table(headers, rows))


@click.command()
@click.argument("service")
@click.option(
    "--force",
    is_flag=True,
    help="Also remove a running deployment's lock (another deployment may then start).",
)
@store_options
@run_async
async def unlock(
    service: str, force: bool, database_url: str | None, config_file: Path | None
) -> None:
    """Remove the lock on SERVICE (a manual lock, or one a crashed deployment left behind)."""
    settings = settings_for(config_file, database_url)
    store = await open_store(settings)
    try:
        held = {lock.service: lock for lock in await store.locks.all()}.get(service)
        result = await store.locks.unlock(service, force=force)
        if result.removed:
            holder = held.holder if held else "an expired holder"
            await store.audit.record(
                whoami(), "unlock", {"service": service, "holder": holder, "force": force}
            )
    finally:
        await store.close()
    if result.deployment_lock is not None:
        click.echo(
            f"{service} is locked by running {result.deployment_lock.holder}; it will be "
            "released when that deployment ends (--force removes it anyway)",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    if not result.removed:
        click.echo(f"{service} is not locked", err=True)
        sys.exit(EXIT_FAILED)
    click.echo(f"unlocked {service} (was held by {held.holder if held else 'an expired lease'})")


COMMANDS = (deploy, rollback, status, history, unlock)

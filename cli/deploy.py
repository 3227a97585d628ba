"""`nixmox deploy`, `rollback`, `status`, `history` and `unlock`: execution from the command line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import click

from cli.dry_run import dry_run_json, echo_dry_run_steps
from cli.options import (
    EXIT_EVAL,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    RunnerFlags,
    T,
    cli_requester,
    execution_for,
    open_store,
    run_async,
    runner_options,
    settings_for,
    store_options,
)
from cli.progress import progress_for
from cli.status import history, status, unlock
from deployments import (
    DeployError,
    DeploymentRefused,
    DirectorySource,
    ExecutionOptions,
    GitSource,
    RollbackPlan,
    Source,
    plan_for_deploy,
    prepare_rollback,
    preview_deployment,
    start_deployment,
    start_rollback,
)
from deployments.views import (
    step_counts,
    took,
)
from planner.findings import ManifestError
from planner.models import Manifest
from planner.plan import Plan, UnknownService, plan_full
from planner.render import render_text, summary
from planner.source import EvalLimits, PlanningError, load_manifest, load_manifest_at
from state.deployments import DeploymentRecord
from state.events import DeploymentKind, DeploymentState, StepState
from state.store import Store

NOTHING_TO_DO = "No deployment needed"
BOTH_SOURCES = "give either a manifest PATH or --repo/--ref, not both"
NO_SOURCE = "give a manifest PATH, or --repo DIR [--ref REF]"


# --- output ------------------------------------------------------------------------------------


def print_result(record: DeploymentRecord, as_json: bool, verbose: bool) -> None:
    if as_json:
        click.echo(json.dumps(record.to_json(), indent=2))
        return
    click.echo(
        f"{record.kind.value} {record.id} {record.state.value}: {step_counts(record)} "
        f"({took(record)})"
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


def finish(record: DeploymentRecord | None, as_json: bool, verbose: bool) -> NoReturn:
    """Print the final record and exit with its code."""
    assert record is not None  # the plan has steps
    print_result(record, as_json, verbose)
    sys.exit(exit_code(record))


def nothing_to_do(plan: Plan, kind: DeploymentKind, as_json: bool) -> None:
    note = summary(plan)
    if as_json:
        body: dict[str, object] = {
            "id": None,
            "kind": kind.value,
            "state": "succeeded",
            "steps": [],
            "note": note,
        }
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo(note)


def print_preview(preview: list[tuple[str, list[str]]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(dry_run_json(preview), indent=2))
        return
    echo_dry_run_steps(preview)


def refuse_invalid(plan: Plan, show_plan: bool) -> None:
    """Exit 1 with the plan's errors when it carries any."""
    if plan.ok:
        return
    if show_plan:
        click.echo(render_text(plan))
    for finding in plan.errors:
        click.echo(f"error: {finding.render()}", err=True)
    sys.exit(EXIT_FAILED)


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


@dataclass(frozen=True)
class Target:
    """What `nixmox deploy` deploys: a plan, where its files come from, and (for a manifest
    file) the manifest already loaded."""

    plan: Plan
    source: Source
    manifest: Manifest | None = None


async def file_target(
    path: Path, workdir: Path | None, service: str | None, limits: EvalLimits
) -> Target:
    """A manifest file, deployed from its directory (or `--workdir`)."""
    manifest = await guarded(asyncio.to_thread(load_manifest, path, None, limits))
    try:
        plan = plan_full(manifest, service=service)
    except UnknownService as exc:
        raise click.BadParameter(str(exc), param_hint="--service") from None
    return Target(plan, DirectorySource(workdir or path.resolve().parent), manifest)


async def repo_target(
    store: Store,
    repo: Path | None,
    ref: str | None,
    manifest_path: str,
    service: str | None,
    limits: EvalLimits,
) -> Target:
    """A Git revision, planned from the base revision (`deployments.base`)."""
    repo_dir = repo or Path(".")
    plan = await guarded(
        plan_for_deploy(
            store,
            repo_dir,
            ref or "HEAD",
            service=service,
            manifest_path=manifest_path,
            limits=limits,
        )
    )
    return Target(plan, GitSource(repo_dir, manifest_path=manifest_path))


async def target_manifest(target: Target, limits: EvalLimits) -> Manifest:
    """The manifest a target deploys (loaded from its revision for a Git source)."""
    if target.manifest is not None:
        return target.manifest
    source = target.source
    assert isinstance(source, GitSource) and target.plan.head is not None
    return await guarded(
        asyncio.to_thread(
            load_manifest_at, source.repo_dir, target.plan.head, source.manifest_path, limits=limits
        )
    )


async def show_preview(
    target: Target, options: ExecutionOptions, limits: EvalLimits, as_json: bool
) -> None:
    source = target.source
    workdir = source.repo_dir if isinstance(source, GitSource) else source.directory
    preview = await preview_deployment(
        target.plan,
        manifest=await target_manifest(target, limits),
        options=options,
        workdir=workdir,
        revision=target.plan.head,
    )
    print_preview(preview, as_json)


async def run_target(
    store: Store,
    target: Target,
    options: ExecutionOptions,
    service: str | None,
    as_json: bool,
    verbose: bool,
) -> DeploymentRecord | None:
    if not as_json:
        click.echo(summary(target.plan))
    with progress_for(target.plan, as_json, verbose) as progress:
        return await guarded(
            start_deployment(
                store,
                target.plan,
                target.source,
                requester=cli_requester(),
                options=options,
                scope=service,
                manifest=target.manifest,
                subscribers=[progress],
            )
        )


PREVIEW_NEEDS_DRY_RUN = "--preview goes with --dry-run"


def check_deploy_args(path: Path | None, repo: Path | None, ref: str | None) -> None:
    if path is not None and (repo is not None or ref is not None):
        raise click.UsageError(BOTH_SOURCES)
    if path is None and repo is None and ref is None:
        raise click.UsageError(NO_SOURCE)


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
    flags: RunnerFlags,
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
    check_deploy_args(path, repo, ref)
    if preview and not dry_run:
        raise click.UsageError(PREVIEW_NEEDS_DRY_RUN)
    settings = settings_for(config_file, database_url)
    options = execution_for(settings, config_file, flags, auto_rollback=not no_auto_rollback)
    limits = EvalLimits(timeout=eval_timeout)
    store = await open_store(settings)
    try:
        if path is not None:
            target = await file_target(path, workdir, service, limits)
        else:
            where = manifest_path or settings.manifest_path
            target = await repo_target(store, repo, ref, where, service, limits)
        refuse_invalid(target.plan, show_plan=not as_json)
        if not target.plan.steps:
            nothing_to_do(target.plan, DeploymentKind.DEPLOY, as_json)
            return
        if dry_run:
            if preview:
                from cli.previews import print_host_previews

                manifest = await target_manifest(target, limits)
                await guarded(
                    print_host_previews(
                        target.plan, target.source, manifest, options, config_file, as_json
                    )
                )
                return
            await show_preview(target, options, limits, as_json)
            return
        record = await run_target(store, target, options, service, as_json, verbose)
    finally:
        await store.close()
    finish(record, as_json, verbose)


# --- rollback ----------------------------------------------------------------------------------


async def preview_rollback(
    prepared: RollbackPlan, options: ExecutionOptions, as_json: bool
) -> None:
    preview = await preview_deployment(prepared.plan, manifest=prepared.manifest, options=options)
    if not as_json:
        click.echo(f"rollback: {prepared.description}")
    print_preview(preview, as_json)


async def run_prepared(
    store: Store,
    prepared: RollbackPlan,
    options: ExecutionOptions,
    manifest_path: str,
    as_json: bool,
    verbose: bool,
) -> DeploymentRecord | None:
    click.echo(f"rollback: {prepared.description}", err=as_json)
    with progress_for(prepared.plan, as_json, verbose) as progress:
        return await guarded(
            start_rollback(
                store,
                prepared,
                requester=cli_requester(),
                options=options,
                manifest_path=manifest_path,
                subscribers=[progress],
            )
        )


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
    flags: RunnerFlags,
    verbose: bool,
    as_json: bool,
    database_url: str | None,
    config_file: Path | None,
) -> None:
    """Roll back: by default each service of the last deployment (or SERVICE) to the system it
    ran before it; --to DEPLOYMENT_ID restores the systems that deployment installed; --to REF
    deploys that revision. Recorded as a deployment of kind rollback."""
    settings = settings_for(config_file, database_url)
    options = execution_for(settings, config_file, flags)
    where = manifest_path or settings.manifest_path
    store = await open_store(settings)
    try:
        prepared: RollbackPlan = await guarded(
            prepare_rollback(
                store,
                service=service,
                to=to,
                repo_dir=repo or (Path(".") if to else None),
                manifest_path=where,
            )
        )
        refuse_invalid(prepared.plan, show_plan=False)
        if not prepared.plan.steps:
            nothing_to_do(prepared.plan, DeploymentKind.ROLLBACK, as_json)
            return
        if dry_run:
            await preview_rollback(prepared, options, as_json)
            return
        record = await run_prepared(store, prepared, options, where, as_json, verbose)
    finally:
        await store.close()
    finish(record, as_json, verbose)


COMMANDS = (deploy, rollback, status, history, unlock)

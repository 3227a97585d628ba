"""`nixmox health`: run every deployed service's health checks now, print the seed's section."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cli.options import open_store, run_async, runner_config_for, settings_for, store_options
from planner.findings import ManifestError
from planner.models import Manifest
from planner.source import EvalLimits, PlanningError, load_manifest, load_manifest_at
from runners.registry import RunnerKind, build_runners
from state.store import Store

if TYPE_CHECKING:
    from deployments.health import Checked

EXIT_OK, EXIT_UNHEALTHY, EXIT_ERROR = 0, 1, 2
TITLE = "Service Health:"
NO_MANIFEST = "no deployment recorded yet: give a manifest PATH or --repo DIR [--ref REF] to check"
UNKNOWN = "{service} is not an enabled service of the manifest (services: {known})"
NO_CHECKS_NOTE = "no health checks defined (interface.health): {names}"
MANIFEST_SUFFIXES = (".nix", ".json")


def split_arguments(args: tuple[str, ...]) -> tuple[str | None, Path | None]:
    """SERVICE and PATH in either order: a manifest file (`.nix`/`.json`) is the PATH."""
    service: str | None = None
    path: Path | None = None
    for arg in args:
        if arg.endswith(MANIFEST_SUFFIXES) or Path(arg).is_file():
            if path is not None:
                raise click.UsageError("give at most one manifest PATH")
            path = Path(arg)
        elif service is None:
            service = arg
        else:
            raise click.UsageError("give at most one SERVICE")
    return service, path


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


async def manifest_for(
    store: Store, path: Path | None, repo: Path | None, ref: str | None, manifest_path: str
) -> Manifest:
    """The manifest of PATH, of --repo/--ref, else of the last deployment."""
    from deployments.health import deployed_manifest

    limits = EvalLimits()
    try:
        if path is not None:
            return await asyncio.to_thread(load_manifest, path, None, limits)
        if repo is not None or ref is not None:
            return await asyncio.to_thread(
                load_manifest_at, repo or Path("."), ref or "HEAD", manifest_path, limits=limits
            )
    except ManifestError as exc:
        for finding in exc.findings:
            click.echo(f"error: {finding.render()}", err=True)
        sys.exit(EXIT_ERROR)
    except PlanningError as exc:
        fail(str(exc))
    found = await deployed_manifest(store)
    if found is None:
        fail(NO_MANIFEST)
    assert found is not None
    return found


def summary_line(checked: Checked) -> str:
    """`✓ name`, or `✗ name  (kind: command failed: last output line)`."""
    result = checked.result
    if result.healthy:
        return f"✓ {result.service}"
    from deployments.health import shorten

    what = f"{result.check}: {shorten(checked.command)}" if checked.command else result.check
    return f"✗ {result.service}  ({what} failed: {checked.last_line})"


@click.command()
@click.argument("args", nargs=-1, metavar="[SERVICE] [PATH]")
@click.option("--repo", type=click.Path(path_type=Path, file_okay=False), help="Git repository.")
@click.option("--ref", help="Revision of --repo whose manifest to check (default HEAD).")
@click.option("--manifest", "manifest_path", help="Manifest path inside --repo.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@store_options
@run_async
async def health(
    args: tuple[str, ...],
    repo: Path | None,
    ref: str | None,
    manifest_path: str | None,
    as_json: bool,
    database_url: str | None,
    config_file: Path | None,
) -> None:
    """Run each deployed service's startup then liveness check now (or only SERVICE's).

    The services are those of the last deployed manifest, of the manifest PATH, or of
    --repo/--ref. Exit 0 when every check passes, 1 when one fails, 2 when nothing can be checked.
    """
    from deployments.health import checked_services, record_checks, run_health_checks

    service, path = split_arguments(args)
    if path is not None and (repo is not None or ref is not None):
        raise click.UsageError("give either a manifest PATH or --repo/--ref, not both")
    settings = settings_for(config_file, database_url)
    config = runner_config_for(config_file)
    store = await open_store(settings)
    try:
        manifest = await manifest_for(
            store, path, repo, ref, manifest_path or settings.manifest_path
        )
        enabled = sorted(manifest.enabled())
        if service is not None and service not in enabled:
            fail(UNKNOWN.format(service=service, known=", ".join(enabled) or "none"))
        names = checked_services(manifest, service)
        runners = build_runners(RunnerKind.REAL, config)  # real checks, whatever the runner
        try:
            results = await run_health_checks(manifest, names, runners, parallel=settings.parallel)
        finally:
            await runners.close()
        await record_checks(store, [checked.result for checked in results.values()])
    finally:
        await store.close()
    unchecked = [name for name in ([service] if service else enabled) if name not in names]
    if as_json:
        body = {"services": {name: c.result.to_json() for name, c in results.items()}}
        click.echo(json.dumps(body, indent=2))
    else:
        click.echo(TITLE)
        for checked in results.values():
            click.echo(summary_line(checked))
    if unchecked:
        click.echo(NO_CHECKS_NOTE.format(names=", ".join(unchecked)), err=True)
    healthy = all(checked.result.healthy for checked in results.values())
    sys.exit(EXIT_OK if healthy else EXIT_UNHEALTHY)

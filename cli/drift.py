"""`nixmox drift`: what differs from the last deployment (hosts, default branch, terraform)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from cli.options import open_store, run_async, runner_config_for, settings_for, store_options

EXIT_CLEAN, EXIT_DRIFTED = 0, 1
TITLE = "Drift:"
NO_DEPLOYMENT = "no deployment recorded yet: there is nothing to compare the hosts with"
NOTHING = "No drift: every host runs what was deployed, and nothing is pending."
NO_NIXOS_RUNNER = "the real runners have no nixos runner to read the hosts' systems with"


def report_lines(report: Any) -> list[str]:
    """The text report: one line per finding, then the notes."""
    from deployments.drift import IN_SYNC

    lines: list[str] = []
    for service, found in sorted(report.services.items()):
        for item in found:
            lines.append(
                f"✗ {service}: system {item.actual} is running, {item.expected} was deployed"
            )
    if report.pending is not None:
        lines.append(
            f"✗ pending: {report.pending.revision[:12]} on the default branch is not deployed "
            f"({report.pending.steps} step(s) to deploy it)"
        )
    for root, state in sorted(report.terraform.items()):
        if state.status == IN_SYNC:
            lines.append(f"✓ {root}: in sync")
            continue
        lines.append(f"✗ {root}: {state.status}")
        lines += [f"    {change}" for change in state.changes]
    return lines


@click.command()
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False),
    help="The manifest repository: its HEAD is the default branch (pending, terraform).",
)
@click.option("--ref", default="HEAD", show_default=True, help="The default branch (--repo).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@store_options
@run_async
async def drift(
    repo: Path | None,
    ref: str,
    as_json: bool,
    database_url: str | None,
    config_file: Path | None,
) -> None:
    """Report drift: hosts running another system than deployed, undeployed commits on the
    default branch (--repo), terraform changes in the global roots. Exit 0 none, 1 drifted."""
    from deployments.drift import detect_drift
    from deployments.health import deployed_manifest
    from planner.source import PlanningError
    from runners.nixos import NixosRunner
    from runners.registry import RunnerKind, build_runners

    settings = settings_for(config_file, database_url)
    config = runner_config_for(config_file)
    store = await open_store(settings)
    runners = build_runners(RunnerKind.REAL, config)
    try:
        nixos = runners.rollback
        if not isinstance(nixos, NixosRunner):  # the real runners always roll back with nixos
            click.echo(f"error: {NO_NIXOS_RUNNER}", err=True)
            sys.exit(2)
        manifest = await deployed_manifest(store)
        report = await detect_drift(
            store,
            manifest,
            config,
            nixos,
            runners.redactor,
            repo_dir=repo,
            head=ref,
            manifest_path=settings.manifest_path,
        )
    except PlanningError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    finally:
        await runners.close()
        await store.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(TITLE)
        lines = report_lines(report)
        click.echo("\n".join(lines) if report.drifted else "\n".join([*lines, NOTHING]))
    if manifest is None:
        report.notes.append(NO_DEPLOYMENT)
    for note in report.notes:
        click.echo(f"note: {note}", err=True)
    sys.exit(EXIT_DRIFTED if report.drifted else EXIT_CLEAN)

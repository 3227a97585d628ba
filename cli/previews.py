"""`nixmox deploy --dry-run --preview`: the commands a deployment would run, then what it
changes on each host (built, not guessed)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.dry_run import dry_run_json, echo_dry_run_steps
from deployments import ExecutionOptions, GitSource, Source, preview_deployment
from planner.models import Manifest
from planner.plan import Plan
from planner.preview import preview_json
from planner.render_preview import text_host_previews
from runners.config import PreviewConfig, RunnerConfig
from runners.preview import preview_plan, preview_revision


async def print_host_previews(
    plan: Plan,
    source: Source,
    manifest: Manifest,
    options: ExecutionOptions,
    config_file: Path | None,
    as_json: bool,
) -> None:
    """`deploy --dry-run --preview`: the commands, then what changes on each host."""
    try:
        previewing = PreviewConfig.from_toml(config_file) if config_file else PreviewConfig()
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"{config_file}: {exc}") from None
    config = options.runner_config or RunnerConfig()
    if isinstance(source, GitSource):
        plan, previews = await preview_revision(
            plan, source.repo_dir, source.manifest_path, config, previewing
        )
        workdir = source.repo_dir
    else:
        workdir = source.directory
        plan, previews = await preview_plan(plan, manifest, workdir, None, config, previewing)
    steps = await preview_deployment(
        plan, manifest=manifest, options=options, workdir=workdir, revision=plan.head
    )
    if as_json:
        click.echo(json.dumps({**dry_run_json(steps), "preview": preview_json(previews)}, indent=2))
        return
    echo_dry_run_steps(steps)
    for line in text_host_previews(previews):
        click.echo(line)

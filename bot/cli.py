"""The `nixmox` command line: one group, one module per concern adds its commands."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from planner.findings import ManifestError, attribute
from planner.plan import Plan, UnknownService, plan_full
from planner.render import render_json, render_text
from planner.source import EvalLimits, load_manifest

EXIT_OK, EXIT_INVALID, EXIT_EVAL = 0, 1, 2
FORMATS = ("text", "json", "markdown")


@click.group()
@click.version_option(package_name="nixmox")
def main() -> None:
    """NixMox bot: plan, deploy and roll back a NixMox homelab from Git and chat."""


def _eval_options(func):  # type: ignore[no-untyped-def]
    func = click.option(
        "--eval-timeout",
        type=float,
        default=30.0,
        show_default=True,
        help="Seconds before Nix evaluation is stopped.",
    )(func)
    return func


def load_or_exit(path: Path, eval_timeout: float) -> object:
    """Load a manifest; on failure print the findings and exit 1 (invalid) or 2 (evaluation)."""
    try:
        return load_manifest(path, limits=EvalLimits(timeout=eval_timeout))
    except ManifestError as exc:
        for finding in exc.findings:
            click.echo(f"error: {finding.render()}", err=True)
        sys.exit(EXIT_EVAL if exc.evaluation_failed else EXIT_INVALID)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@_eval_options
def validate(path: Path, eval_timeout: float) -> None:
    """Check a manifest: exit 0 valid, 1 invalid, 2 could not evaluate."""
    manifest = load_or_exit(path, eval_timeout)
    plan = plan_full(manifest)  # type: ignore[arg-type]
    attribute([*plan.errors, *plan.warnings], path.name)
    for finding in plan.errors:
        click.echo(f"error: {finding.render()}", err=True)
    for finding in plan.warnings:
        click.echo(f"warning: {finding.render()}", err=True)
    if plan.errors:
        sys.exit(EXIT_INVALID)
    click.echo(f"{path}: valid ({len(plan.services())} services planned)", err=True)


def emit_plan(plan: Plan, fmt: str) -> None:
    """Print a plan in the asked format; exit 1 when it carries validation errors."""
    if fmt == "json":
        click.echo(render_json(plan))
    elif fmt == "markdown":
        from planner.render import render_markdown  # type: ignore[attr-defined]

        click.echo("\n".join(render_markdown(plan)))
    elif fmt == "slack":
        import json

        from planner.render import render_slack  # type: ignore[attr-defined]

        click.echo(json.dumps(render_slack(plan), indent=2))
    else:
        click.echo(render_text(plan))
    if not plan.ok:
        for finding in plan.errors:
            click.echo(f"error: {finding.render()}", err=True)
        sys.exit(EXIT_INVALID)


@main.command()
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--service", help="Plan only this service and everything it needs.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@_eval_options
def plan(path: Path | None, service: str | None, fmt: str, eval_timeout: float) -> None:
    """Print the deployment plan of a manifest file."""
    if path is None:
        raise click.UsageError("give a manifest PATH")
    manifest = load_or_exit(path, eval_timeout)
    try:
        result = plan_full(manifest, service=service)  # type: ignore[arg-type]
    except UnknownService as exc:
        raise click.BadParameter(str(exc), param_hint="--service") from None
    attribute([*result.errors, *result.warnings], path.name)
    emit_plan(result, fmt)


if __name__ == "__main__":
    main()

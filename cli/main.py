"""The `nixmox` command line: the group, the planning commands, and the others loaded lazily."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.manifest import EXIT_EVAL, EXIT_INVALID, eval_options, load_or_exit
from planner.findings import attribute
from planner.perf import gc_paused
from planner.plan import Plan, UnknownService, plan_full
from planner.source import DEFAULT_MANIFEST_PATH, EvalLimits, PlanningError, locate

if TYPE_CHECKING:
    from planner.models import Manifest
    from planner.preview import HostPreview
    from runners.config import PreviewConfig, RunnerConfig

FORMATS = ("text", "json", "markdown", "slack")


class LazyGroup(click.Group):
    """A group whose other commands are imported only when they run (or `--help` lists them)."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module_name, _, attr = self.lazy[cmd_name].partition(":")
            command: click.Command = getattr(importlib.import_module(module_name), attr)
            return command
        return super().get_command(ctx, cmd_name)


LAZY_COMMANDS = {
    "deploy": "cli.deploy:deploy",
    "rollback": "cli.deploy:rollback",
    "status": "cli.deploy:status",
    "history": "cli.deploy:history",
    "unlock": "cli.deploy:unlock",
    "serve": "cli.serve:serve",
    "worker": "cli.serve:worker",
    "render": "cli.render:render",
    "health": "cli.health:health",
    "drift": "cli.drift:drift",
}


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS)
@click.version_option(package_name="nixmox")
def main() -> None:
    """NixMox bot: plan, deploy and roll back a NixMox homelab from Git and chat."""


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@eval_options
def validate(path: Path, eval_timeout: float) -> None:
    """Check a manifest: exit 0 valid, 1 invalid, 2 could not evaluate."""
    manifest = load_or_exit(path, eval_timeout)
    plan = plan_full(manifest)
    located(plan, path, eval_timeout)
    for finding in plan.errors:
        click.echo(f"error: {finding.render()}", err=True)
    for finding in plan.warnings:
        click.echo(f"warning: {finding.render()}", err=True)
    if plan.errors:
        sys.exit(EXIT_INVALID)
    click.echo(f"{path}: valid ({len(plan.services())} services planned)", err=True)


def located(plan: Plan, path: Path, eval_timeout: float) -> None:
    """Name the file, and where known the line and column, of every finding."""
    findings = [*plan.errors, *plan.warnings]
    locate(findings, path, limits=EvalLimits(timeout=eval_timeout))
    attribute(findings, path.name)


def emit_plan(plan: Plan, fmt: str, previews: Mapping[str, HostPreview] | None = None) -> None:
    """Print a plan in the asked format; exit 1 when it carries validation errors."""
    from planner.render import render_json, render_markdown, render_slack, render_text

    if fmt == "json" and previews is not None:
        from planner.preview import preview_json

        click.echo(json.dumps({**plan.to_json(), "preview": preview_json(previews)}, indent=2))
    elif fmt == "json":
        click.echo(render_json(plan))
    elif fmt == "markdown":
        click.echo("\n\n".join(render_markdown(plan, previews=previews)))
    elif fmt == "slack":
        click.echo(json.dumps(render_slack(plan), indent=2))
    else:
        click.echo(render_text(plan, previews))
    if not plan.ok:
        for finding in plan.errors:
            click.echo(f"error: {finding.render()}", err=True)
        sys.exit(EXIT_INVALID)


def emit_file_explanation(plan: Plan, fmt: str) -> None:
    """Print `--explain-files` in the asked format; exit 1 when the plan carries errors."""
    from planner.render import md_changed_files
    from planner.render_files import explain_json, explain_text

    if not plan.ok:
        emit_plan(plan, fmt)  # the errors, and exit 1
    elif fmt == "json":
        click.echo(explain_json(plan))
    elif fmt == "markdown":
        click.echo("\n\n".join(md_changed_files(plan)) or "_No changed files._")
    else:
        click.echo(explain_text(plan))


@main.command()
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False),
    help="Plan from this Git repository's revisions instead of a manifest PATH.",
)
@click.option("--base", help="Base revision (--repo): plan only what base..head changes.")
@click.option("--head", default="HEAD", show_default=True, help="Head revision (--repo).")
@click.option(
    "--manifest",
    "manifest_path",
    default=DEFAULT_MANIFEST_PATH,
    show_default=True,
    help="The manifest's path inside the repository (--repo).",
)
@click.option("--service", help="Plan only this service and everything it needs.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@click.option(
    "--explain-files",
    is_flag=True,
    help="With --repo and --base: each changed file, the steps it selected and why (or why none).",
)
@click.option(
    "--preview",
    is_flag=True,
    help="Build the hosts' systems and show what changes on them (packages, units, reboot).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="NIXMOX_CONFIG",
    help="TOML file of `deploy` ([runners] transport and nixos, [preview]), for --preview.",
)
@eval_options
def plan(
    path: Path | None,
    repo: Path | None,
    base: str | None,
    head: str,
    manifest_path: str,
    service: str | None,
    fmt: str,
    explain_files: bool,
    preview: bool,
    config_file: Path | None,
    eval_timeout: float,
) -> None:
    """Print the deployment plan of a manifest file, or of a Git change (--repo, --base)."""
    if explain_files and (repo is None or base is None or fmt == "slack"):
        raise click.UsageError(
            "--explain-files needs --repo and --base, and text, json or markdown"
        )
    if preview and (explain_files or fmt == "slack"):
        raise click.UsageError("--preview goes with text, json or markdown, not --explain-files")
    if repo is not None:
        if path is not None:
            raise click.UsageError("give either a manifest PATH or --repo, not both")
        result = plan_repo(repo, base, head, manifest_path, service, eval_timeout)
        if preview and result.ok and result.head is not None:
            completed, previews = preview_repo(result, repo, manifest_path, config_file)
            emit_plan(completed, fmt, previews)
            return
        (emit_file_explanation if explain_files else emit_plan)(result, fmt)
        return
    if path is None:
        raise click.UsageError("give a manifest PATH, or --repo DIR [--base REF] [--head REF]")
    if base is not None:
        raise click.UsageError("--base needs --repo")
    manifest = load_or_exit(path, eval_timeout)
    try:
        with gc_paused():  # large manifests: see planner.perf
            result = plan_full(manifest, service=service)
    except UnknownService as exc:
        raise click.BadParameter(str(exc), param_hint="--service") from None
    located(result, path, eval_timeout)
    if preview and result.ok:
        completed, previews = preview_path(result, manifest, path, config_file)
        emit_plan(completed, fmt, previews)
        return
    emit_plan(result, fmt)


def preview_configs(config_file: Path | None) -> tuple[RunnerConfig, PreviewConfig]:
    """The `[runners]` and `[preview]` tables of the config file (defaults without one)."""
    from runners.config import PreviewConfig, RunnerConfig

    if config_file is None:
        return RunnerConfig(), PreviewConfig()
    try:
        return RunnerConfig.from_toml(config_file), PreviewConfig.from_toml(config_file)
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"{config_file}: {exc}") from None


def preview_repo(
    plan: Plan, repo: Path, manifest_path: str, config_file: Path | None
) -> tuple[Plan, dict[str, HostPreview]]:
    """The plan of a revision completed from its hosts' builds, and their previews."""
    import asyncio

    from runners.preview import preview_revision

    runner_config, preview_config = preview_configs(config_file)
    try:
        return asyncio.run(
            preview_revision(plan, repo, manifest_path, runner_config, preview_config)
        )
    except PlanningError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_EVAL)


def preview_path(
    plan: Plan, manifest: Manifest, path: Path, config_file: Path | None
) -> tuple[Plan, dict[str, HostPreview]]:
    """Previews of a manifest file's plan, built from the manifest's directory."""
    import asyncio

    from runners.preview import preview_plan

    runner_config, preview_config = preview_configs(config_file)
    workdir = path.resolve().parent
    return asyncio.run(preview_plan(plan, manifest, workdir, None, runner_config, preview_config))


def plan_repo(
    repo: Path, base: str | None, head: str, manifest_path: str, service: str | None, timeout: float
) -> Plan:
    """Plan base..head of a repository; the bot's own failures exit 2 with the reason."""
    from planner.revisions import plan_revisions  # Git (gitpython) only for --repo

    try:
        return plan_revisions(
            repo,
            base,
            head,
            manifest_path=manifest_path,
            service=service,
            limits=EvalLimits(timeout=timeout),
        )
    except UnknownService as exc:
        raise click.BadParameter(str(exc), param_hint="--service") from None
    except PlanningError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_EVAL)


# commands that, given a manifest file, leave nothing behind to clean up: no temporary Git
# exports, no builds, no process pools or connections
FILE_ONLY_COMMANDS = frozenset({"validate", "plan"})
NOT_FILE_ONLY_OPTIONS = ("--repo", "--preview", "--config", "--help")


def run() -> None:
    """The `nixmox` console script: `main`, and a quick exit after a file-only command.

    Python's teardown (freeing every module and object) is a sixth of a `validate`; after a
    command that holds no temporary files, pools or connections it frees nothing that the exit
    itself does not, so the output is flushed and the process ends at once, as mypy does.
    """
    quick = is_file_only(sys.argv[1:])
    try:
        main()
    except SystemExit as done:
        if not quick or not (done.code is None or isinstance(done.code, int)):
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(done.code or 0)


def is_file_only(args: list[str]) -> bool:
    """Whether the command line is `validate` or `plan` of a manifest file."""
    return (
        bool(args)
        and args[0] in FILE_ONLY_COMMANDS
        and not any(arg.startswith(NOT_FILE_ONLY_OPTIONS) for arg in args[1:])
    )


if __name__ == "__main__":
    run()

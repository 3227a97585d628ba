"""`nixmox render --out DIR`: the generated files of a manifest, to read or run by hand.

- `health/<service>-health-check.sh`: startup then liveness, with the manifest's retries,
  interval and timeout (the health runner's policy);
- `terraform/<workspace>/{terraform.tfvars, init.sh, plan.sh, apply.sh, workspace.tf}` for each
  per-service terraform workspace (`nixmox-service-infra-<service>`, ...), running the
  terraform runner's command lines.
"""

from __future__ import annotations

from pathlib import Path

import click

from cli.manifest import DEFAULT_EVAL_TIMEOUT, load_or_exit
from planner.models import Manifest
from runners.config import ConfigError, RunnerConfig
from runners.health import health_check_script
from runners.paths import PathEscapeError, contained
from runners.terraform import TerraformRunner
from runners.terraform_files import rendered_workspaces

EXECUTABLE = 0o755


def render_files(manifest: Manifest, config: RunnerConfig, root: Path) -> dict[str, str]:
    """Every generated file, by path relative to the output directory."""
    files: dict[str, str] = {}
    for service in sorted(manifest.enabled()):
        files[f"health/{service}-health-check.sh"] = health_check_script(
            service, manifest, config.health
        )
    runner = TerraformRunner(config.terraform)
    for where, workspace in rendered_workspaces(runner, manifest, root).items():
        for name, text in workspace.items():
            files[f"terraform/{where}/{name}"] = text
    return files


def write_files(out: Path, files: dict[str, str]) -> None:
    """Write each file under `out`; a path leaving `out` is refused before anything is written."""
    paths = {relative: contained(out, relative) for relative in files}
    for relative, text in files.items():
        path = paths[relative]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if path.suffix == ".sh":
            path.chmod(EXECUTABLE)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write the files into (created if missing).",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Repository root the manifest's terraform module paths are relative to.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="TOML file whose [runners] table configures terraform and health defaults.",
)
@click.option("--eval-timeout", type=float, default=DEFAULT_EVAL_TIMEOUT, show_default=True)
def render(
    path: Path, out: Path, root: Path, config_file: Path | None, eval_timeout: float
) -> None:
    """Write per-service health-check scripts and terraform workspace files."""
    manifest = load_or_exit(path, eval_timeout)
    try:
        config = RunnerConfig.from_toml(config_file) if config_file else RunnerConfig()
    except ConfigError as exc:  # names the file and each unknown key
        raise click.UsageError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"{config_file}: {exc}") from None
    try:
        files = render_files(manifest, config, root.resolve())
        write_files(out, files)
    except PathEscapeError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    for relative in sorted(files):
        click.echo(out / relative)

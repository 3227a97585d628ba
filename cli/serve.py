"""`nixmox serve`: run the bot's web application (GitHub webhooks, Slack, health, metrics)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from aiohttp import web
from pydantic import ValidationError

from bot.config import ConfigError, Settings, load_configuration
from bot.roles import SQLITE_REPLICAS, Role
from runners.config import RunnerConfig
from runners.registry import RunnerKind

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_WORKER_PORT = 8081  # a worker's /healthz and /metrics, beside a web on 8080
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def startup_problems(settings: Settings) -> list[str]:
    """Configuration that must stop the bot from starting (each with how to fix it)."""
    from bot.github.comments import configured_requirements

    problems: list[str] = []
    if settings.runner not in {kind.value for kind in RunnerKind}:
        problems.append(f"NIXMOX_RUNNER must be real or simulate, not {settings.runner!r}")
    if not settings.github_enabled:
        return problems
    if (
        settings.github_webhook_secret is None
        or not settings.github_webhook_secret.get_secret_value()
    ):
        problems.append(
            "GitHub is enabled but NIXMOX_GITHUB_WEBHOOK_SECRET is not set: without it anyone "
            "could send forged webhooks. Set the same secret here and in the webhook settings."
        )
    if not settings.repo or settings.repo.count("/") != 1:
        problems.append("NIXMOX_REPO must name the manifest repository as owner/name")
    if settings.github_app_id is not None:
        if settings.github_private_key is None and settings.github_private_key_file is None:
            problems.append(
                "NIXMOX_GITHUB_APP_ID needs NIXMOX_GITHUB_PRIVATE_KEY or "
                "NIXMOX_GITHUB_PRIVATE_KEY_FILE"
            )
        elif (
            settings.github_private_key_file is not None
            and not settings.github_private_key_file.is_file()
        ):
            problems.append(f"{settings.github_private_key_file} (the App's key) does not exist")
    elif settings.github_token is None:
        problems.append(
            "GitHub needs credentials: NIXMOX_GITHUB_TOKEN, or NIXMOX_GITHUB_APP_ID with "
            "NIXMOX_GITHUB_PRIVATE_KEY(_FILE)"
        )
    try:
        configured_requirements(settings.apply_requirements)
    except ValueError as exc:
        problems.append(f"NIXMOX_APPLY_REQUIREMENTS: {exc}")
    return problems


def read_configuration(config_file: Path | None) -> tuple[Settings, RunnerConfig]:
    """Settings (environment over TOML) and the TOML's `[runners]` table, or a click error."""
    try:
        configuration = load_configuration(config_file)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    except ConfigError as exc:  # unknown keys: the message names the file and each key
        raise click.ClickException(str(exc)) from None
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise click.ClickException(f"invalid configuration: {details}") from None
    except ValueError as exc:  # TOML syntax
        raise click.ClickException(f"invalid configuration file {config_file}: {exc}") from None
    for warning in configuration.warnings:
        click.echo(f"warning: {warning}", err=True)
    return configuration.settings, configuration.runners


F = TypeVar("F", bound=Callable[..., Any])


def server_options(default_port: int) -> Callable[[F], F]:
    """The options `serve` and `worker` share (listen address, configuration, logging)."""

    def wrap(command: F) -> F:
        for option in reversed(
            [
                click.option(
                    "--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on."
                ),
                click.option(
                    "--port", default=default_port, show_default=True, type=int, help="TCP port."
                ),
                click.option(
                    "--config",
                    "config_file",
                    type=click.Path(path_type=Path, dir_okay=False),
                    envvar="NIXMOX_CONFIG",
                    help="TOML file with settings (NIXMOX_* variables win) and a [runners] table "
                    "[env: NIXMOX_CONFIG].",
                ),
                click.option(
                    "--log-level",
                    type=click.Choice(["debug", "info", "warning", "error"]),
                    default="info",
                    show_default=True,
                ),
            ]
        ):
            command = option(command)
        return command

    return wrap


@click.command()
@server_options(DEFAULT_PORT)
@click.option(
    "--role",
    type=click.Choice([role.value for role in Role]),
    default=Role.ALL.value,
    show_default=True,
    help="web: answer HTTP and queue; worker: run jobs, deployments, the monitor and the "
    "recovery sweep; all: both.",
)
def serve(host: str, port: int, config_file: Path | None, log_level: str, role: str) -> None:
    """Run the bot: GitHub webhooks, Slack, /healthz and /metrics in one web server."""
    run_server(host, port, config_file, log_level, Role(role))


@click.command()
@server_options(DEFAULT_WORKER_PORT)
def worker(host: str, port: int, config_file: Path | None, log_level: str) -> None:
    """Run jobs, deployments, the monitor and the recovery sweep (`serve --role worker`);
    only /healthz and /metrics are served."""
    run_server(host, port, config_file, log_level, Role.WORKER)


def run_server(host: str, port: int, config_file: Path | None, log_level: str, role: Role) -> None:
    """Check the configuration, then serve in `role` until stopped."""
    settings, runner_config = read_configuration(config_file)
    problems = startup_problems(settings)
    if problems:
        raise click.ClickException("cannot start:\n  " + "\n  ".join(problems))
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    if role is not Role.ALL and settings.database_url.startswith("sqlite"):
        click.echo(f"warning: {SQLITE_REPLICAS.format(role=role.value)}", err=True)
    from bot.app import build_app

    try:
        app = build_app(settings, runner_config=runner_config, role=role, plan_in_processes=True)
    except ValueError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    click.echo(f"nixmox serve ({role.value}): listening on http://{host}:{port}", err=True)
    web.run_app(app, host=host, port=port, print=None, access_log_format='%a "%r" %s %Tfs')

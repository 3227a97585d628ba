"""What every execution command shares: options, settings, the store, the runner flags."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from bot.config import Settings, load_settings
from deployments import (
    ExecutionOptions,
    Requester,
)
from runners.config import RunnerConfig
from runners.registry import RunnerKind
from state.base import StoreError
from state.events import Trigger
from state.store import Store

NOTHING_TO_CHECK = "no deployment recorded: nothing to check"

EXIT_OK, EXIT_FAILED, EXIT_EVAL, EXIT_REFUSED = 0, 1, 2, 3

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
            help="Seconds a lock outlives a crashed deployment (renewed while it runs; "
            "default NIXMOX_LOCK_LEASE, else 60).",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Show every step's output."),
        click.option("--json", "as_json", is_flag=True, help="Print the final record as JSON."),
    ]
    collected = collect_flags(func)
    for option in reversed(options):
        collected = option(collected)
    return collected


FLAG_NAMES = (
    "runner",
    "simulate_fail",
    "simulate_duration",
    "simulate_scale",
    "parallel",
    "lock_wait",
    "lock_lease",
)


def collect_flags(func: Callable[..., Any]) -> Callable[..., Any]:
    """Hand the command its runner options as one `flags: RunnerFlags`."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = RunnerFlags(**{name: kwargs.pop(name) for name in FLAG_NAMES})
        return func(*args, flags=flags, **kwargs)

    return wrapper


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


@dataclass(frozen=True)
class RunnerFlags:
    """The runner options of one command line (None: what the settings say)."""

    runner: str | None = None
    simulate_fail: tuple[str, ...] = ()
    simulate_duration: tuple[str, ...] = ()
    simulate_scale: float | None = None
    parallel: int | None = None
    lock_wait: float = 0.0
    lock_lease: float | None = None


def execution_for(
    settings: Settings,
    config_file: Path | None,
    flags: RunnerFlags,
    *,
    auto_rollback: bool = True,
) -> ExecutionOptions:
    """The settings' execution options, with the command line's flags applied."""
    config = runner_config_for(
        config_file, flags.simulate_fail, flags.simulate_duration, flags.simulate_scale
    )
    base = ExecutionOptions.from_settings(settings, config)
    lease = timedelta(seconds=flags.lock_lease) if flags.lock_lease is not None else None
    return ExecutionOptions(
        runner_kind=RunnerKind(flags.runner) if flags.runner else base.runner_kind,
        runner_config=config,
        parallel=flags.parallel or base.parallel,
        auto_rollback=base.auto_rollback and auto_rollback,
        lock_lease=lease or base.lock_lease,
        lock_wait=flags.lock_wait,
        work_root=base.work_root,
    )


def cli_requester() -> Requester:
    return Requester(Trigger.CLI, whoami())


def when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"

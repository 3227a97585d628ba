"""`nixmox status`, `history` and `unlock`: the deployment views as terminal text."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from cli.options import (
    EXIT_FAILED,
    RunnerFlags,
    execution_for,
    open_store,
    run_async,
    settings_for,
    store_options,
    when,
    whoami,
)
from deployments import (
    ExecutionOptions,
    check_health,
)
from deployments.views import (
    HISTORY_HEADERS,
    NOTHING_DEPLOYED,
    STATUS_HEADERS,
    STATUS_TITLE,
    Checked,
    HistoryView,
    StatusView,
    history_cells,
    history_view,
    last_deployment_lines,
    status_view,
)
from runners.registry import RunnerKind
from state.store import Store

NOTHING_TO_CHECK = "no deployment recorded: nothing to check"


# --- status, history, unlock -------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns: readable on a terminal, in a log and in a pipe alike."""
    columns = zip(headers, *rows, strict=True)
    widths = [max(len(cell) for cell in column) for column in columns]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]
    return "\n".join(lines)


def status_text(view: StatusView) -> str:
    """The status view as terminal text."""
    lines = [STATUS_TITLE]
    if view.last is None:
        lines.append(NOTHING_DEPLOYED)
    else:
        first, *rest = last_deployment_lines(view.last, when)
        lines += [first, *(f"  {line}" for line in rest)]
    if view.rows:
        lines.append(format_table(STATUS_HEADERS, [row.cells() for row in view.rows]))
    return "\n".join(lines)


def status_json(view: StatusView, checked: Checked) -> str:
    body = {
        "last_deployment": view.last_record.to_detail() if view.last_record is not None else None,
        "services": [record.to_json() for record in view.services.values()],
        "locks": [lock.to_json() for lock in view.locks.values()],
        "checked": {
            name: {"healthy": ok, "detail": detail} for name, (ok, detail) in checked.items()
        },
        "health": {name: check.to_json() for name, check in view.health.items()},
    }
    return json.dumps(body, indent=2)


async def check_now(store: Store, options: ExecutionOptions) -> Checked:
    """Run the health checks of every service of the last deployment's manifest."""
    last = await store.deployments.last(finished=False)
    manifest = last.manifest if last is not None else None
    if manifest is None:
        raise click.ClickException(NOTHING_TO_CHECK)
    return await check_health(store, manifest, sorted(manifest.enabled()), options=options)


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
        checked: Checked = {}
        if check:
            options = execution_for(settings, config_file, RunnerFlags(runner=runner))
            checked = await check_now(store, options)
        view = await status_view(store, checked=checked)
    finally:
        await store.close()
    click.echo(status_json(view, checked) if as_json else status_text(view))
    if check and not all(ok for ok, _ in checked.values()):
        sys.exit(EXIT_FAILED)


def history_text(view: HistoryView) -> str:
    """The history view as terminal text."""
    if view.empty_text is not None:
        return view.empty_text
    return format_table(HISTORY_HEADERS, [history_cells(row, when) for row in view.rows])


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
        view = await history_view(store, service, limit=limit)
    finally:
        await store.close()
    if as_json:
        click.echo(json.dumps([record.to_detail() for record in view.records], indent=2))
        return
    click.echo(history_text(view))


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

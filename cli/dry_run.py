"""`deploy --dry-run`: the steps a deployment would run and their commands, as text or JSON."""

from __future__ import annotations

import click

DRY_RUN_HEADER = "dry run: nothing is changed; these steps would run:"

StepCommands = list[tuple[str, list[str]]]


def dry_run_json(steps: StepCommands) -> dict[str, object]:
    """The JSON body of a dry run: each step's id and the commands it would run."""
    return {"dry_run": True, "steps": [{"id": sid, "commands": cmds} for sid, cmds in steps]}


def echo_dry_run_steps(steps: StepCommands) -> None:
    """The dry run as text: the header, then each step and its commands, indented."""
    click.echo(DRY_RUN_HEADER)
    for sid, commands in steps:
        click.echo(f"{sid}:")
        for command in commands:
            click.echo(f"    {command}")

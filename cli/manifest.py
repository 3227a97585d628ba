"""Loading a manifest for a CLI command: the evaluation options, the exit codes and messages."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from planner.models import Manifest

EXIT_OK, EXIT_INVALID, EXIT_EVAL = 0, 1, 2
DEFAULT_EVAL_TIMEOUT = 30.0

F = TypeVar("F", bound=Callable[..., Any])


def eval_options(func: F) -> F:
    """The `--eval-timeout` option of every command that evaluates a manifest."""
    option = click.option(
        "--eval-timeout",
        type=float,
        default=DEFAULT_EVAL_TIMEOUT,
        show_default=True,
        help="Seconds before Nix evaluation is stopped.",
    )
    return option(func)


def load_or_exit(path: Path, eval_timeout: float) -> Manifest:
    """Load a manifest; on failure print the findings and exit 1 (invalid) or 2 (evaluation)."""
    from planner.findings import ManifestError
    from planner.source import EvalLimits, load_manifest, locate

    limits = EvalLimits(timeout=eval_timeout)
    try:
        return load_manifest(path, limits=limits)
    except ManifestError as exc:
        if not exc.evaluation_failed:
            locate(exc.findings, path, limits=limits)  # file:line:column of each wrong type
        for finding in exc.findings:
            click.echo(f"error: {finding.render()}", err=True)
        sys.exit(EXIT_EVAL if exc.evaluation_failed else EXIT_INVALID)

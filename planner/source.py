"""Reading manifests: the planner's only I/O (Nix evaluation, JSON files, Git revisions)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from planner.findings import ManifestError, error
from planner.models import Manifest

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
DEFAULT_MEMORY_LIMIT = 2 * 1024 * 1024 * 1024
NIX_ERROR_LINES = 40


@dataclass(frozen=True)
class EvalLimits:
    """Bounds for one Nix evaluation of an untrusted manifest."""

    timeout: float = DEFAULT_TIMEOUT
    max_output: int = DEFAULT_MAX_OUTPUT
    memory_limit: int = DEFAULT_MEMORY_LIMIT


def nix_command(path: Path, include_dir: Path) -> list[str]:
    """The restricted, no-build evaluation command for a manifest."""
    return [
        "nix-instantiate",
        "--eval",
        "--strict",
        "--json",
        "--option",
        "restrict-eval",
        "true",
        "--option",
        "allow-import-from-derivation",
        "false",
        "-I",
        str(include_dir),
        str(path),
    ]


def _limit_child(limits: EvalLimits) -> None:
    """Runs in the evaluator child: bound memory and output size."""
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_limit, limits.memory_limit))
    cap = limits.max_output + 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))


def _scrubbed_env(home: str) -> dict[str, str]:
    """The evaluator sees no secrets of ours: only PATH and a throwaway HOME."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home, "NIX_PATH": ""}


def _nix_error(stderr: str, path: Path) -> str:
    """Nix's own message (with file:line:column), trimmed to something readable."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("warning: ")]
    lines = [line for line in lines if "--show-trace" not in line]
    if lines and lines[0].startswith("error: "):
        lines[0] = lines[0].removeprefix("error: ")
    if not lines:
        return f"nix-instantiate failed on {path} without a message"
    return "\n".join(lines[:NIX_ERROR_LINES])


def evaluate_nix(
    path: Path, include_dir: Path | None = None, limits: EvalLimits | None = None
) -> Any:
    """Evaluate a `.nix` manifest to JSON in restricted mode; never parse partial output."""
    limits = limits or EvalLimits()
    path = path.resolve()
    include_dir = (include_dir or path.parent).resolve()
    with tempfile.TemporaryDirectory(prefix="nixmox-eval-") as tmp:
        out_path, err_path = Path(tmp, "out.json"), Path(tmp, "err.txt")
        with out_path.open("wb") as out, err_path.open("wb") as err:
            try:
                proc = subprocess.run(
                    nix_command(path, include_dir),
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    env=_scrubbed_env(tmp),
                    cwd=tmp,
                    timeout=limits.timeout,
                    preexec_fn=lambda: _limit_child(limits),
                    check=False,
                )
            except FileNotFoundError as exc:
                raise _eval_failure(
                    "nix-instantiate is not installed",
                    "install Nix (Debian: apt-get install nix-bin) or run ./dev run",
                ) from exc
            except subprocess.TimeoutExpired as exc:
                raise _eval_failure(
                    f"evaluating {path.name} took longer than {limits.timeout:g} s",
                    "look for infinite recursion or very large generated lists",
                ) from exc
        if out_path.stat().st_size > limits.max_output:
            raise _eval_failure(
                f"evaluating {path.name} printed more than {limits.max_output} bytes",
                "a manifest should describe services, not generate huge data",
            )
        if proc.returncode != 0:
            message = _nix_error(err_path.read_text(errors="replace"), path)
            raise _eval_failure(message, "fix the Nix error above (file:line:column)")
        return json.loads(out_path.read_bytes())


def _eval_failure(message: str, hint: str) -> ManifestError:
    return ManifestError([error("evaluation", message, hint=hint)], evaluation_failed=True)


def read_manifest_data(
    path: Path, include_dir: Path | None = None, limits: EvalLimits | None = None
) -> Any:
    """Raw manifest data from a `.nix` (evaluated) or `.json` file."""
    if not path.exists():
        raise _eval_failure(f"{path} does not exist", "check the manifest path")
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise _eval_failure(
                f"{path.name}:{exc.lineno}:{exc.colno}: {exc.msg}", "fix the JSON syntax"
            ) from exc
    return evaluate_nix(path, include_dir, limits)


def parse_manifest(data: Any, file: str | None = None) -> Manifest:
    """Validate raw data against the schema; type errors become findings with their paths."""
    if not isinstance(data, dict):
        raise ManifestError(
            [
                error(
                    "not-an-attrset",
                    f"the manifest evaluates to {type(data).__name__}, not an attribute set",
                    hint="the file must evaluate to { network = ...; core_services = ...; services = ...; }",
                ).model_copy(update={"file": file})
            ]
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(
            [
                _type_finding(item, file)
                for item in exc.errors(include_url=False, include_input=False)
            ]
        ) from None


def _type_finding(item: Any, file: str | None) -> Any:
    loc = [str(part) for part in item["loc"]]
    service = loc[1] if len(loc) > 1 and loc[0] in ("services", "core_services") else None
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"])
    field = field.removeprefix(".")
    return error(
        "type",
        item["msg"],
        service=service,
        field=field,
        hint=f"give {field} a value of the right type",
    ).model_copy(update={"file": file})


def load_manifest(
    path: Path | str, include_dir: Path | None = None, limits: EvalLimits | None = None
) -> Manifest:
    """Read, evaluate and parse a manifest file."""
    path = Path(path)
    try:
        return parse_manifest(read_manifest_data(path, include_dir, limits), path.name)
    except ManifestError as exc:
        for finding in exc.findings:
            finding.file = finding.file or path.name
        raise

"""Recording shims: stand-ins for tools that cannot run here (`nixos-rebuild`, `ssh` to a
homelab host), placed earlier on PATH. Each records its argv as one JSON line and can act."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SHIM = """#!{python}
import json, os, subprocess, sys
with open({log!r}, "a") as handle:
    handle.write(json.dumps({{"tool": {name!r}, "argv": sys.argv[1:]}}) + "\\n")
{action}
sys.exit(int(os.environ.get("SHIM_EXIT_" + {name!r}.upper().replace("-", "_"), "0")))
"""

# nixos-rebuild "activates" $SHIM_NEW_SYSTEM by pointing the profile link at it
ACTIVATE = """
profile, new = os.environ.get("SHIM_PROFILE"), os.environ.get("SHIM_NEW_SYSTEM")
if profile and new and os.environ.get("SHIM_EXIT_NIXOS_REBUILD", "0") == "0":
    os.symlink(new, profile + ".tmp")
    os.replace(profile + ".tmp", profile)
"""

# nix-env -p PROFILE --set PATH: point PROFILE at PATH
SET_PROFILE = """
args = sys.argv[1:]
if "-p" in args and "--set" in args:
    profile, target = args[args.index("-p") + 1], args[args.index("--set") + 1]
    os.symlink(target, profile + ".tmp")
    os.replace(profile + ".tmp", profile)
"""

# ssh ... DEST -- COMMAND: run COMMAND here (the destination is never contacted)
RUN_REMOTE = """
args = sys.argv[1:]
command = args[args.index("--") + 1] if "--" in args else args[-1]
sys.exit(subprocess.run(["/bin/sh", "-c", command]).returncode)
"""

ACTIONS = {"nixos-rebuild": ACTIVATE, "nix-env": SET_PROFILE, "ssh": RUN_REMOTE}


def install(bin_dir: Path, log: Path, *names: str) -> None:
    """Write recording shims for `names` into bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = bin_dir / name
        text = SHIM.format(
            python=sys.executable, log=str(log), name=name, action=ACTIONS.get(name, "")
        )
        path.write_text(text)
        path.chmod(0o755)


def calls(log: Path, tool: str | None = None) -> list[list[str]]:
    """The argv of every recorded call (of one tool, when given), in order."""
    if not log.exists():
        return []
    records: list[dict[str, Any]] = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["argv"] for r in records if tool is None or r["tool"] == tool]


def fake_system(directory: Path, log: Path, label: str, *, status: str = "ok") -> Path:
    """A directory shaped like a NixOS system: `bin/switch-to-configuration` records its call."""
    (directory / "bin").mkdir(parents=True, exist_ok=True)
    script = directory / "bin" / "switch-to-configuration"
    script.write_text(f'#!/bin/sh\necho "{label} $*" >> {log}\n')
    script.chmod(0o755)
    (directory / "status").write_text(status + "\n")
    return directory

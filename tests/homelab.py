"""An emulated homelab for health and drift tests: hosts are directories on this machine.

Each host has a current-system link (`hosts/<service>/current-system`, the `[runners.nixos]`
`current_system` setting with `{service}`) and an "up" flag (`up/<service>`) that its health
commands test. The manifest lives in a real Git repository with a real terraform root made of
`terraform_data`; deployments run the real runners through the local transport (the manifest's
10.x addresses are never contacted).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import git
from click.testing import CliRunner, Result

from cli.main import main
from runners.config import RunnerConfig
from runners.terraform import TerraformRunner, backend_block

MANIFEST = "nixos/service-manifest.nix"
INFRA_ROOT = "terraform/infrastructure"
SERVICES = ("postgresql", "gitea")
MAIN_TF = """variable "label" {
  type    = string
  default = "v1"
}

resource "terraform_data" "infra" {
  input = var.label
}
"""


def manifest_text(up: Path, *, interval: float = 0, retries: int = 2, comment: str = "") -> str:
    def health(service: str) -> str:
        check = f"test -f {up / service}"
        return (
            f'interface.health = {{ startup = "{check}"; liveness = "{check}"; '
            f"retries = {retries}; interval = {interval}; timeout = 5; }};"
        )

    return f"""# {comment or "the emulated homelab"}
{{
  network = {{ domain = "lab.lan"; gateway = "10.20.0.1"; network_cidr = "10.20.0.0/24"; }};
  core_services.postgresql = {{
    ip = "10.20.0.2"; hostname = "postgresql.lab.lan"; vmid = 302;
    {health("postgresql")}
  }};
  services.gitea = {{
    ip = "10.20.0.3"; hostname = "gitea.lab.lan"; vmid = 303;
    depends_on = [ "postgresql" ];
    {health("gitea")}
  }};
}}
"""


class Homelab:
    """The hosts, the repository, the configuration file and the `nixmox` command."""

    def __init__(self, root: Path, *, interval: float = 0, retries: int = 2) -> None:
        assert shutil.which("terraform"), "terraform is not installed: these tests need it"
        assert shutil.which("nix-instantiate"), "nix-instantiate is not installed (nix-bin)"
        self.root = root
        self.up_dir = root / "up"
        self.systems = root / "systems"
        self.interval, self.retries = interval, retries
        self.up_dir.mkdir(parents=True)
        for service in SERVICES:
            self.set_up(service, True)
            initial = self.systems / f"{service}-initial"
            initial.mkdir(parents=True)
            self.link(service).parent.mkdir(parents=True)
            self.link(service).symlink_to(initial)
        self.repo_dir = root / "repo"
        self.repo = self._make_repo()
        self.config = root / "nixmox.toml"
        self.config.write_text(self.config_text())

    # --- files ---------------------------------------------------------------------------

    def link(self, service: str) -> Path:
        return self.root / "hosts" / service / "current-system"

    def running(self, service: str) -> str:
        return os.path.realpath(self.link(service))

    def set_up(self, service: str, up: bool) -> None:
        flag = self.up_dir / service
        if up:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    def config_text(self, extra: str = "") -> str:
        deploy = (
            f"mkdir -p {self.systems}/{{service}}-{{revision}} && "
            f"ln -sfn {self.systems}/{{service}}-{{revision}} {{current_system}}"
        )
        return f"""database_url = "sqlite+aiosqlite:///{self.root / "state.db"}"
workdir = "{self.root / "work"}"
runner = "real"
manifest_path = "{MANIFEST}"
{extra}
[runners.transport]
kind = "local"

[runners.nixos]
current_system = "{self.root}/hosts/{{service}}/current-system"
system_profile = "{self.root}/hosts/{{service}}/system"
deploy = [{{ run = {json.dumps(deploy)} }}]
rollback = [{{ run = "ln -sfn {{prev}} {{current_system}}", on = "host" }}]

[runners.health]
interval = 0

[runners.terraform]
state_dir = "{self.root / "tf"}"

[runners.terraform.roots]
"tf:infra" = "{INFRA_ROOT}"
"tf:auth-core" = ""
"""

    def _make_repo(self) -> git.Repo:
        made = git.Repo.init(self.repo_dir, initial_branch="main")
        with made.config_writer() as config:
            config.set_value("user", "name", "test").set_value("user", "email", "t@example.org")
        self.write(
            MANIFEST, manifest_text(self.up_dir, interval=self.interval, retries=self.retries)
        )
        self.write(f"{INFRA_ROOT}/main.tf", MAIN_TF)
        made.index.add([MANIFEST, f"{INFRA_ROOT}/main.tf"])
        made.index.commit("the homelab")
        return made

    def write(self, path: str, text: str) -> None:
        target = self.repo_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def commit_manifest_change(self, comment: str) -> str:
        """A commit on main that changes gitea's ports (a nix step and a verify to deploy)."""
        text = manifest_text(self.up_dir, interval=self.interval, retries=self.retries)
        text = text.replace(
            'depends_on = [ "postgresql" ];', 'depends_on = [ "postgresql" ]; ports = [ 3000 ];'
        )
        self.write(MANIFEST, text.replace("# the emulated homelab", f"# {comment}"))
        self.repo.index.add([MANIFEST])
        return self.repo.index.commit(comment).hexsha

    # --- commands ------------------------------------------------------------------------

    def nixmox(self, *args: str) -> Result:
        env = {name: None for name in os.environ if name.startswith("NIXMOX_")}
        return CliRunner().invoke(
            main,
            [*args],
            env=env,
            catch_exceptions=False,
        )

    def deploy(self) -> Result:
        result = self.nixmox("deploy", "--repo", str(self.repo_dir), "--config", str(self.config))
        assert result.exit_code == 0, result.output
        return result

    def rebuild_by_hand(self, service: str) -> Path:
        """Someone switched the host to another system, outside the bot."""
        manual = self.systems / f"{service}-manual"
        manual.mkdir()
        self.link(service).unlink()
        self.link(service).symlink_to(manual)
        return manual

    def change_terraform_outside(self, label: str) -> None:
        """`terraform apply -var label=...` on the bot's state, as someone at a terminal would."""
        config = RunnerConfig.from_toml(self.config)
        runner = TerraformRunner(config.terraform)
        outside = self.root / "outside"
        shutil.copytree(self.repo_dir / INFRA_ROOT, outside)
        (outside / "backend.tf").write_text(backend_block(runner.key_dir(INFRA_ROOT)))
        env = {**os.environ, "TF_DATA_DIR": str(self.root / "outside-data")}
        for argv in (
            ["terraform", f"-chdir={outside}", "init", "-input=false", "-no-color"],
            ["terraform", f"-chdir={outside}", "apply", "-auto-approve", "-input=false",
             "-no-color", f"-var=label={label}"],
        ):  # fmt: skip
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stdout + done.stderr

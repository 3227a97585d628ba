"""Runner configuration: command templates, terraform roots, transports, simulation.

One pydantic model, `RunnerConfig`, built once at start-up (from the bot's settings or a TOML
file's `[runners]` table) and handed to `runners.registry.build_runners`.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runners.redact import DEFAULT_SECRET_NAMES

RUNNERS_TABLE = "runners"
UNKNOWN_SETTING = "{file}: unknown setting {where}{key}{hint}"


class ConfigError(ValueError):
    """A configuration file the bot cannot use; the message names the file, the key and a fix."""


def unknown_setting(file: str, section: str, key: str, known: Iterable[str]) -> str:
    """`nixmox.toml: unknown setting [runners.nixos] biuld (did you mean build?)`."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return UNKNOWN_SETTING.format(
        file=file,
        where=f"[{section}] " if section else "",
        key=key,
        hint=f" (did you mean {close[0]}?)" if close else "",
    )


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds, directly or in a list/optional (`list[Template] | None`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, Union, UnionType):
        for arg in get_args(annotation):
            found = model_in(arg)
            if found is not None:
                return found
    return None


def model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that holds the keys at `loc` (list indexes skipped), None past a plain dict."""
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if current is not None else None
        current = model_in(field.annotation) if field is not None else None
    return current


def section_name(prefix: str, loc: tuple[int | str, ...]) -> str:
    """`runners.nixos.deploy[0]`: where a key sits, TOML-style."""
    name = prefix
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def raise_unknown_keys(
    error: ValidationError, model: type[BaseModel], file: str, prefix: str
) -> None:
    """Turn pydantic's `extra_forbidden` errors into one ConfigError naming every unknown key."""
    lines: list[str] = []
    for item in error.errors():
        if item["type"] != "extra_forbidden":
            continue
        *where, key = item["loc"]
        holder = model_at(model, tuple(where))
        known = holder.model_fields if holder is not None else ()
        lines.append(unknown_setting(file, section_name(prefix, tuple(where)), str(key), known))
    if lines:
        raise ConfigError("\n".join(lines)) from None


class Strict(BaseModel):
    """Configuration sections refuse unknown keys: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


class TransportKind(StrEnum):
    SSH = "ssh"
    LOCAL = "local"


class Where(StrEnum):
    """Where a command template runs: on this machine, or on the service's host."""

    LOCAL = "local"
    HOST = "host"


class CaptureFormat(StrEnum):
    LINE = "line"
    NIX_BUILD_JSON = "nix-build-json"


class CommandTemplate(Strict):
    """One command line with `{placeholders}` (values are shell-quoted when substituted).

    `capture` names a placeholder set from the command's last stdout line, for later commands
    (e.g. a build that prints the new system path).
    """

    run: str
    on: Where = Where.LOCAL
    capture: str | None = None
    # how the captured value is read: the last stdout line, or the out path of the first
    # result of `nix build --json` (Nix 2.8 has no `--print-out-paths`)
    capture_format: CaptureFormat = CaptureFormat.LINE


class SshConfig(Strict):
    """OpenSSH client settings (always `BatchMode=yes`: never wait for a password prompt)."""

    binary: str = "ssh"
    user: str = "root"
    port: int | None = None
    identity_file: Path | None = None
    # extra `-o` options, e.g. ["StrictHostKeyChecking=accept-new"]
    options: list[str] = Field(default_factory=list)
    config_file: Path | None = None
    connect_timeout: int = 10
    # connection reuse: one master connection per host, kept this long after the last use
    control_persist: str = "60s"
    control_dir: Path | None = None


class TransportConfig(Strict):
    kind: TransportKind = TransportKind.SSH
    ssh: SshConfig = Field(default_factory=SshConfig)
    # how a service's host is reached: its manifest `ip` unless overridden here
    addresses: dict[str, str] = Field(default_factory=dict)
    default_address: str | None = None


class TerraformTemplates(Strict):
    """The terraform command lines; `{tf}` is `<binary> -chdir=<dir>`."""

    init: str = "{tf} init -input=false -no-color"
    workspace: str = "{tf} workspace select -or-create -no-color {workspace}"
    plan: str = "{tf} plan -input=false -no-color -compact-warnings -out={planfile}{targets}"
    apply: str = "{tf} apply -input=false -no-color -compact-warnings {planfile}"
    destroy: str = "{tf} destroy -input=false -no-color -auto-approve{targets}"
    show: str = "{tf} show -json {planfile}"
    output: str = "{tf} output -json"


DEFAULT_ROOTS: dict[str, str | None] = {
    "tf:infra": "terraform/infrastructure",
    "tf:auth-core": "terraform/authentik",
}


class TerraformConfig(Strict):
    binary: str = "terraform"
    # global roots, relative to the exported revision; `null` means "not managed here" (the
    # step succeeds with a note), a configured root missing from the revision is a failure
    roots: dict[str, str | None] = Field(default_factory=lambda: dict(DEFAULT_ROOTS))
    # `-target` address of one service's container in the tf:infra root (diff plans only)
    infra_target: str = 'module.lxc.proxmox_lxc.container["{service}"]'
    # the global roots' workspace (`null`: the root's current/default workspace)
    global_workspace: str | None = None
    workspace_prefix: str = "nixmox"
    tfvars_file: str = "nixmox.auto.tfvars.json"
    # states of per-service workspaces, data dirs, plan files (kept between deployments)
    state_dir: Path = Path(".nixmox/terraform")
    # write a local backend (state under state_dir) into modules that declare no backend
    manage_backend: bool = True
    templates: TerraformTemplates = Field(default_factory=TerraformTemplates)
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float = 3600.0
    # regular expression (case-insensitive): string values under a key matching it, in the
    # manifest or a workspace's variables, are redacted from every terraform command's output
    secret_names: str = DEFAULT_SECRET_NAMES


class NixosPreset(StrEnum):
    NIXOS_REBUILD = "nixos-rebuild"
    COPY_CLOSURE = "copy-closure"
    COLMENA = "colmena"
    DEPLOY_RS = "deploy-rs"


DEFAULT_BUILD = (
    "nix build --no-link --json {export}#nixosConfigurations.{service}.config.system.build.toplevel"
)
# with a build host: evaluate here, build in the build host's store, copy from there
BUILD_ON_HOST = (
    "nix build --no-link --json --eval-store auto --store ssh-ng://{build_host} "
    "{export}#nixosConfigurations.{service}.config.system.build.toplevel"
)
DEFAULT_COPY = "nix-copy-closure --to {target} {new}"
COPY_FROM_BUILD_HOST = "nix copy --from ssh-ng://{build_host} --to ssh://{target} {new}"
DEFAULT_DIFF_CLOSURES = (
    "nix --extra-experimental-features nix-command store diff-closures {current} {new}"
)
DEFAULT_DRY_ACTIVATE = "{new}/bin/switch-to-configuration dry-activate"
# each boot file of both systems, resolved: `FILE<TAB>CURRENT<TAB>NEW` (reboot when they differ)
DEFAULT_BOOT_CHECK = (
    "for f in kernel initrd kernel-params; do printf '%s\\t%s\\t%s\\n' \"$f\" "
    '"$(cksum 2>/dev/null < {current}/$f)" "$(cksum 2>/dev/null < {new}/$f)"; done'
)

PRESETS: dict[NixosPreset, list[CommandTemplate]] = {
    NixosPreset.NIXOS_REBUILD: [
        CommandTemplate(
            run="nixos-rebuild switch --flake {export}#{service} --target-host {target}"
        )
    ],
    NixosPreset.COPY_CLOSURE: [
        CommandTemplate(
            run=DEFAULT_BUILD, capture="new", capture_format=CaptureFormat.NIX_BUILD_JSON
        ),
        CommandTemplate(run=DEFAULT_COPY),
        CommandTemplate(run="nix-env -p {system_profile} --set {new}", on=Where.HOST),
        CommandTemplate(run="{new}/bin/switch-to-configuration switch", on=Where.HOST),
    ],
    NixosPreset.COLMENA: [CommandTemplate(run="colmena apply --on {service} switch")],
    NixosPreset.DEPLOY_RS: [CommandTemplate(run="deploy --skip-checks {export}#{service}")],
}

DEFAULT_ROLLBACK = [
    CommandTemplate(run="nix-env -p {system_profile} --set {prev}", on=Where.HOST),
    CommandTemplate(run="{prev}/bin/switch-to-configuration switch", on=Where.HOST),
]


class NixosConfig(Strict):
    preset: NixosPreset = NixosPreset.NIXOS_REBUILD
    # replaces the preset's commands when given
    deploy: list[CommandTemplate] | None = None
    rollback: list[CommandTemplate] = Field(default_factory=lambda: list(DEFAULT_ROLLBACK))
    record: str = "readlink -e {current_system}"
    system_profile: str = "/nix/var/nix/profiles/system"
    current_system: str = "/run/current-system"
    # the user in `{target}` (`root@<ip>`)
    user: str = "root"
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float = 3600.0
    # the build of a host's system (copy-closure preset and previews); prints `--json` or a path
    build: str | None = None
    # builds running at once, from the start of a deployment
    build_parallel: int = Field(default=4, ge=1)
    # build there (`nix build --store ssh-ng://HOST`), not here
    build_host: str | None = None
    # copy the built closure to the host (skipped with the local transport)
    copy_command: str | None = None
    # previews, run on the host
    diff_closures: str = DEFAULT_DIFF_CLOSURES
    dry_activate: str = DEFAULT_DRY_ACTIVATE
    boot_check: str = DEFAULT_BOOT_CHECK
    # builds kept per revision, so a deployment of a previewed head builds nothing again
    build_cache: Path | None = Path(".nixmox/builds")

    def deploy_commands(self) -> list[CommandTemplate]:
        return self.deploy if self.deploy is not None else PRESETS[self.preset]

    @property
    def builds_first(self) -> bool:
        """Build as a step of its own (from the deployment's start), then copy and switch."""
        return self.deploy is None and self.preset is NixosPreset.COPY_CLOSURE

    def build_template(self) -> str:
        if self.build is not None:
            return self.build
        return BUILD_ON_HOST if self.build_host else DEFAULT_BUILD

    def copy_template(self) -> str:
        if self.copy_command is not None:
            return self.copy_command
        return COPY_FROM_BUILD_HOST if self.build_host else DEFAULT_COPY

    def switch_commands(self) -> list[CommandTemplate]:
        """What a build-first deploy runs after the copy: the preset's profile and switch."""
        return PRESETS[NixosPreset.COPY_CLOSURE][2:]


class HealthConfig(Strict):
    """Fallbacks when neither the service nor the manifest's top level says otherwise."""

    timeout: float = 30.0
    retries: int = 3
    interval: float = 5.0


DEFAULT_SIMULATED_SECONDS: dict[str, float] = {
    "tf:infra": 2.0,
    "nix:core": 3.0,
    "tf:auth-core": 1.5,
    "tf:service-infra": 1.0,
    "nix:service-config": 3.0,
    "tf:service-config": 1.0,
    "verify": 1.0,
    "tf:destroy": 1.0,
}


class SimulateConfig(Strict):
    durations: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SIMULATED_SECONDS))
    default_duration: float = 1.0
    # multiplies every duration (0.01 for benchmarks and tests)
    scale: float = 1.0
    # step ids that fail (verify failures stop once the service is rolled back)
    fail: list[str] = Field(default_factory=list)
    # services whose rollback fails
    fail_rollback: list[str] = Field(default_factory=list)


class RedactConfig(Strict):
    # regular expressions; every match in any output becomes `<redacted>`
    patterns: list[str] = Field(default_factory=list)


class PreviewHosts(StrEnum):
    SELECTED = "selected"  # the hosts the plan's rules selected
    ALL = "all"  # every enabled host: finds the ones the rules missed


class PreviewConfig(Strict):
    """The top-level `[preview]` table."""

    enabled: bool = False
    hosts: PreviewHosts = PreviewHosts.SELECTED
    # hosts previewed at once (each builds, copies and runs two commands on its host)
    parallel: int = Field(default=4, ge=1)

    @classmethod
    def from_toml(cls, path: Path) -> PreviewConfig:
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
        return cls.model_validate(data.get("preview", {}))


class RunnerConfig(Strict):
    """Everything `build_runners` needs."""

    transport: TransportConfig = Field(default_factory=TransportConfig)
    terraform: TerraformConfig = Field(default_factory=TerraformConfig)
    nixos: NixosConfig = Field(default_factory=NixosConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)
    redact: RedactConfig = Field(default_factory=RedactConfig)

    @classmethod
    def from_toml(cls, path: Path) -> RunnerConfig:
        """The `[runners]` table of a TOML file (an empty config when it has none)."""
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
        return cls.from_table(data.get(RUNNERS_TABLE, {}), str(path))

    @classmethod
    def from_table(cls, table: Any, file: str) -> RunnerConfig:
        """A parsed `[runners]` table; unknown keys raise ConfigError naming each one."""
        try:
            return cls.model_validate(table)
        except ValidationError as exc:
            raise_unknown_keys(exc, cls, file, RUNNERS_TABLE)
            raise

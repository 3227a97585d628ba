"""The terraform runner: global roots, per-service workspaces, destroy on removal.

- `tf:infra` / `tf:auth-core` run the configured roots (relative to the exported revision);
  in a diff plan `tf:infra` gets one `-target` per container it touches (`Step.targets`).
- `tf:service-infra` / `tf:service-config` run each `interface.terraform.modules` directory in
  workspace `nixmox-<phase>-<service>` (e.g. `nixmox-service-infra-vaultwarden`) with the
  manifest's values in `nixmox.auto.tfvars.json` and `-target` from `interface.terraform.targets`.
- `tf:destroy` destroys every workspace applied for the service, from a snapshot of the module
  as last applied (the module may be gone from the revision), then its container.

The sequence is `init -input=false`, `workspace select -or-create`, `plan -out`, `apply` of that
plan file. A module that declares no backend gets a local backend whose state lives under
`state_dir` (outside the exported revision, so it persists between deployments).

Before a step runs anything, its secrets are gathered: values of variables its modules declare
`sensitive`, and strings under secret-looking keys (`secret_names`) in its variables and anywhere
in the manifest. They, sensitive plan values and outputs, and configured patterns are
`<redacted>` in the output of every command, failed ones included.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from planner.models import Manifest, Service
from planner.plan import Phase, Step
from runners.base import Context
from runners.config import TerraformConfig
from runners.paths import PathEscapeError, contained
from runners.redact import Redactor, named_secrets, secret_strings, sensitive_variables
from runners.transport import CommandResult, run_process
from state.events import StepResult

GLOBAL = frozenset({Phase.TF_INFRA, Phase.TF_AUTH_CORE})
PER_SERVICE = frozenset({Phase.TF_SERVICE_INFRA, Phase.TF_SERVICE_CONFIG})
BACKEND_FILE = "nixmox_backend.tf"
PLAN_FILE = "nixmox.tfplan"
BACKEND_DECLARED = re.compile(r"^\s*(backend\s+\"|cloud\s*\{)", re.MULTILINE)
NOT_CONFIGURED = "no terraform root is configured for {phase}: nothing to do"
ROOT_MISSING = "terraform root {root} for {phase} does not exist in the exported revision ({path})"
MODULE_MISSING = "terraform module {module} of {service} does not exist in the revision ({path})"
NO_MODULES = "{service} has no interface.terraform.modules: nothing to do"
NOTHING_TO_DESTROY = "no terraform workspace was applied for {service}"
NOT_FOUND = (
    "terraform was not found (looked for {binary!r} on PATH): install terraform >= 1.5 or set "
    "runners.terraform.binary"
)


@dataclass(frozen=True)
class Workspace:
    """One terraform run: a directory, the workspace in it, its targets and variables."""

    phase: Phase
    service: str | None
    module: str  # relative to the exported revision's root
    directory: Path
    name: str | None
    targets: tuple[str, ...] = ()
    variables: Mapping[str, Any] | None = None
    destroy: bool = False


@dataclass
class _Log:
    commands: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def add(self, line: str, result: CommandResult, *, quiet: bool = False) -> None:
        self.commands.append(line)
        self.lines.append(f"$ {line}")
        if not quiet and (text := result.combined()):
            self.lines.append(text)
        if not result.ok:
            if quiet and (text := result.stderr.strip()):
                self.lines.append(text)
            self.lines.append(f"exit status {result.rc}")

    def note(self, text: str) -> None:
        self.lines.append(text)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def workspace_name(config: TerraformConfig, phase: Phase, service: str) -> str:
    """`nixmox-service-infra-vaultwarden` (the phase without its `tf:` prefix)."""
    return f"{config.workspace_prefix}-{phase.value.removeprefix('tf:')}-{service}"


def module_key(module: str) -> str:
    """A directory name for a module path: `./terraform/vaultwarden` -> `terraform__vaultwarden`."""
    parts = [part for part in Path(module).parts if part not in (".", "/")]
    return "__".join(parts).replace("..", "up") or "root"


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _model_values(model: BaseModel) -> Any:
    """A manifest model as JSON values: only the fields the manifest set, no nulls."""
    return _drop_none(model.model_dump(mode="json", exclude_unset=True))


def service_variables(service: str, manifest: Manifest) -> dict[str, Any]:
    """The values a service's modules receive (`nixmox.auto.tfvars.json`).

    ip, hostname, network, resources, proxy (one entry, or the map of named entries), oidc
    (from `interface.auth`, else the first proxy entry's auth), then the service's own
    `interface.terraform.variables`, which win.
    """
    svc: Service = manifest.all_services()[service]
    values: dict[str, Any] = {"service": service}
    if svc.ip is not None:
        values["ip"] = str(svc.ip)
    if svc.hostname:
        values["hostname"] = svc.hostname
    values["network"] = _model_values(manifest.network)
    if svc.resources is not None:
        values["resources"] = _model_values(svc.resources)
    proxies = svc.interface.proxies()
    if "" in proxies:
        values["proxy"] = _model_values(proxies[""])
    elif proxies:
        values["proxy"] = {name: _model_values(entry) for name, entry in proxies.items()}
    oidc = next((auth.oidc for auth in svc.interface.auths().values() if auth.oidc), None)
    if oidc is not None:
        values["oidc"] = _model_values(oidc)
    if svc.interface.terraform is not None:
        values.update(svc.interface.terraform.variables)
    return values


def backend_block(state: Path) -> str:
    """A local backend keeping the state of every workspace under `state`."""
    return (
        "# Written by the NixMox bot: state lives outside the exported revision.\n"
        "terraform {\n"
        '  backend "local" {\n'
        f"    path          = {json.dumps(str(state / 'terraform.tfstate'))}\n"
        f"    workspace_dir = {json.dumps(str(state / 'terraform.tfstate.d'))}\n"
        "  }\n"
        "}\n"
    )


def declares_backend(directory: Path) -> bool:
    """Whether the module configures its own backend (then its state is its own business)."""
    for path in directory.glob("*.tf"):
        if path.name == BACKEND_FILE:
            continue
        if BACKEND_DECLARED.search(path.read_text(errors="replace")):
            return True
    return False


def sensitive_plan_values(show: dict[str, Any]) -> list[str]:
    """Values of sensitive variables and outputs in `terraform show -json PLANFILE`."""
    found: list[str] = []
    declared = show.get("configuration", {}).get("root_module", {}).get("variables", {})
    given = show.get("variables", {})
    for name, decl in declared.items():
        if decl.get("sensitive") and name in given:
            found += secret_strings(given[name].get("value"))
    for output in show.get("planned_values", {}).get("outputs", {}).values():
        if output.get("sensitive"):
            found += secret_strings(output.get("value"))
    return found


def sensitive_outputs(outputs: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Secret strings of `terraform output -json`, and the outputs with those values hidden."""
    secrets: list[str] = []
    shown: dict[str, Any] = {}
    for name, output in outputs.items():
        if output.get("sensitive"):
            secrets += secret_strings(output.get("value"))
            shown[name] = "<redacted>"
        else:
            shown[name] = output.get("value")
    return secrets, shown


class TerraformRunner:
    """Runs every `tf:*` step."""

    def __init__(self, config: TerraformConfig, *, redactor: Redactor | None = None) -> None:
        self.config = config
        self.redactor = redactor or Redactor()
        self.state_dir = config.state_dir.expanduser().resolve()
        self._locks: dict[Path, asyncio.Lock] = {}

    # ---- where and what

    def key_dir(self, module: str) -> Path:
        return contained(self.state_dir, module_key(module))

    # a workspace name holds a service name: each path built from it stays in its directory
    def data_dir(self, ws: Workspace) -> Path:
        return contained(self.key_dir(ws.module) / "data", ws.name or "default")

    def snapshot_dir(self, module: str, workspace: str | None) -> Path:
        return contained(self.key_dir(module) / "snapshot", workspace or "default")

    def applied_file(self, module: str, workspace: str | None) -> Path:
        return contained(self.key_dir(module) / "applied", f"{workspace}.json")

    def planfile(self, ws: Workspace) -> Path:
        return self.data_dir(ws) / PLAN_FILE

    def env(self, ws: Workspace) -> dict[str, str]:
        """TF_DATA_DIR per module and workspace: steps sharing a module never race."""
        return {
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            **self.config.env,
            "TF_DATA_DIR": str(self.data_dir(ws)),
        }

    def workspaces(self, step: Step, ctx: Context) -> list[Workspace] | str:
        """The runs of a step, or a note saying why there are none."""
        if step.phase in GLOBAL:
            return self._global(step, ctx)
        if step.phase is Phase.TF_DESTROY:
            return self._destroys(step, ctx)
        service = step.service or ""
        svc = ctx.manifest.all_services().get(service)
        tf = svc.interface.terraform if svc is not None else None
        if tf is None or not tf.modules:
            return NO_MODULES.format(service=service)
        variables = service_variables(service, ctx.manifest)
        name = workspace_name(self.config, step.phase, service)
        return [
            Workspace(
                step.phase,
                service,
                module,
                contained(ctx.workdir, module),
                name,
                tuple(tf.targets),
                variables,
            )
            for module in tf.modules
        ]

    def _global(self, step: Step, ctx: Context) -> list[Workspace] | str:
        root = self.config.roots.get(step.phase.value)
        if not root:
            return NOT_CONFIGURED.format(phase=step.phase.value)
        targets: tuple[str, ...] = ()
        if step.phase is Phase.TF_INFRA and ctx.plan.base is not None:
            # a diff plan: only the containers it touches
            targets = tuple(self.container(service) for service in step.targets)
        directory = (ctx.workdir / root).resolve()
        ws = Workspace(step.phase, None, root, directory, self.config.global_workspace, targets)
        return [ws]

    def container(self, service: str) -> str:
        return self.config.infra_target.format(service=service)

    def _destroys(self, step: Step, ctx: Context) -> list[Workspace] | str:
        """Every workspace applied for the service (service-config first), then its container."""
        service = step.service or ""
        runs: list[Workspace] = []
        for record in sorted(
            self.applied(service), key=lambda r: r["phase"] != "tf:service-config"
        ):
            snapshot = self.snapshot_dir(record["module"], record["workspace"])
            runs.append(
                Workspace(
                    Phase(record["phase"]),
                    service,
                    record["module"],
                    snapshot,
                    record["workspace"],
                    destroy=True,
                )
            )
        root = self.config.roots.get(Phase.TF_INFRA.value)
        if root:
            containers = tuple(self.container(name) for name in (step.targets or [service]))
            directory = (ctx.workdir / root).resolve()
            runs.append(
                Workspace(
                    Phase.TF_INFRA,
                    service,
                    root,
                    directory,
                    self.config.global_workspace,
                    containers,
                    destroy=True,
                )
            )
        return runs or NOTHING_TO_DESTROY.format(service=service)

    def applied(self, service: str) -> list[dict[str, Any]]:
        """What was applied for a service: one record per (module, workspace)."""
        records = []
        for path in sorted(self.state_dir.glob("*/applied/*.json")):
            record = json.loads(path.read_text())
            if record.get("service") == service:
                records.append(record)
        return records

    # ---- command lines

    def _tf(self, ws: Workspace) -> str:
        return f"{shlex.quote(self.config.binary)} -chdir={shlex.quote(str(ws.directory))}"

    def _targets(self, ws: Workspace) -> str:
        return "".join(f" -target={shlex.quote(target)}" for target in ws.targets)

    def lines(self, ws: Workspace) -> list[str]:
        """The terraform commands of one run, without their environment."""
        t = self.config.templates
        values = {
            "tf": self._tf(ws),
            "workspace": shlex.quote(ws.name or ""),
            "planfile": shlex.quote(str(self.planfile(ws))),
            "targets": self._targets(ws),
        }
        lines = [t.init.format(**values)]
        if ws.name:
            lines.append(t.workspace.format(**values))
        if ws.destroy:
            return [*lines, t.destroy.format(**values)]
        return [*lines, t.plan.format(**values), t.apply.format(**values)]

    def shown(self, ws: Workspace, line: str) -> str:
        """A command line as it runs: with the data directory that makes it reproducible."""
        return f"TF_DATA_DIR={shlex.quote(str(self.data_dir(ws)))} {line}"

    def commands(self, step: Step, ctx: Context) -> list[str]:
        try:
            runs = self.workspaces(step, ctx)
            if isinstance(runs, str):
                return [f"# {runs}"]
            return [self.shown(ws, line) for ws in runs for line in self.lines(ws)]
        except PathEscapeError as exc:
            return [f"# {exc}"]

    def estimate(self, step: Step) -> float:
        return 3.0 if step.phase is Phase.TF_INFRA else 2.0

    # ---- running

    def _lock(self, directory: Path) -> asyncio.Lock:
        return self._locks.setdefault(directory, asyncio.Lock())

    async def run(self, step: Step, ctx: Context) -> StepResult:
        try:
            return await self._run_step(step, ctx)
        except PathEscapeError as exc:  # a manifest's name or module path leaving its root
            return StepResult(False, str(exc))

    async def _run_step(self, step: Step, ctx: Context) -> StepResult:
        runs = self.workspaces(step, ctx)
        if isinstance(runs, str):
            return StepResult(True, runs)
        if shutil.which(self.config.binary) is None:
            return StepResult(False, NOT_FOUND.format(binary=self.config.binary))
        log = _Log()
        # known before the first command: a failing init or plan may echo any of them
        redactor = self.redactor.with_values(self.step_secrets(runs, ctx))
        ok = True
        for ws in runs:
            problem = self._missing(ws, step)
            if problem:
                log.note(problem)
                ok = False
                break
            async with self._lock(ws.directory):
                ok = await self._run_workspace(ws, ctx, log, redactor)
            if not ok:
                break
        output = redactor.text(log.output)
        commands = [redactor.text(line) for line in log.commands]
        return StepResult(ok, output, commands=commands)

    def step_secrets(self, runs: list[Workspace], ctx: Context) -> list[str]:
        """Every secret the commands of a step may print, known before any of them runs."""
        names = re.compile(self.config.secret_names, re.IGNORECASE)
        found = named_secrets(ctx.manifest.model_dump(mode="json"), names)
        from_env = {
            key.removeprefix("TF_VAR_"): value
            for key, value in self.config.env.items()
            if key.startswith("TF_VAR_")
        }
        for ws in runs:
            values = {**from_env, **self.variables_of(ws)}
            found += named_secrets(values, names)
            if ws.directory.is_dir():
                sensitive = sensitive_variables(ws.directory) & values.keys()
                found += [secret for name in sensitive for secret in secret_strings(values[name])]
        return found

    def variables_of(self, ws: Workspace) -> dict[str, Any]:
        """The values a run passes: its own, else the tfvars of a destroy's snapshot."""
        if ws.variables is not None:
            return dict(ws.variables)
        path = ws.directory / self.config.tfvars_file
        return _json(path.read_text(errors="replace")) if path.is_file() else {}

    def _missing(self, ws: Workspace, step: Step) -> str | None:
        if ws.directory.is_dir():
            return None
        if ws.phase in GLOBAL:
            return ROOT_MISSING.format(root=ws.module, phase=ws.phase.value, path=ws.directory)
        return MODULE_MISSING.format(module=ws.module, service=ws.service, path=ws.directory)

    async def _exec(
        self, ws: Workspace, line: str, log: _Log, *, quiet: bool = False
    ) -> CommandResult:
        result = await run_process(
            shlex.split(line), timeout=self.config.timeout, env=self.env(ws), cwd=ws.directory
        )
        log.add(self.shown(ws, line), result, quiet=quiet)
        return result

    def _prepare(self, ws: Workspace) -> None:
        """Variables and (when the module has none) a backend that keeps state in state_dir."""
        self.data_dir(ws).mkdir(parents=True, exist_ok=True)
        if ws.variables is not None:
            path = ws.directory / self.config.tfvars_file
            path.write_text(json.dumps(ws.variables, indent=2, sort_keys=True) + "\n")
        if self.config.manage_backend and not declares_backend(ws.directory):
            (ws.directory / BACKEND_FILE).write_text(backend_block(self.key_dir(ws.module)))

    async def drift_plan(self, ws: Workspace, plan_line: str) -> tuple[bool, CommandResult]:
        """Init (and select the workspace of) a run as a deployment would, then `plan_line`
        (`{tf}` filled): (whether the plan ran, the result of the last command run)."""
        self._prepare(ws)
        async with self._lock(ws.directory):
            for line in self.lines(ws)[:-2]:  # init and workspace selection: no plan, no apply
                result = await run_process(
                    shlex.split(line),
                    timeout=self.config.timeout,
                    env=self.env(ws),
                    cwd=ws.directory,
                )
                if not result.ok:
                    return False, result
            line = plan_line.format(tf=self._tf(ws))
            return True, await run_process(
                shlex.split(line), timeout=self.config.timeout, env=self.env(ws), cwd=ws.directory
            )

    async def _run_workspace(
        self, ws: Workspace, ctx: Context, log: _Log, redactor: Redactor
    ) -> bool:
        if not ws.destroy:
            self._prepare(ws)
        self.data_dir(ws).mkdir(parents=True, exist_ok=True)
        t = self.config.templates
        planfile = shlex.quote(str(self.planfile(ws)))
        lines = self.lines(ws)
        for index, line in enumerate(lines):
            if not ws.destroy and index == len(lines) - 1:
                # before applying, learn the sensitive values the plan carries
                show_line = t.show.format(tf=self._tf(ws), planfile=planfile)
                show = await self._exec(ws, show_line, log, quiet=True)
                if show.ok:
                    redactor.add_values(sensitive_plan_values(_json(show.stdout)))
            result = await self._exec(ws, line, log)
            if not result.ok:
                return False
        if ws.destroy:
            self._forget(ws)
            return True
        outputs = await self._exec(ws, t.output.format(tf=self._tf(ws)), log, quiet=True)
        if outputs.ok:
            secrets, shown = sensitive_outputs(_json(outputs.stdout))
            redactor.add_values(secrets)
            if shown:
                log.note("outputs: " + json.dumps(shown, sort_keys=True))
        if ws.service is not None and ws.phase in PER_SERVICE:
            self._remember(ws, ctx)
        return True

    def _remember(self, ws: Workspace, ctx: Context) -> None:
        """Record the applied workspace and snapshot its module, for a later destroy."""
        snapshot = self.snapshot_dir(ws.module, ws.name)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        shutil.copytree(
            ws.directory, snapshot, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*")
        )
        record = {
            "service": ws.service,
            "phase": ws.phase.value,
            "module": ws.module,
            "workspace": ws.name,
            "revision": ctx.revision,
            "deployment": ctx.deployment_id,
            "applied_at": datetime.now(UTC).isoformat(),
        }
        applied = self.applied_file(ws.module, ws.name)
        applied.parent.mkdir(parents=True, exist_ok=True)
        applied.write_text(json.dumps(record, indent=2) + "\n")

    def _forget(self, ws: Workspace) -> None:
        if ws.phase in PER_SERVICE and ws.name:
            self.applied_file(ws.module, ws.name).unlink(missing_ok=True)
            shutil.rmtree(self.snapshot_dir(ws.module, ws.name), ignore_errors=True)


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}

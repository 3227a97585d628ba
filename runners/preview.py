"""Host previews: what deploying the head changes on each host, found by building it.

Per host: build the head's system (the `[runners.nixos] build` template, whatever the preset),
read the host's current system (the `record` command), copy the closure to the host unless
the transport is local, then run on the host `nix store diff-closures CURRENT NEW`,
`NEW/bin/switch-to-configuration dry-activate` and the boot-file check. `planner.preview`
parses their output. A host that cannot be reached or whose build fails gets its error; the
others are previewed all the same.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterable
from pathlib import Path

from planner.models import Manifest
from planner.plan import NIX_PHASES, Plan
from planner.preview import HostPreview, complete_plan, host_preview
from runners.base import Context
from runners.config import CommandTemplate, PreviewConfig, PreviewHosts, RunnerConfig, Where
from runners.nixos import CommandLog, HostError, NixosRunner, RecordError
from runners.redact import Redactor
from runners.registry import build_runners
from runners.transport import Transport

ERROR_LINES = 20
NOT_NIXOS = "the {kind} runners have no NixOS runner to preview with"
COMMAND_FAILED = "{what} failed on the host"


def preview_services(plan: Plan, manifest: Manifest, hosts: PreviewHosts) -> list[str]:
    """The hosts to preview: those with a nix step in the plan, or every enabled one."""
    if hosts is PreviewHosts.ALL:
        return sorted(manifest.enabled())
    return sorted({s.service for s in plan.steps if s.phase in NIX_PHASES and s.service})


def _tail(text: str, redactor: Redactor) -> str:
    lines = [line for line in redactor.text(text).strip().splitlines() if line.strip()]
    return "\n".join(lines[-ERROR_LINES:])


class HostPreviewer:
    """Previews hosts with a NixOS runner (its build, record and transport)."""

    def __init__(self, runner: NixosRunner, redactor: Redactor | None = None) -> None:
        self.runner = runner
        self.redactor = redactor or Redactor()

    async def preview(self, service: str, ctx: Context) -> HostPreview:
        """One host's preview; every failure becomes its `error`."""
        build = await self.runner.built(service, ctx)
        if not build.ok or build.path is None:
            return HostPreview(error=_tail(build.output, self.redactor))
        log = CommandLog()
        try:
            current = await self.runner.record(service, ctx, log)
            values = self.runner.values(service, ctx, new=build.path, current=current)
        except (HostError, RecordError) as exc:
            return HostPreview(new=build.path, error=_tail(str(exc), self.redactor))
        if current == build.path:
            return host_preview(current, build.path)
        outputs: list[str] = []
        for what, template, where in self._commands():
            result = await self.runner.execute(
                CommandTemplate(run=template, on=where), values, ctx, log
            )
            if not result.ok:
                error = _tail(f"{COMMAND_FAILED.format(what=what)}\n{log.output}", self.redactor)
                return HostPreview(current=current, new=build.path, error=error)
            outputs.append(result.combined())
        if not self.runner.copies():
            outputs.insert(0, "")
        _, diff, dry_activate, boot = outputs
        return host_preview(current, build.path, diff, dry_activate, boot)

    def _commands(self) -> list[tuple[str, str, Where]]:
        nixos = self.runner.config
        commands = [
            ("diff-closures", nixos.diff_closures, Where.HOST),
            ("dry-activate", nixos.dry_activate, Where.HOST),
            ("the boot-file check", nixos.boot_check, Where.HOST),
        ]
        if self.runner.copies():
            commands.insert(0, ("the closure copy", nixos.copy_template(), Where.LOCAL))
        return commands

    async def preview_all(
        self, services: Iterable[str], ctx: Context, parallel: int
    ) -> dict[str, HostPreview]:
        """Every host's preview, `parallel` at once; the builds share the runner's scheduler."""
        services = list(services)
        limit = asyncio.Semaphore(parallel)
        self.runner.start_preview_builds(services, ctx)

        async def one(service: str) -> tuple[str, HostPreview]:
            async with limit:
                try:
                    return service, await self.preview(service, ctx)
                except Exception as exc:  # a preview must never take the plan down
                    return service, HostPreview(
                        error=_tail(f"preview failed: {exc}", self.redactor)
                    )

        try:
            return dict(await asyncio.gather(*(one(service) for service in services)))
        finally:
            await self.runner.finish_builds(ctx)


async def preview_plan(
    plan: Plan,
    manifest: Manifest,
    workdir: Path,
    revision: str | None,
    config: RunnerConfig,
    preview: PreviewConfig | None = None,
    *,
    transport: Transport | None = None,
) -> tuple[Plan, dict[str, HostPreview]]:
    """Preview the plan's hosts (`[preview] hosts`); with `all`, add the hosts that change."""
    preview = preview or PreviewConfig()
    runners = build_runners("real", config, transport=transport)
    try:
        runner = runners.rollback
        if not isinstance(runner, NixosRunner):
            raise TypeError(NOT_NIXOS.format(kind=runners.kind))
        ctx = Context("preview", manifest, plan, workdir, revision, dry_run=True)
        services = preview_services(plan, manifest, preview.hosts)
        previewer = HostPreviewer(runner, runners.redactor)
        previews = await previewer.preview_all(services, ctx, preview.parallel)
    finally:
        if transport is None:
            await runners.close()
    return complete_plan(plan, manifest, previews), previews


async def preview_revision(
    plan: Plan,
    repo_dir: Path,
    manifest_path: str,
    config: RunnerConfig,
    preview: PreviewConfig | None = None,
) -> tuple[Plan, dict[str, HostPreview]]:
    """Preview a plan of a Git revision (its head exported into a temporary directory)."""
    from planner.source import export_tree, load_manifest_at

    assert plan.head is not None
    manifest = await asyncio.to_thread(load_manifest_at, repo_dir, plan.head, manifest_path)
    with tempfile.TemporaryDirectory(prefix="nixmox-preview-") as tmp:
        tree = Path(tmp) / "tree"
        await asyncio.to_thread(export_tree, repo_dir, plan.head, tree)
        return await preview_plan(plan, manifest, tree, plan.head, config, preview)

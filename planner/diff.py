"""Semantic diff of two manifests, and which services a changed file belongs to.

Everything here names field paths and file paths, never values: the manifest holds secrets
(`network.outposts.radius.shared_secret`), and diffs end up in PR comments.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import PurePosixPath
from typing import Any

from planner.models import Manifest
from planner.tfmodules import ModuleGraph, normalize_dir

SERVICE_SECTIONS = ("core_services", "services")
DEFAULT_GLOBAL_GLOBS = ("flake.lock", "flake.nix")
NIXOS_DIR = "nixos"
ROOT_KEYS = ("infra_root", "auth_root")  # `[paths]` keys naming the global terraform roots


class DiffKind(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


class Effect(StrEnum):
    """What a changed field asks of the deployment."""

    VERIFY = "verify"  # re-run the service's health checks
    NIX = "nix"  # rebuild the service's NixOS configuration
    INFRA = "infra"  # tf:infra for the service's container
    DNS = "dns"  # the DNS service's records
    PROXY = "proxy"  # the proxy service's routes
    DATABASE = "db"  # the database service's databases and roles
    AUTH = "auth"  # Authentik application/provider of the service
    TERRAFORM = "terraform"  # the service's own terraform steps
    AUTH_CORE = "auth-core"  # the identity provider's global terraform (tf:auth-core)


INFRA_FIELDS = frozenset({"vmid", "resources", "onboot", "start"})
ADDRESS_FIELDS = frozenset({"ip", "hostname"})
CONFIG_FIELDS = frozenset({"depends_on", "ports", "version"})
# Top-level options that only change how the bot verifies: re-verify every service.
VERIFY_ALL_FIELDS = frozenset(
    {"health_check_timeout", "retry_attempts", "retry_delay", "deployment_phases"}
)


@dataclass(frozen=True)
class ServiceDiff:
    """How one service differs between base and head."""

    service: str
    kind: DiffKind
    fields: tuple[str, ...] = ()
    section: str = "services"
    enabled_in_head: bool = True
    enabled_in_base: bool = True

    def path(self, field_path: str | None = None) -> str:
        """`services.vaultwarden` or `services.vaultwarden.interface.proxy.upstream`."""
        base = f"{self.section}.{self.service}"
        return f"{base}.{field_path}" if field_path else base


@dataclass(frozen=True)
class ManifestDiff:
    """Every service difference, and changed global fields (`network.domain`, ...)."""

    services: tuple[ServiceDiff, ...] = ()
    global_fields: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.services and not self.global_fields

    def network_fields(self) -> list[str]:
        return [f for f in self.global_fields if f == "network" or f.startswith("network.")]


def changed_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ; lists and scalars are leaves."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                found.append(path)
            elif old[key] != new[key]:
                found.extend(changed_paths(old[key], new[key], path))
        return found
    return [] if old == new else [prefix]


def _sections(data: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, Any]]]:
    found: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for section in SERVICE_SECTIONS:
        for name, svc in (data.get(section) or {}).items():
            found[name] = (section, svc)
    return found


def diff_service(
    name: str, old: tuple[str, Mapping[str, Any]], new: tuple[str, Mapping[str, Any]]
) -> ServiceDiff:
    """One service present in both manifests: added/removed by `enable`, else changed fields."""
    (old_section, old_svc), (new_section, new_svc) = old, new
    old_on, new_on = bool(old_svc.get("enable", True)), bool(new_svc.get("enable", True))
    if old_on and not new_on:
        return ServiceDiff(name, DiffKind.REMOVED, ("enable",), new_section, False, True)
    if new_on and not old_on:
        return ServiceDiff(name, DiffKind.ADDED, ("enable",), new_section, True, False)
    if old_section != new_section and new_on:
        # moved between core_services and services: a different chain, deploy it afresh
        return ServiceDiff(name, DiffKind.ADDED, ("section",), new_section, True, True)
    fields = changed_paths(old_svc, new_svc)
    return ServiceDiff(name, DiffKind.CHANGED, tuple(fields), new_section, new_on, old_on)


def dump(manifest: Manifest) -> dict[str, Any]:
    """The manifest as JSON-like data, the form the diff compares (defaults filled in)."""
    return manifest.model_dump(mode="json")


def diff_manifests(
    base: Manifest,
    head: Manifest,
    *,
    base_data: Mapping[str, Any] | None = None,
    head_data: Mapping[str, Any] | None = None,
) -> ManifestDiff:
    """Per service added / removed (or `enable` true → false) / changed, plus global fields.

    `base_data`/`head_data` are the manifests' `dump`s when the caller has them already.
    """
    old_data = base_data if base_data is not None else dump(base)
    new_data = head_data if head_data is not None else dump(head)
    old, new = _sections(old_data), _sections(new_data)
    services: list[ServiceDiff] = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            section, svc = old[name]
            if svc.get("enable", True):
                services.append(ServiceDiff(name, DiffKind.REMOVED, (), section, False, True))
        elif name not in old:
            section, svc = new[name]
            if svc.get("enable", True):
                services.append(ServiceDiff(name, DiffKind.ADDED, (), section, True, False))
        elif old[name] != new[name]:  # plain dict comparison: cheap for the unchanged many
            found = diff_service(name, old[name], new[name])
            if found.kind is not DiffKind.CHANGED or found.fields:
                services.append(found)
    return ManifestDiff(tuple(services), tuple(global_paths(old_data, new_data)))


def global_paths(old_data: Mapping[str, Any], new_data: Mapping[str, Any]) -> list[str]:
    """Changed paths outside the service sections (`network.*`, top-level options)."""
    skip = set(SERVICE_SECTIONS)
    old = {k: v for k, v in old_data.items() if k not in skip}
    new = {k: v for k, v in new_data.items() if k not in skip}
    return changed_paths(old, new)


def field_effects(path: str) -> frozenset[Effect]:
    """What a changed service field (relative path, e.g. `interface.proxy.upstream`) causes."""
    parts = path.split(".")
    top = parts[0]
    if top in ADDRESS_FIELDS:
        return frozenset({Effect.INFRA, Effect.NIX, Effect.VERIFY, Effect.DNS})
    if top in INFRA_FIELDS:
        return frozenset({Effect.INFRA, Effect.NIX, Effect.VERIFY})
    if top in CONFIG_FIELDS:
        return frozenset({Effect.NIX, Effect.VERIFY})
    if top != "interface" or len(parts) < 2:
        return frozenset({Effect.NIX, Effect.VERIFY})  # unknown keys: rebuild to be safe
    section = parts[1]
    if section == "health":
        return frozenset({Effect.VERIFY})
    if section == "proxy":
        if "auth" in parts[2:4]:
            # per-proxy auth: the Authentik app and the proxy's forward_auth directive
            return frozenset({Effect.AUTH, Effect.PROXY, Effect.NIX, Effect.VERIFY})
        return frozenset({Effect.PROXY, Effect.VERIFY})
    if section in ("db", "dbs"):
        return frozenset({Effect.DATABASE, Effect.NIX, Effect.VERIFY})
    if section == "auth":
        return frozenset({Effect.AUTH, Effect.NIX, Effect.VERIFY})
    if section == "terraform":
        return frozenset({Effect.TERRAFORM, Effect.VERIFY})
    return frozenset({Effect.NIX, Effect.VERIFY})


# --- changed files -> services -------------------------------------------------------------


@dataclass(frozen=True)
class PathsConfig:
    """`[paths]` of `.nixmox.toml`: extra globs per service, and globs that touch every host.

    `global` replaces the default (`flake.lock`, `flake.nix`) when given; `ignore` lists files
    that never cause a deployment (documentation under `nixos/`, say); `infra_root` and
    `auth_root` move the global terraform roots (None: the planner options' defaults).
    """

    global_globs: tuple[str, ...] = DEFAULT_GLOBAL_GLOBS
    services: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ignore_globs: tuple[str, ...] = ()
    infra_root: str | None = None
    auth_root: str | None = None

    @classmethod
    def from_toml(cls, data: Mapping[str, Any]) -> PathsConfig:
        """Build from parsed `.nixmox.toml` data; raises ValueError naming the bad key."""
        paths = data.get("paths", {})
        if not isinstance(paths, Mapping):
            raise ValueError("[paths] must be a table")
        global_globs = paths.get("global", list(DEFAULT_GLOBAL_GLOBS))
        services: dict[str, tuple[str, ...]] = {}
        roots: dict[str, str] = {}
        for key, value in paths.items():
            if key in ROOT_KEYS:
                if not isinstance(value, str) or not value.strip("./"):
                    raise ValueError(f"paths.{key} must be a directory path")
                roots[key] = value
                continue
            if not _is_glob_list(value):
                raise ValueError(f"paths.{key} must be a list of glob strings")
            if key not in ("global", "ignore"):
                services[str(key)] = tuple(value)
        return cls(
            tuple(global_globs),
            services,
            tuple(paths.get("ignore", ())),
            infra_root=roots.get("infra_root"),
            auth_root=roots.get("auth_root"),
        )


def _is_glob_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) and item for item in value)


@lru_cache(maxsize=1024)
def glob_regex(pattern: str) -> re.Pattern[str]:
    """A path glob: `**` spans directories (also none), `*` and `?` stay within one."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_match(path: str, pattern: str) -> bool:
    return glob_regex(pattern.lstrip("/")).match(path) is not None


NIX_EFFECTS = frozenset({Effect.NIX, Effect.VERIFY})
TF_EFFECTS = frozenset({Effect.TERRAFORM, Effect.VERIFY})
INFRA_EFFECTS = frozenset({Effect.INFRA, Effect.VERIFY})
AUTH_EFFECTS = frozenset({Effect.AUTH_CORE, Effect.VERIFY})


@dataclass(frozen=True)
class FileHit:
    """A changed file that belongs to a service (or to every service, `service=None`)."""

    path: str
    service: str | None
    effects: frozenset[Effect]
    why: str = ""  # the module chain or external module change that makes it count

    @property
    def reason(self) -> str:
        """The step reason: the path, with why it counts when that is not plain."""
        return f"{self.path} ({self.why})" if self.why else self.path


def _under(path: str, directory: str) -> bool:
    directory = directory.strip("/")
    if directory.startswith("./"):
        directory = directory[2:]
    return bool(directory) and (path == directory or path.startswith(directory + "/"))


def nixos_candidates(path: str) -> set[str]:
    """Service names a path under `nixos/` can belong to by the default globs.

    `nixos/**/<svc>.nix` gives the file's stem; `nixos/**/<svc>/**` every directory below nixos/.
    """
    parts = PurePosixPath(path).parts
    if len(parts) < 2 or parts[0] != NIXOS_DIR:
        return set()
    found = set(parts[1:-1])
    if parts[-1].endswith(".nix"):
        found.add(parts[-1][: -len(".nix")])
    return found


def match_files(
    files: Iterable[str],
    manifest: Manifest,
    config: PathsConfig | None = None,
    *,
    ignore: Iterable[str] = (),
    infra_root: str | None = None,
    auth_root: str | None = None,
    modules: ModuleGraph | None = None,
) -> list[FileHit]:
    """Which enabled services each changed file counts for, and what it causes there.

    Terraform module directories cause the service's tf steps; `nixos/**/<svc>.nix`,
    `nixos/**/<svc>/**` and the service's configured globs its nix step; global globs the nix
    step of every service. Every one of them is verified afterwards. A file under the infra
    root causes tf:infra for every service, one under the auth root tf:auth-core (the config's
    roots override the `infra_root`/`auth_root` arguments; None: no such root). With the
    module graph, a file under a local module directory counts for every root using it.
    """
    config = config or PathsConfig()
    infra_root = config.infra_root or infra_root
    auth_root = config.auth_root or auth_root
    enabled = manifest.enabled()
    skip = set(ignore)
    tf_dirs = {
        name: [module for module in svc.interface.terraform.modules]
        for name, svc in enabled.items()
        if svc.interface.terraform is not None
    }
    hits: list[FileHit] = []
    for path in sorted(set(files)):
        if path in skip or is_ignored(path, config):
            continue
        if any(glob_match(path, pattern) for pattern in config.global_globs):
            hits.append(FileHit(path, None, NIX_EFFECTS))
            continue
        found = len(hits)
        why = "; ".join(modules.external_changes(path)) if modules is not None else ""
        if infra_root and _under(path, infra_root):
            hits.append(FileHit(path, None, INFRA_EFFECTS, why))
        if auth_root and _under(path, auth_root):
            hits.append(FileHit(path, None, AUTH_EFFECTS, why))
        for name in sorted(nixos_candidates(path) & set(enabled)):
            hits.append(FileHit(path, name, NIX_EFFECTS))
        for name, patterns in config.services.items():
            if name in enabled and any(glob_match(path, pattern) for pattern in patterns):
                hits.append(FileHit(path, name, NIX_EFFECTS))
        for name, dirs in tf_dirs.items():
            if any(_under(path, directory) for directory in dirs):
                hits.append(FileHit(path, name, TF_EFFECTS, why))
        if modules is not None:
            hits.extend(
                module_hits(path, modules, RootEffects(infra_root, auth_root, tf_dirs), why)
            )
        if len(hits) == found and shared_nixos_file(path, manifest):
            # a module no service claims (nixos/common.nix, say) may be imported by any host:
            # rebuilding every service is safe, deploying nothing could leave hosts stale
            hits.append(FileHit(path, None, NIX_EFFECTS))
    return hits


def shared_nixos_file(path: str, manifest: Manifest) -> bool:
    """A file under `nixos/` that names no service of the manifest, enabled or not."""
    parts = PurePosixPath(path).parts
    return (
        len(parts) >= 2
        and parts[0] == NIXOS_DIR
        and not (nixos_candidates(path) & set(manifest.all_services()))
    )


def is_ignored(path: str, config: PathsConfig) -> bool:
    """Whether `[paths] ignore` says the file never causes a deployment."""
    return any(glob_match(path, pattern) for pattern in config.ignore_globs)


@dataclass(frozen=True)
class RootEffects:
    """The terraform roots a changed file can count for, and whose steps they are."""

    infra_root: str | None
    auth_root: str | None
    service_dirs: Mapping[str, list[str]]

    def hits(self, path: str, root: str, why: str) -> list[FileHit]:
        """What a change to the module tree of `root` causes (a root can serve several)."""
        found = []
        if self.infra_root and normalize_dir(self.infra_root) == root:
            found.append(FileHit(path, None, INFRA_EFFECTS, why))
        if self.auth_root and normalize_dir(self.auth_root) == root:
            found.append(FileHit(path, None, AUTH_EFFECTS, why))
        for name, dirs in self.service_dirs.items():
            if root in {normalize_dir(directory) for directory in dirs}:
                found.append(FileHit(path, name, TF_EFFECTS, why))
        return found


def root_effects(
    manifest: Manifest,
    config: PathsConfig | None,
    infra_root: str | None = None,
    auth_root: str | None = None,
) -> RootEffects:
    """The roots of the head manifest as `match_files` sees them (config roots win)."""
    config = config or PathsConfig()
    dirs = {
        name: list(svc.interface.terraform.modules)
        for name, svc in manifest.enabled().items()
        if svc.interface.terraform is not None
    }
    return RootEffects(config.infra_root or infra_root, config.auth_root or auth_root, dirs)


def module_hits(path: str, modules: ModuleGraph, roots: RootEffects, why: str) -> list[FileHit]:
    """Hits of a file under a module directory, for every root using it, naming the chain."""
    found: list[FileHit] = []
    for usage in modules.users(path):
        if _under(path, usage.root):
            continue  # a file of the root itself: already counted
        text = "; ".join(part for part in (why, usage.describe()) if part)
        found.extend(roots.hits(path, usage.root, text))
    return found

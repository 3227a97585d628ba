"""Bot configuration: read once at start-up from NIXMOX_* variables and an optional TOML file.

One TOML file holds the settings (top level) and the runners' `[runners]` table; it is parsed
once, by `load_configuration`, and unknown keys anywhere in it are an error naming the key.
Unknown `NIXMOX_*` environment variables are only warned about: shells carry old variables.
"""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from runners.config import (
    RUNNERS_TABLE,
    ConfigError,
    PreviewConfig,
    RunnerConfig,
    unknown_setting,
)

__all__ = ["ConfigError", "Configuration", "Settings", "load_configuration", "load_settings"]

log = logging.getLogger(__name__)

ENV_PREFIX = "NIXMOX_"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///.nixmox/state.db"
# NIXMOX_* variables that are not settings but are read by name elsewhere
OTHER_VARIABLES = frozenset(
    {
        "NIXMOX_CONFIG",  # the CLI's --config
        "NIXMOX_LOCK_LEASE",  # the CLI's --lock-lease
        "NIXMOX_TESTDATA",  # ./dev test's cache of test data
    }
)
UNKNOWN_VARIABLE = "unknown environment variable {name} ignored{hint}"
CommaList = Annotated[list[str], NoDecode]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Settings(BaseSettings):
    """Every setting of `nixmox serve` and the CLI; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")
    file_table: ClassVar[dict[str, Any]] = {}

    # state and execution
    database_url: str = DEFAULT_DATABASE_URL
    runner: str = "real"  # real | simulate
    parallel: int = 4
    auto_rollback: bool = True
    manifest_path: str = "nixos/service-manifest.nix"
    public_url: str = "http://127.0.0.1:8080"
    workdir: Path = Path(".nixmox")
    dashboard_password: SecretStr | None = None  # Basic auth of the pages (bot.auth)
    # HTTP bodies (bot.limits): seconds to receive a whole body, bytes received at once
    github_body_timeout: float = Field(default=30.0, gt=0)
    slack_body_timeout: float = Field(default=10.0, gt=0)
    body_bytes_in_flight: int = Field(default=64 * 1024 * 1024, gt=0)
    # how many nice levels below the serving process its planning processes run (and what
    # they start: Nix evaluation), in `nixmox serve --role all|worker`; 0: the same priority
    worker_nice: int = Field(default=10, ge=0, le=19)

    # GitHub
    github_webhook_secret: SecretStr | None = None
    github_token: SecretStr | None = None
    github_app_id: int | None = None
    github_private_key: SecretStr | None = None
    github_private_key_file: Path | None = None
    github_api_url: str = "https://api.github.com"
    repo: str | None = None
    git_remote: str | None = None
    apply_on_merge: bool = True
    plan_forks: bool = False
    plan_branch_pushes: bool = True  # pushes to other branches get a `nixmox/plan` status
    plan_branches: CommaList = Field(default_factory=list)  # globs of those; empty: all
    environment: str = "homelab"
    apply_requirements: CommaList = Field(default_factory=lambda: ["approved", "mergeable"])
    # seconds a deployment's locks outlive a crashed process (renewed while it runs)
    lock_lease: timedelta = timedelta(seconds=60)
    merge_lock_wait: float = 600.0  # seconds a merge deploy waits for a locked service

    # Slack
    slack_signing_secret: SecretStr | None = None
    slack_bot_token: SecretStr | None = None
    slack_api_url: str = "https://slack.com/api/"
    slack_channel: str | None = None
    slack_approvers: CommaList = Field(default_factory=list)
    slack_deployers: CommaList = Field(default_factory=list)
    slack_allow_self_approval: bool = False
    approval_ttl: timedelta = timedelta(minutes=15)

    # monitoring (`nixmox serve`): health checks between deployments, drift, alerts
    monitor: bool = True
    alert_repeat: timedelta = timedelta(hours=6)  # at most one reminder per service per this
    drift_interval: timedelta = timedelta(minutes=15)
    # one worker runs the monitor: its store lock outlives a crashed leader by this much
    monitor_lease: timedelta = timedelta(seconds=30)
    # host previews in PR comments: NIXMOX_PREVIEW=true, or the TOML's [preview] table
    preview: Annotated[PreviewConfig, NoDecode] = Field(default_factory=PreviewConfig)

    @field_validator("preview", mode="before")
    @classmethod
    def _preview_flag(cls, value: Any) -> Any:
        """`NIXMOX_PREVIEW=true` (a flag) turns previews on with the table's defaults."""
        if isinstance(value, str | bool):
            return {"enabled": value}
        return value

    @field_validator(
        "apply_requirements", "slack_approvers", "slack_deployers", "plan_branches", mode="before"
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """Lists may be given as `a,b,c` in the environment."""
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator(
        "approval_ttl",
        "lock_lease",
        "alert_repeat",
        "drift_interval",
        "monitor_lease",
        mode="before",
    )
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """A bare number is seconds."""
        if isinstance(value, int | float) or (isinstance(value, str) and _is_number(value)):
            return timedelta(seconds=float(value))
        return value

    @property
    def github_enabled(self) -> bool:
        return self.github_webhook_secret is not None or self.repo is not None

    @property
    def slack_enabled(self) -> bool:
        return self.slack_signing_secret is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.file_table:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=cls.file_table))
        return tuple(sources)


@dataclass(frozen=True)
class Configuration:
    """Everything read at start-up: the settings, the runners' table, what to warn about."""

    settings: Settings
    runners: RunnerConfig
    warnings: list[str] = field(default_factory=list)


def read_table(config_file: Path) -> dict[str, Any]:
    """The TOML file's content (FileNotFoundError, or tomllib's error for bad syntax)."""
    if not config_file.is_file():
        raise FileNotFoundError(f"configuration file {config_file} does not exist")
    with config_file.open("rb") as handle:
        return tomllib.load(handle)


def check_top_level(table: Mapping[str, Any], file: str) -> None:
    """ConfigError naming every top-level key that is neither a setting nor `[runners]`."""
    known = [*Settings.model_fields, RUNNERS_TABLE]
    unknown = [key for key in table if key not in known]
    if unknown:
        raise ConfigError("\n".join(unknown_setting(file, "", key, known) for key in unknown))


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for every NIXMOX_* variable that is neither a setting nor read elsewhere."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | OTHER_VARIABLES
    suffixes = sorted(name.removeprefix(ENV_PREFIX) for name in known)
    found: list[str] = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known:
            # compared without the prefix, which every candidate shares
            close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1)
            hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
            found.append(UNKNOWN_VARIABLE.format(name=name, hint=hint))
    return found


def load_configuration(
    config_file: Path | None = None, *, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Configuration:
    """Read the TOML file once: environment variables win over it, `overrides` over both.

    Raises FileNotFoundError, ValueError for TOML syntax, ConfigError for unknown keys and
    pydantic's ValidationError for values of the wrong type.
    """
    table = read_table(config_file) if config_file is not None else {}
    file = str(config_file)
    check_top_level(table, file)
    runners = RunnerConfig.from_table(table.pop(RUNNERS_TABLE, {}), file)

    class FromFile(Settings):
        file_table = table

    settings = FromFile(**overrides)
    warnings = unknown_variables(os.environ if environ is None else environ)
    return Configuration(settings=settings, runners=runners, warnings=warnings)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """The settings alone (see `load_configuration`); unknown variables are logged as warnings."""
    configuration = load_configuration(config_file, **overrides)
    for warning in configuration.warnings:
        log.warning(warning)
    return configuration.settings

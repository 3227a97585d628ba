"""Bot configuration: read once at start-up from NIXMOX_* variables and an optional TOML file."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from runners.config import PreviewConfig

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///.nixmox/state.db"
CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Every setting of `nixmox serve` and the CLI; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="NIXMOX_", extra="ignore")
    toml_file: ClassVar[Path | None] = None

    # state and execution
    database_url: str = DEFAULT_DATABASE_URL
    runner: str = "real"  # real | simulate
    parallel: int = 4
    auto_rollback: bool = True
    manifest_path: str = "nixos/service-manifest.nix"
    public_url: str = "http://127.0.0.1:8080"
    workdir: Path = Path(".nixmox")
    dashboard_password: SecretStr | None = None  # Basic auth of the pages (bot.auth)

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

    @field_validator("approval_ttl", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """A bare number is seconds."""
        if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
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
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Environment variables win over the TOML file; explicit overrides win over both."""

    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"configuration file {config_file} does not exist")

    class FromFile(Settings):
        toml_file = config_file

    return FromFile(**overrides)

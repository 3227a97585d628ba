"""The NixMox service manifest as pydantic models (seed schema plus the real NixMox one)."""

from __future__ import annotations

from functools import cache, cached_property
from ipaddress import IPv4Address, IPv4Network
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROXY_ENTRY_KEYS = frozenset({"domain", "path", "upstream", "extra_config", "tls", "authz", "auth"})
SCALAR_TYPES = frozenset({int, str, bool, float, type(None), IPv4Address, IPv4Network})


class Open(BaseModel):
    """Base for manifest sections: unknown keys are kept (forward compatible) and reported."""

    model_config = ConfigDict(extra="allow", frozen=False, defer_build=True)


class Resources(Open):
    cores: int | None = None
    memory: int | None = None
    disk_gb: int | None = None


class Terraform(Open):
    modules: list[str] = Field(default_factory=list)
    targets: list[str] = Field(default_factory=list)
    variables: dict[str, Any] = Field(default_factory=dict)


class Database(Open):
    host: str | None = None
    name: str | None = None
    owner: str | None = None
    port: int | None = None
    additionaldbs: list[str] = Field(default_factory=list)


class Oidc(Open):
    client_id: str | None = None
    client_type: str | None = None
    redirect_uris: list[str] = Field(default_factory=list)
    scopes: list[str] = Field(default_factory=list)
    username_claim: str | None = None
    groups_claim: str | None = None


class Auth(Open):
    type: str | None = None
    provider: str | None = None
    oidc: Oidc | None = None
    forward_auth_upstream: str | None = None


class Proxy(Open):
    domain: str | None = None
    path: str | None = None
    upstream: str | None = None
    auth: Auth | None = None
    extra_config: str | None = None
    tls: bool | None = None
    authz: bool | None = None


class Health(Open):
    startup: str | None = None
    liveness: str | None = None
    interval: int | None = None
    timeout: int | None = None
    retries: int | None = None


class Interface(Open):
    terraform: Terraform | None = None
    db: Database | None = None
    dbs: dict[str, Database] | None = None
    proxy: Proxy | dict[str, Proxy] | None = None
    health: Health | None = None
    auth: Auth | None = None

    @field_validator("proxy", mode="before")
    @classmethod
    def _single_or_map(cls, value: Any) -> Any:
        """A proxy is one entry (`domain`, `upstream`, ...) or a map of named entries."""
        if isinstance(value, dict) and value and not (set(value) & PROXY_ENTRY_KEYS):
            return {name: Proxy.model_validate(entry) for name, entry in value.items()}
        if isinstance(value, dict):
            return Proxy.model_validate(value)
        return value

    def proxies(self) -> dict[str, Proxy]:
        """Every proxy entry by name (`""` for the single-proxy form)."""
        if self.proxy is None:
            return {}
        if isinstance(self.proxy, Proxy):
            return {"": self.proxy}
        return dict(self.proxy)

    def databases(self) -> dict[str, Database]:
        """Every database by name (`""` for the single `db` form)."""
        found: dict[str, Database] = {}
        if self.db is not None:
            found[""] = self.db
        found.update(self.dbs or {})
        return found

    def auths(self) -> dict[str, Auth]:
        """The service's auth block and every per-proxy auth block, keyed by field path."""
        found: dict[str, Auth] = {}
        if self.auth is not None:
            found["interface.auth"] = self.auth
        for name, proxy in self.proxies().items():
            if proxy.auth is not None:
                prefix = f"interface.proxy.{name}" if name else "interface.proxy"
                found[f"{prefix}.auth"] = proxy.auth
        return found


class Service(Open):
    enable: bool = True
    ip: IPv4Address | None = None
    hostname: str | None = None
    vmid: int | None = None
    version: str | None = None
    resources: Resources | None = None
    onboot: bool | None = None
    start: bool | None = None
    depends_on: list[str] = Field(default_factory=list)
    ports: list[int] = Field(default_factory=list)
    interface: Interface = Field(default_factory=Interface)


class Network(Open):
    domain: str | None = None
    dns_server: IPv4Address | None = None
    gateway: IPv4Address | None = None
    network_cidr: IPv4Network | None = None
    vlan_tag: int | None = None
    ssh_keys: dict[str, list[str]] = Field(default_factory=dict)
    outposts: dict[str, Any] = Field(default_factory=dict)


class Manifest(Open):
    network: Network = Field(default_factory=Network)
    core_services: dict[str, Service] = Field(default_factory=dict)
    services: dict[str, Service] = Field(default_factory=dict)
    deployment_phases: dict[str, list[str]] | None = None
    health_check_timeout: int | None = None
    retry_attempts: int | None = None
    retry_delay: int | None = None

    @model_validator(mode="after")
    def _enable_flags_are_booleans(self) -> Manifest:
        for key, value in (self.model_extra or {}).items():
            if key.startswith("enable_") and not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {type(value).__name__}")
        return self

    @cached_property
    def _all(self) -> dict[str, Service]:
        return {**self.core_services, **self.services}

    def all_services(self) -> dict[str, Service]:
        """Core and application services together, core first."""
        return self._all

    def is_core(self, name: str) -> bool:
        return name in self.core_services

    def enabled(self) -> dict[str, Service]:
        """The services that are planned (`enable = true`)."""
        return {name: svc for name, svc in self.all_services().items() if svc.enable}

    def flags(self) -> dict[str, bool]:
        """The top-level `enable_*` options."""
        extra = self.model_extra or {}
        return {key: value for key, value in extra.items() if key.startswith("enable_")}


def unknown_keys(model: BaseModel, path: str = "") -> list[str]:
    """Paths of every key the schema does not know, anywhere in the model."""
    found: list[str] = []
    stack: list[tuple[BaseModel, str]] = [(model, path)]
    while stack:
        current, prefix = stack.pop()
        for key in current.__pydantic_extra__ or {}:
            if not (isinstance(current, Manifest) and key.startswith("enable_")):
                found.append(f"{prefix}{key}")
        values = current.__dict__
        for name in _attributes_to_visit(type(current)):
            value = values.get(name)
            if isinstance(value, Open):
                stack.append((value, f"{prefix}{name}."))
            elif isinstance(value, dict) and value:
                stack.extend(
                    (item, f"{prefix}{name}.{key}.")
                    for key, item in value.items()
                    if isinstance(item, Open)
                )
    return sorted(found)


@cache
def _attributes_to_visit(cls: type[BaseModel]) -> tuple[str, ...]:
    """The attributes of a model class that may hold models.

    Fields of scalar types (most of them) are skipped: a 5,000-service manifest has 200,000.
    Cached properties are kept in `__dict__` too: public ones are visited as before, private
    ones (`_all`) are not manifest keys.
    """
    fields = [
        name for name, field in cls.__pydantic_fields__.items() if _holds_models(field.annotation)
    ]
    cached = {
        name
        for klass in cls.__mro__
        for name, attr in vars(klass).items()
        if isinstance(attr, cached_property) and not name.startswith("_")
    }
    return (*fields, *sorted(cached))


def _holds_models(annotation: Any) -> bool:
    """Whether a value of this type may be a model or contain one (unknown types: yes)."""
    if annotation in SCALAR_TYPES:
        return False
    args = get_args(annotation)
    return not args or any(_holds_models(arg) for arg in args)

"""Small manifests on one lab network, for the tests that build their own services."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.models import Manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_MANIFEST = REPO_ROOT / "manifests" / "small.nix"
MANIFEST_PATH = "nixos/service-manifest.nix"  # where the test repositories keep the manifest
LAB_NETWORK: dict[str, str] = {
    "domain": "lab.lan",
    "gateway": "10.20.0.1",
    "network_cidr": "10.20.0.0/24",
}
HEALTH = {"health": {"startup": "true"}}


def lab_data(
    services: dict[str, Any], core: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """The manifest's data: the lab network, these services (and core services), `top` keys."""
    data: dict[str, Any] = {"network": dict(LAB_NETWORK), "services": services, **top}
    if core is not None:
        data["core_services"] = core
    return data


def lab_manifest(
    services: dict[str, Any], core: dict[str, Any] | None = None, **top: Any
) -> Manifest:
    """A validated manifest of `lab_data`."""
    return Manifest.model_validate(lab_data(services, core, **top))

"""Synthetic manifests of any size, for benchmarks and scale tests."""

from __future__ import annotations

import json
from ipaddress import IPv4Network
from typing import Any

CORE = ("dns", "postgresql", "caddy", "authentik")
LAYER = 100


def synthetic_manifest(services: int, *, fan_in: int = 3) -> dict[str, Any]:
    """A valid manifest: the four core services and `services` applications in layers.

    Applications come in layers of 100; each depends on the core services and on `fan_in`
    applications of the layer before, so the plan has long chains as well as wide waves.
    """
    net = IPv4Network("10.0.0.0/8")
    hosts = net.hosts()
    next(hosts)  # the gateway
    core = {name: _service(name, next(hosts), 100 + index) for index, name in enumerate(CORE)}
    core["caddy"]["depends_on"] = ["dns"]
    core["authentik"]["depends_on"] = ["caddy"]
    core["authentik"]["interface"]["db"] = {"host": str(core["postgresql"]["ip"]), "name": "ak"}
    apps: dict[str, Any] = {}
    for index in range(services):
        name = f"app{index:05d}"
        svc = _service(name, next(hosts), 1000 + index)
        layer = index // LAYER
        earlier = [
            f"app{(layer - 1) * LAYER + (index * 7 + k * 13) % LAYER:05d}"
            for k in range(fan_in)
            if layer > 0
        ]
        svc["depends_on"] = ["caddy", "authentik", *earlier]
        svc["interface"]["db"] = {"host": core["postgresql"]["ip"], "name": name, "port": 5432}
        svc["interface"]["proxy"] = {"domain": f"{name}.lab.lan", "upstream": f"{svc['ip']}:80"}
        svc["interface"]["auth"] = {"type": "oidc", "provider": "authentik"}
        if index % 10 == 0:
            svc["interface"]["terraform"] = {"modules": [f"./terraform/{name}"]}
        apps[name] = svc
    return {
        "network": {"domain": "lab.lan", "gateway": "10.0.0.1", "network_cidr": str(net)},
        "core_services": core,
        "services": apps,
    }


def _service(name: str, ip: Any, vmid: int) -> dict[str, Any]:
    return {
        "ip": str(ip),
        "hostname": f"{name}.lab.lan",
        "vmid": vmid,
        "resources": {"cores": 1, "memory": 512, "disk_gb": 8},
        "depends_on": [],
        "interface": {
            "health": {"startup": f"systemctl is-active {name}", "liveness": "true"},
        },
    }


def to_nix(value: Any) -> str:
    """Nix source for JSON-like data (strings are JSON-escaped, which Nix accepts)."""
    if isinstance(value, dict):
        body = " ".join(f"{json.dumps(key)} = {to_nix(item)};" for key, item in value.items())
        return f"{{ {body} }}"
    if isinstance(value, list):
        return "[ " + " ".join(to_nix(item) for item in value) + " ]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value)).replace("${", "\\${")

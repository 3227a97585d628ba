"""The container image: built by `./dev image` (local stand-ins for the base images), loaded
into a private Docker daemon started here, and run (host or no networking only)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures_pg import free_port
from tests.processes import stop_process

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT.parent / "shared" / "fixtures" / "nixmox-upstream" / "service-manifest.nix"
DOCKER = "/usr/bin/docker"  # Debian's docker.io client, installed by `./dev image`
TAG = "nixmox:local"
BUILD_TIMEOUT = 1200


@dataclass
class Docker:
    """A private daemon: `run` is the docker client pointed at it."""

    env: dict[str, str]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DOCKER, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`./dev image FILE`, exactly as a user runs it."""
    out = tmp_path_factory.mktemp("image") / "nixmox.tar"
    result = subprocess.run(
        [str(ROOT / "dev"), "image", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, f"./dev image failed:\n{result.stderr[-4000:]}"
    assert out.stat().st_size > 50_000_000, "the archive is too small to hold the image"
    return out


def _stop(proc: subprocess.Popen[bytes], run: Path) -> None:
    stop_process(proc, timeout=20)
    subprocess.run(["umount", str(run / "exec" / "netns" / "default")], capture_output=True)
    shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(scope="module")
def docker(image_archive: Path) -> Iterator[Docker]:
    """A fresh daemon (own data root, no bridge, no iptables) with the archive loaded."""
    run = Path(tempfile.mkdtemp(prefix="nixmox-dockerd-test.", dir="/tmp"))
    sock = run / "docker.sock"
    proc = subprocess.Popen(
        [
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-masq=false",
            "--storage-driver=overlay2",
            f"--data-root={run / 'data'}",
            f"--exec-root={run / 'exec'}",
            f"--pidfile={run / 'dockerd.pid'}",
            f"--host=unix://{sock}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(run / "dockerd.log").open("wb"),
    )
    client = Docker({**os.environ, "DOCKER_HOST": f"unix://{sock}"})
    try:
        for _ in range(120):
            if client.run("info", check=False).returncode == 0:
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"dockerd did not start: {(run / 'dockerd.log').read_text()[-2000:]}")
        client.run("load", "-i", str(image_archive), timeout=300)
        yield client
    finally:
        _stop(proc, run)


def test_the_image_runs_nixmox_as_a_non_root_user(docker: Docker) -> None:
    version = docker.run("run", "--rm", "--network", "none", TAG, "--version")
    assert version.stdout.startswith("nixmox, version ")
    who = docker.run("run", "--rm", "--network", "none", "--entrypoint", "id", TAG, "-u")
    assert who.stdout.strip() == "10001"
    config = json.loads(docker.run("image", "inspect", TAG).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert "/var/lib/nixmox" in config["Volumes"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])


def test_the_image_holds_nix_terraform_git_and_ssh(docker: Docker) -> None:
    tools = docker.run(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", TAG, "-c",
        "nix-instantiate --eval -E '1 + 1' && terraform version && git --version && "
        "ssh -V 2>&1 && command -v nix-copy-closure && nix --version",
    )  # fmt: skip
    lines = tools.stdout.splitlines()
    assert lines[0] == "2"
    assert lines[1].startswith("Terraform v")
    assert any(line.startswith("git version") for line in lines)
    assert any(line.startswith("OpenSSH") for line in lines)
    assert any(line.endswith("/nix-copy-closure") for line in lines)


def test_validate_the_upstream_manifest_inside_the_image(docker: Docker) -> None:
    result = docker.run(
        "run", "--rm", "--network", "none",
        "-v", f"{UPSTREAM}:/manifest/service-manifest.nix:ro",
        TAG, "validate", "/manifest/service-manifest.nix",
    )  # fmt: skip
    assert "/manifest/service-manifest.nix: valid (11 services planned)" in result.stderr


def test_healthcheck_passes_on_the_default_command(docker: Docker) -> None:
    name = "nixmox-default-cmd"
    docker.run(
        "run", "-d", "--name", name, "--network", "none",
        "-e", "NIXMOX_GITHUB_WEBHOOK_SECRET=s3cret", "-e", "NIXMOX_GITHUB_TOKEN=t0ken",
        "-e", "NIXMOX_REPO=owner/nixmox", TAG,
    )  # fmt: skip
    try:
        test = json.loads(docker.run("inspect", name).stdout)[0]["Config"]["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        for _ in range(80):
            if docker.run("exec", name, *test[1:], check=False).returncode == 0:
                break
            time.sleep(0.25)
        else:
            logs = docker.run("logs", name, check=False)
            pytest.fail(f"the HEALTHCHECK command never passed:\n{logs.stderr[-2000:]}")
        listening = docker.run("exec", name, "cat", "/proc/net/tcp").stdout
        assert "00000000:1F90" in listening  # 0.0.0.0:8080
    finally:
        docker.run("rm", "-f", name, check=False)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _forged_webhook(url: str) -> int:
    body = b'{"zen": "forged"}'
    forged = hmac.new(b"not-the-secret", body, hashlib.sha256).hexdigest()
    request = urllib.request.Request(
        url,
        data=body,
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "ping",
            "X-GitHub-Delivery": "forged-1",
            "X-Hub-Signature-256": f"sha256={forged}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_serve_answers_the_host_health_200_and_forged_webhooks_401(docker: Docker) -> None:
    port = free_port()
    name = "nixmox-serve"
    docker.run(
        "run", "-d", "--name", name, "--network", "host",
        "-e", "NIXMOX_GITHUB_WEBHOOK_SECRET=s3cret", "-e", "NIXMOX_GITHUB_TOKEN=t0ken",
        "-e", "NIXMOX_REPO=owner/nixmox",
        TAG, "serve", "--host", "127.0.0.1", "--port", str(port),
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(80):
            try:
                if _get(f"{base}/healthz") == 200:
                    break
            except OSError:
                pass
            time.sleep(0.25)
        else:
            logs = docker.run("logs", name, check=False)
            pytest.fail(f"nixmox serve never answered /healthz:\n{logs.stderr[-2000:]}")
        assert _forged_webhook(f"{base}/github/webhook") == 401
        state = docker.run("exec", name, "ls", "/var/lib/nixmox").stdout.split()
        assert "state.db" in state
    finally:
        docker.run("rm", "-f", name, check=False)

"""Fixtures for the GitHub bot: the OpenAPI-checked fake GitHub, real webhook payloads adapted
to a test repository, signed deliveries, a real Git repository with a manifest, and the app."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git
import pytest
from openapi_core import Config, OpenAPI

from bot.config import Settings
from tests.fakes.github import DEFAULT_TOKEN, FakeGitHub
from tests.fixtures_manifests import MANIFEST_PATH, SMALL_MANIFEST

TEST_REPO = "octo-org/homelab"
WEBHOOK_SECRET = "It's a Secret to Everybody"
OPENAPI_FILE = ("octokit-openapi-23.0.2", "generated/api.github.com.json")
EXAMPLES_FILE = ("octokit-webhooks-examples-7.6.1", "api.github.com/index.json")


def testdata_dir() -> Path:
    return Path(os.environ.get("NIXMOX_TESTDATA", Path.home() / ".cache" / "nixmox-testdata"))


def testdata_file(folder: str, member: str) -> Path:
    path = testdata_dir() / folder / member
    assert path.is_file(), (
        f"missing test material {path}: run `./dev test` or "
        f"`.venv/bin/python tests/testdata.py {testdata_dir()}` (it fetches npm packages)"
    )
    return path


@pytest.fixture(scope="session")
def github_spec() -> dict[str, Any]:
    """GitHub's REST OpenAPI description (13 MB, loaded once per session)."""
    spec = json.loads(testdata_file(*OPENAPI_FILE).read_text())
    spec["servers"] = [{"url": "/"}]
    return spec


@pytest.fixture(scope="session")
def github_openapi(github_spec: dict[str, Any]) -> OpenAPI:
    return OpenAPI.from_dict(github_spec, config=Config(spec_validator_cls=None))


@pytest.fixture(scope="session")
def webhook_examples() -> dict[str, list[dict[str, Any]]]:
    """`@octokit/webhooks-examples`: event name → example payloads."""
    index = json.loads(testdata_file(*EXAMPLES_FILE).read_text())
    return {entry["name"]: entry["examples"] for entry in index}


@pytest.fixture
async def fake_github(
    github_openapi: OpenAPI, github_spec: dict[str, Any]
) -> AsyncIterator[FakeGitHub]:
    """A fake GitHub on 127.0.0.1; the test fails if the bot sent an off-spec request."""
    fake = FakeGitHub(github_openapi, github_spec["components"]["examples"], repo=TEST_REPO)
    await fake.start()
    yield fake
    await fake.stop()
    assert fake.violations == [], "requests that GitHub's OpenAPI description rejects"


def sign(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _replace_strings(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replace_strings(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace_strings(v, old, new) for k, v in value.items()}
    return value


@dataclass
class Payloads:
    """Real example payloads with the repository, SHAs, numbers and users replaced."""

    examples: dict[str, list[dict[str, Any]]]
    repo: str = TEST_REPO
    installation_id: int | None = None

    def example(self, event: str, action: str | None = None, *, want: str | None = None) -> Any:
        for candidate in self.examples[event]:
            if action is not None and candidate.get("action") != action:
                continue
            if want is not None and want not in candidate:
                continue
            return copy.deepcopy(candidate)
        raise LookupError(f"no {event} {action} example")

    def adapt(self, payload: dict[str, Any]) -> dict[str, Any]:
        original = payload["repository"]["full_name"]
        payload = _replace_strings(payload, original, self.repo)
        owner, name = self.repo.split("/")
        repository = payload["repository"]
        repository.update(
            full_name=self.repo,
            name=name,
            clone_url=f"https://github.com/{self.repo}.git",
            default_branch="main",
        )
        repository["owner"]["login"] = owner
        if self.installation_id is not None:
            payload["installation"] = {"id": self.installation_id, "node_id": "MDIz"}
        else:
            payload.pop("installation", None)
        return payload

    def pull_request(
        self,
        action: str,
        *,
        number: int,
        head_sha: str,
        base_sha: str,
        author: str = "alice",
        fork: bool = False,
        head_ref: str = "feature",
    ) -> dict[str, Any]:
        payload = self.adapt(self.example("pull_request", action))
        pull = payload["pull_request"]
        payload["number"] = number
        pull.update(number=number, draft=False, state="open")
        pull["user"]["login"] = author
        pull["head"].update(sha=head_sha, ref=head_ref)
        pull["base"].update(sha=base_sha, ref="main")
        pull["base"]["repo"] = copy.deepcopy(payload["repository"])
        head_repo = copy.deepcopy(payload["repository"])
        if fork:
            head_repo.update(id=head_repo["id"] + 1, full_name=f"{author}/homelab", fork=True)
        pull["head"]["repo"] = head_repo
        if action == "synchronize":
            payload["before"], payload["after"] = base_sha, head_sha
        return payload

    def issue_comment(
        self, *, number: int, body: str, user: str = "bob", comment_id: int = 555
    ) -> dict[str, Any]:
        payload = self.adapt(self.example("issue_comment", "created"))
        payload["issue"]["number"] = number
        payload["issue"]["pull_request"] = {
            "url": f"https://api.github.com/repos/{self.repo}/pulls/{number}",
            "html_url": f"https://github.com/{self.repo}/pull/{number}",
            "diff_url": f"https://github.com/{self.repo}/pull/{number}.diff",
            "patch_url": f"https://github.com/{self.repo}/pull/{number}.patch",
        }
        payload["comment"].update(id=comment_id, body=body)
        payload["comment"]["user"].update(login=user, type="User")
        payload["sender"]["login"] = user
        return payload

    def push(self, *, before: str, after: str, branch: str = "main") -> dict[str, Any]:
        payload = self.adapt(self.example("push", want="head_commit"))
        payload.update(
            ref=f"refs/heads/{branch}",
            before=before,
            after=after,
            created=False,
            deleted=False,
            base_ref=None,
        )
        if isinstance(payload.get("head_commit"), dict):
            payload["head_commit"]["id"] = after
        payload.setdefault("sender", {"login": "alice", "type": "User"})
        payload["sender"]["login"] = "alice"
        return payload

    def ping(self) -> dict[str, Any]:
        return self.adapt(self.example("ping", want="repository"))


@pytest.fixture
def payloads(webhook_examples: dict[str, list[dict[str, Any]]]) -> Payloads:
    return Payloads(webhook_examples)


def delivery_headers(
    event: str, body: bytes, *, secret: str = WEBHOOK_SECRET, delivery: str | None = None
) -> dict[str, str]:
    """What GitHub sends with a delivery."""
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(body, secret),
        "User-Agent": "GitHub-Hookshot/test",
    }


@dataclass
class ManifestRepo:
    """A real Git repository (gitpython) with the manifest at nixos/service-manifest.nix."""

    path: Path
    repo: git.Repo

    def manifest(self) -> str:
        return (self.path / MANIFEST_PATH).read_text()

    def commit(self, text: str, message: str, *, branch: str = "main") -> str:
        """Write the manifest on `branch` (created from main when new) and commit it."""
        if branch not in [head.name for head in self.repo.heads]:
            self.repo.create_head(branch, self.repo.heads.main.commit)
        self.repo.heads[branch].checkout()
        target = self.path / MANIFEST_PATH
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        self.repo.index.add([MANIFEST_PATH])
        sha = self.repo.index.commit(message).hexsha
        self.repo.heads.main.checkout()
        return sha

    def merge(self, branch: str) -> str:
        """Fast-forward main to `branch` (what a merge button does, minus the merge commit)."""
        self.repo.heads.main.checkout()
        self.repo.git.merge("--ff-only", branch)
        return self.repo.heads.main.commit.hexsha


def change_liveness(text: str, service: str = "gitea", command: str = "true") -> str:
    """The small manifest with one service's liveness command changed (verify only)."""
    marker = 'liveness = "curl -fsS http://localhost:3000/"'
    assert service == "gitea" and marker in text
    return text.replace(marker, f'liveness = "{command}"')


def add_port(text: str, port: int = 3001) -> str:
    """gitea gets another port (its nix step and verify)."""
    return text.replace("ports = [ 3000 ];", f"ports = [ 3000 {port} ];")


def break_manifest(text: str) -> str:
    """Two validation errors: an unknown dependency and a duplicate IP."""
    text = text.replace('depends_on = [ "postgresql" ];', 'depends_on = [ "postgresql" "nope" ];')
    return text.replace('ip = "10.20.0.3"', 'ip = "10.20.0.2"')


@pytest.fixture
def manifest_repo(tmp_path: Path) -> Iterator[ManifestRepo]:
    path = tmp_path / "homelab"
    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as config:
        config.set_value("user", "name", "Test")
        config.set_value("user", "email", "test@example.invalid")
    made = ManifestRepo(path, repo)
    target = path / MANIFEST_PATH
    target.parent.mkdir(parents=True)
    shutil.copy(SMALL_MANIFEST, target)
    repo.index.add([MANIFEST_PATH])
    repo.index.commit("homelab: postgresql and gitea")
    yield made
    repo.close()


def bot_settings(tmp_path: Path, api_url: str, remote: Path, **overrides: Any) -> Settings:
    """Settings for a bot talking to the fake GitHub and cloning from a local repository."""
    values: dict[str, Any] = {
        "github_webhook_secret": WEBHOOK_SECRET,
        "github_token": DEFAULT_TOKEN,
        "github_api_url": api_url,
        "repo": TEST_REPO,
        **local_bot_values(tmp_path, remote),
    }
    values.update(overrides)
    return Settings(**values)


def local_bot_values(tmp_path: Path, remote: Path) -> dict[str, Any]:
    """What every test bot shares: a local remote, SQLite, simulated runners, the test URL."""
    return {
        "git_remote": str(remote),
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}",
        "runner": "simulate",
        "workdir": tmp_path / "work",
        "public_url": "http://bot.test",
        "manifest_path": MANIFEST_PATH,
    }


@dataclass
class Bot:
    """The bot's application in-process (pytest-aiohttp test client), jobs run on demand."""

    app: Any
    client: Any
    fake: FakeGitHub
    settings: Settings

    @property
    def ctx(self) -> Any:
        from bot.context import CONTEXT

        return self.app[CONTEXT]

    async def deliver(
        self,
        event: str,
        payload: dict[str, Any],
        *,
        delivery: str | None = None,
        secret: str = WEBHOOK_SECRET,
    ) -> Any:
        body = json.dumps(payload).encode()
        headers = delivery_headers(event, body, secret=secret, delivery=delivery)
        return await self.client.post("/github/webhook", data=body, headers=headers)

    async def drain(self) -> None:
        await self.ctx.require_jobs().drain()


@pytest.fixture
def make_bot(
    aiohttp_client: Any, tmp_path: Path, fake_github: FakeGitHub, manifest_repo: ManifestRepo
) -> Any:
    """`await make_bot(**settings)`: the app with a store in tmp_path, talking to the fake."""

    async def make(*, runner_config: Any = None, **overrides: Any) -> Bot:
        from bot.app import build_app
        from bot.github.client import RetryPolicy

        settings = bot_settings(tmp_path, fake_github.url, manifest_repo.path, **overrides)
        app = build_app(
            settings,
            start_worker=False,
            github_policy=RetryPolicy(base_delay=0.001, max_delay=0.01),
            runner_config=runner_config or fast_runners(),
        )
        client = await aiohttp_client(app)
        return Bot(app, client, fake_github, settings)

    return make


def fast_runners(fail: list[str] | None = None) -> Any:
    """Simulated runners at 1/1000 of their usual durations."""
    from runners.config import RunnerConfig

    return RunnerConfig.model_validate({"simulate": {"scale": 0.001, "fail": fail or []}})

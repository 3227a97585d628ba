"""The GitHub client: bounded retries with backoff, and GitHub App installation tokens."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import gidgethub
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bot.config import Settings
from bot.github.client import (
    TOKEN_RENEW_MARGIN,
    GitHubClientFactory,
    GitHubUnavailable,
    RetryPolicy,
)
from bot.github.rest import Repo, StatusState, set_status
from tests.fakes.github import DEFAULT_TOKEN, Failure, FakeGitHub
from tests.fixtures_github import TEST_REPO

SHA = "f" * 40
REPO = Repo.parse(TEST_REPO)
APP_ID = 31337


class Sleeps:
    """Records the delays the client asks for instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as session:
        yield session


def factory(
    fake: FakeGitHub, session: aiohttp.ClientSession, sleeps: Sleeps, **settings: Any
) -> GitHubClientFactory:
    values: dict[str, Any] = {"github_api_url": fake.url, "repo": TEST_REPO}
    values.update(settings or {"github_token": DEFAULT_TOKEN})
    policy = RetryPolicy(attempts=4, base_delay=1.0, max_delay=8.0, jitter=0.0)
    return GitHubClientFactory(Settings(**values), session, policy=policy, sleeper=sleeps)


async def post_status(gh: Any) -> None:
    await set_status(gh, REPO, SHA, StatusState.SUCCESS, "nixmox/plan", "ok")


@pytest.mark.parametrize(
    ("kind", "retry_after", "expected_delays"),
    [
        (Failure.SERVER_ERROR, None, [1.0, 2.0]),
        (Failure.SECONDARY_LIMIT, 7, [7.0, 7.0]),
        (Failure.SECONDARY_LIMIT, None, [1.0, 2.0]),
        (Failure.TOO_MANY, 3, [3.0, 3.0]),
    ],
    ids=["5xx-backoff", "secondary-retry-after", "secondary-backoff", "429-retry-after"],
)
async def test_transient_failures_are_retried(
    fake_github: FakeGitHub,
    session: aiohttp.ClientSession,
    kind: Failure,
    retry_after: int | None,
    expected_delays: list[float],
) -> None:
    sleeps = Sleeps()
    gh = await factory(fake_github, session, sleeps).client()
    fake_github.fail_next(2, kind, retry_after=retry_after)
    await post_status(gh)
    assert sleeps.delays == expected_delays
    assert [r.status for r in fake_github.calls("POST")][-1] == 201
    assert len(fake_github.statuses) == 1


async def test_retries_are_bounded(fake_github: FakeGitHub, session: aiohttp.ClientSession) -> None:
    sleeps = Sleeps()
    gh = await factory(fake_github, session, sleeps).client()
    fake_github.fail_next(100, Failure.SERVER_ERROR)
    with pytest.raises(gidgethub.GitHubBroken):
        await post_status(gh)
    assert len(fake_github.calls("POST")) == 4
    assert sleeps.delays == [1.0, 2.0, 4.0]


async def test_an_exhausted_quota_is_waited_for_only_when_it_resets_soon(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    sleeps = Sleeps()
    gh = await factory(fake_github, session, sleeps).client()
    fake_github.fail_next(1, Failure.RATE_LIMIT, retry_after=5)
    await post_status(gh)
    assert len(sleeps.delays) == 1 and 3 <= sleeps.delays[0] <= 6
    fake_github.fail_next(1, Failure.RATE_LIMIT, retry_after=3600)
    with pytest.raises(gidgethub.RateLimitExceeded):
        await post_status(gh)
    assert len(sleeps.delays) == 1


async def test_client_errors_are_not_retried(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    sleeps = Sleeps()
    gh = await factory(fake_github, session, sleeps).client()
    with pytest.raises(gidgethub.BadRequest) as raised:
        await gh.getitem("/repos/{owner}/{repo}/pulls/{number}", url_vars=REPO.vars(number=404))
    assert int(raised.value.status_code) == 404
    assert sleeps.delays == []


async def test_lost_connections_are_retried(session: aiohttp.ClientSession) -> None:
    sleeps = Sleeps()
    settings = Settings(github_api_url="http://127.0.0.1:9", github_token="t", repo=TEST_REPO)
    policy = RetryPolicy(attempts=3, base_delay=0.5, jitter=0.0)
    gh = await GitHubClientFactory(settings, session, policy=policy, sleeper=sleeps).client()
    with pytest.raises(aiohttp.ClientConnectionError):
        await post_status(gh)
    assert sleeps.delays == [0.5, 1.0]


async def test_requests_use_relative_templates_on_the_configured_api_url(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    gh = await factory(fake_github, session, Sleeps()).client()
    await post_status(gh)
    (call,) = fake_github.calls("POST")
    assert call.path == f"/repos/{TEST_REPO}/statuses/{SHA}"


async def test_no_credentials_is_a_clear_error(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    made = GitHubClientFactory(Settings(github_api_url=fake_github.url, repo=TEST_REPO), session)
    with pytest.raises(GitHubUnavailable, match="NIXMOX_GITHUB_TOKEN"):
        await made.client()


@pytest.fixture(scope="module")
def app_key() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private, public


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_app_installation_tokens_are_minted_cached_and_renewed(
    fake_github: FakeGitHub,
    session: aiohttp.ClientSession,
    app_key: tuple[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    private, public = app_key
    fake_github.app_id, fake_github.app_public_key = APP_ID, public
    fake_github.tokens.clear()
    key_file = tmp_path / "app.pem"
    key_file.write_text(private)
    clock = Clock()
    settings = Settings(
        github_api_url=fake_github.url,
        repo=TEST_REPO,
        github_app_id=APP_ID,
        github_private_key_file=key_file,
    )
    made = GitHubClientFactory(settings, session, clock=clock)

    await post_status(await made.client(fake_github.installation_id))
    await post_status(await made.client(fake_github.installation_id))
    assert len(fake_github.issued_tokens) == 1  # cached
    clock.now += 3600 - TOKEN_RENEW_MARGIN + 1  # shortly before GitHub's expiry
    await post_status(await made.client(fake_github.installation_id))
    assert len(fake_github.issued_tokens) == 2
    # work that did not come from a webhook finds the installation on the repository
    token = await made.token(None)
    assert token == fake_github.issued_tokens[-1]
    assert fake_github.calls("GET", r"/installation$") != []
    for issued in fake_github.issued_tokens:
        assert issued not in caplog.text
    assert private.splitlines()[1] not in caplog.text


async def test_an_app_without_its_key_is_a_clear_error(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    settings = Settings(github_api_url=fake_github.url, repo=TEST_REPO, github_app_id=APP_ID)
    with pytest.raises(GitHubUnavailable, match="NIXMOX_GITHUB_PRIVATE_KEY"):
        await GitHubClientFactory(settings, session).client(1)


async def test_the_bot_login_of_a_token_is_its_user_asked_once(
    fake_github: FakeGitHub, session: aiohttp.ClientSession
) -> None:
    fake_github.bot_login = "homelab-bot"
    made = factory(fake_github, session, Sleeps())
    assert await made.bot_login() == "homelab-bot"
    assert await made.bot_login() == "homelab-bot"
    assert len(fake_github.calls("GET", r"^/user$")) == 1


async def test_the_bot_login_of_an_app_is_its_slug_with_bot(
    fake_github: FakeGitHub,
    session: aiohttp.ClientSession,
    app_key: tuple[str, str],
) -> None:
    private, public = app_key
    fake_github.app_id, fake_github.app_public_key = APP_ID, public
    settings = Settings(
        github_api_url=fake_github.url,
        repo=TEST_REPO,
        github_app_id=APP_ID,
        github_private_key=private,
    )
    made = GitHubClientFactory(settings, session)
    assert await made.bot_login(fake_github.installation_id) == "nixmox[bot]"
    assert await made.bot_login() == "nixmox[bot]"
    (call,) = fake_github.calls("GET", r"^/app$")
    assert call.status == 200
    assert fake_github.calls("GET", r"^/user$") == []

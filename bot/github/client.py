"""GitHub REST access: gidgethub with bounded retries, and token or GitHub App authentication.

Every call uses a relative URL template (`/repos/{owner}/{repo}/...`) so `NIXMOX_GITHUB_API_URL`
applies to all of them (absolute URLs from payloads would bypass it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import gidgethub
import gidgethub.aiohttp
from gidgethub.apps import get_installation_access_token, get_jwt

from bot.config import Settings

log = logging.getLogger(__name__)

USER_AGENT = "nixmox-bot"
API_VERSION = "2022-11-28"
# installation tokens live one hour; renew them this long before GitHub says they expire
TOKEN_RENEW_MARGIN = 300.0
SECONDARY_LIMIT_HINT = "secondary rate limit"

Sleep = Callable[[float], Awaitable[None]]


class GitHubUnavailable(Exception):
    """GitHub is not configured well enough to make this call (no credentials, no repo)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for 5xx, secondary rate limits and exhausted quotas."""

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 30.0
    # a primary quota that resets further away than this is not waited for
    max_rate_limit_wait: float = 60.0
    jitter: float = 0.1

    def backoff(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based), with a little jitter."""
        delay = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return delay * (1 + random.uniform(0, self.jitter))


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """The `retry-after` header in seconds, when GitHub sent one."""
    if not headers:
        return None
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def retry_delay(exc: gidgethub.HTTPException, attempt: int, policy: RetryPolicy) -> float | None:
    """How long to wait before retrying after `exc`, or None when it must not be retried."""
    if attempt >= policy.attempts:
        return None
    status = int(exc.status_code)
    headers = getattr(exc, "headers", None)
    asked = retry_after(headers)
    if isinstance(exc, gidgethub.RateLimitExceeded):
        limit = exc.rate_limit  # (a RateLimit is falsy while it is exhausted: compare to None)
        reset = limit.reset_datetime.timestamp() - time.time() if limit is not None else 0.0
        wait = asked if asked is not None else max(0.0, reset)
        return wait if wait <= policy.max_rate_limit_wait else None
    if isinstance(exc, gidgethub.GitHubBroken) or status == 429:
        wait = asked if asked is not None else policy.backoff(attempt)
        return min(wait, policy.max_rate_limit_wait)
    if status == 403 and (asked is not None or SECONDARY_LIMIT_HINT in str(exc).lower()):
        wait = asked if asked is not None else policy.backoff(attempt)
        return min(wait, policy.max_rate_limit_wait)
    return None


class GitHubClient(gidgethub.aiohttp.GitHubAPI):
    """gidgethub's aiohttp client plus bounded retries (HTTP errors and lost connections)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        oauth_token: str | None,
        base_url: str,
        policy: RetryPolicy | None = None,
        sleeper: Sleep | None = None,
    ) -> None:
        super().__init__(session, USER_AGENT, oauth_token=oauth_token, base_url=base_url)
        self.policy = policy or RetryPolicy()
        self._sleeper = sleeper or asyncio.sleep
        self.retries = 0

    async def sleep(self, seconds: float) -> None:
        await self._sleeper(seconds)

    async def handle_rate_limit_error(
        self, *, method: str, url: str, exception: gidgethub.HTTPException, attempt: int
    ) -> bool:
        delay = retry_delay(exception, attempt, self.policy)
        if delay is None:
            return False
        self.retries += 1
        log.warning(
            "GitHub answered %s to %s %s; retry %d in %.1f s",
            int(exception.status_code),
            method,
            _path_only(url),
            attempt,
            delay,
        )
        await self.sleep(delay)
        return True

    async def _request(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes = b""
    ) -> tuple[int, Mapping[str, str], bytes]:
        headers = {**headers, "x-github-api-version": API_VERSION}
        attempt = 0
        while True:
            attempt += 1
            try:
                return await super()._request(method, url, headers, body)
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                if attempt >= self.policy.attempts:
                    raise
                delay = self.policy.backoff(attempt)
                self.retries += 1
                log.warning(
                    "GitHub request %s %s failed (%s); retry in %.1f s",
                    method,
                    _path_only(url),
                    type(exc).__name__,
                    delay,
                )
                await self.sleep(delay)


def _path_only(url: str) -> str:
    """A URL for logs: path only (no query string, where tokens could hide)."""
    return url.split("?", 1)[0]


@dataclass
class CachedToken:
    token: str
    renew_at: float


class GitHubClientFactory:
    """Clients authenticated as the configured token, or as a GitHub App installation.

    Installation tokens are cached per installation until `TOKEN_RENEW_MARGIN` seconds before
    GitHub's `expires_at`; a lock per installation keeps concurrent jobs from minting twice.
    """

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        policy: RetryPolicy | None = None,
        sleeper: Sleep | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.session = session
        self.policy = policy or RetryPolicy()
        self.sleeper = sleeper
        self.clock = clock
        self.base_url = settings.github_api_url.rstrip("/")
        self._tokens: dict[int, CachedToken] = {}
        self._locks: dict[int, asyncio.Lock] = {}
        self._private_key: str | None = None
        self._bot_login: str | None = None
        self._login_lock = asyncio.Lock()

    @property
    def uses_app(self) -> bool:
        return self.settings.github_app_id is not None

    def _client(self, token: str | None) -> GitHubClient:
        return GitHubClient(
            self.session,
            oauth_token=token,
            base_url=self.base_url,
            policy=self.policy,
            sleeper=self.sleeper,
        )

    def private_key(self) -> str:
        """The App's PEM key, from the setting or its file (read once)."""
        if self._private_key is None:
            if self.settings.github_private_key is not None:
                self._private_key = self.settings.github_private_key.get_secret_value()
            elif self.settings.github_private_key_file is not None:
                self._private_key = self.settings.github_private_key_file.read_text()
            else:
                raise GitHubUnavailable(
                    "NIXMOX_GITHUB_APP_ID is set but neither NIXMOX_GITHUB_PRIVATE_KEY nor "
                    "NIXMOX_GITHUB_PRIVATE_KEY_FILE is"
                )
        return self._private_key

    def app_jwt(self) -> str:
        return get_jwt(app_id=str(self.settings.github_app_id), private_key=self.private_key())

    async def token(self, installation_id: int | None = None) -> str | None:
        """The token to call GitHub (and clone) with; None when no credentials are configured."""
        if not self.uses_app:
            secret = self.settings.github_token
            return secret.get_secret_value() if secret is not None else None
        if installation_id is None:
            installation_id = await self.repo_installation()
        return await self._installation_token(installation_id)

    async def repo_installation(self) -> int:
        """The App's installation on NIXMOX_REPO (for work that did not come from a webhook)."""
        owner, repo = split_repo(self.settings.repo)
        data = await self._client(None).getitem(
            "/repos/{owner}/{repo}/installation",
            {"owner": owner, "repo": repo},
            jwt=self.app_jwt(),
        )
        return int(data["id"])

    async def _installation_token(self, installation_id: int) -> str:
        lock = self._locks.setdefault(installation_id, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(installation_id)
            if cached is not None and self.clock() < cached.renew_at:
                return cached.token
            data = await get_installation_access_token(
                self._client(None),
                installation_id=str(installation_id),
                app_id=str(self.settings.github_app_id),
                private_key=self.private_key(),
            )
            expires = _parse_time(data.get("expires_at"))
            renew_at = (expires if expires is not None else self.clock() + 3600) - (
                TOKEN_RENEW_MARGIN
            )
            self._tokens[installation_id] = CachedToken(data["token"], renew_at)
            return str(data["token"])

    async def bot_login(self, installation_id: int | None = None) -> str:
        """The login the bot comments as (asked once, then cached).

        A token belongs to a user (`GET /user`); a GitHub App comments as `<slug>[bot]`, and only
        the App's JWT may read its slug (`GET /app`).
        """
        async with self._login_lock:
            if self._bot_login is None:
                if self.uses_app:
                    app = await self._client(None).getitem("/app", jwt=self.app_jwt())
                    self._bot_login = f"{app['slug']}[bot]"
                else:
                    user = await (await self.client(installation_id)).getitem("/user")
                    self._bot_login = str(user["login"])
            return self._bot_login

    async def client(self, installation_id: int | None = None) -> GitHubClient:
        """A client for REST calls on behalf of the bot."""
        token = await self.token(installation_id)
        if token is None:
            raise GitHubUnavailable(
                "no GitHub credentials: set NIXMOX_GITHUB_TOKEN, or NIXMOX_GITHUB_APP_ID and "
                "its private key"
            )
        return self._client(token)


def _parse_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def split_repo(full_name: str | None) -> tuple[str, str]:
    """`owner/name` → (owner, name); a clear error when NIXMOX_REPO is missing or malformed."""
    if not full_name or full_name.count("/") != 1 or "" in full_name.split("/"):
        raise GitHubUnavailable(f"NIXMOX_REPO must be owner/name, not {full_name!r}")
    owner, name = full_name.split("/")
    return owner, name

"""The bot's Git access to the manifest repository: `ls-remote` and a bare cache clone.

The cache is fetched by commit id for each plan; `ls_remote` reads a remote's refs.

The bot never checks anything out: the planner reads trees from this bare repository. When the
remote is GitHub, the token goes in an HTTP header passed through the environment (never on a
command line or in a URL, where `ps` and error messages would show it).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import git

from bot.config import Settings

FETCH_TIMEOUT = 300.0
LS_REMOTE_TIMEOUT = 60.0
SHA_PATTERN = re.compile(r"^[0-9a-f]{40}$")
ZERO_SHA = "0" * 40
BRANCH_REFS = "refs/nixmox/branches/"  # where the cache keeps the tips of fetched branches
# every object received is checked: Git refuses trees with duplicate, `..` or `/` names
FSCK_OPTIONS = ("-c", "fetch.fsckObjects=true", "-c", "transfer.fsckObjects=true")
FSCK_ERROR = re.compile(r"^error: object ([0-9a-f]+): (\w+): (.*)$")
FSCK_MESSAGE = "the fetched objects fail Git's checks (fsck): object {object}: {check}: {detail}"


class GitFetchError(Exception):
    """The commits to plan could not be fetched (message safe to show: no credentials)."""


@dataclass(frozen=True)
class Remote:
    """Where to fetch from, and the token to present to it (HTTPS GitHub remotes only)."""

    url: str
    token: str | None = None

    def environment(self) -> dict[str, str]:
        """Git settings for this fetch, passed as GIT_CONFIG_* variables."""
        env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
        if self.token:
            basic = base64.b64encode(f"x-access-token:{self.token}".encode()).decode()
            env |= {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "http.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
            }
        return env


def git_command(*args: str) -> list[str]:
    """The command line of a git call that talks to a remote (objects checked on receipt)."""
    return ["git", *FSCK_OPTIONS, *args]


def remote_for(settings: Settings, clone_url: str | None, token: str | None) -> Remote:
    """NIXMOX_GIT_REMOTE wins over the payload's clone URL; tokens only go to HTTPS remotes."""
    url = settings.git_remote or clone_url
    if not url:
        raise GitFetchError("no clone URL in the event and NIXMOX_GIT_REMOTE is not set")
    authenticate = token is not None and urlparse(url).scheme == "https"
    return Remote(url=url, token=token if authenticate else None)


def is_sha(value: str | None) -> bool:
    return bool(value) and bool(SHA_PATTERN.match(value or "")) and value != ZERO_SHA


class GitCache:
    """One bare repository under the work directory; fetches are serialised by a lock."""

    def __init__(self, path: Path, *, timeout: float = FETCH_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = asyncio.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> GitCache:
        name = (settings.repo or "repo").replace("/", "__")
        return cls(settings.workdir / "git" / f"{name}.git")

    def repo(self) -> git.Repo:
        if not (self.path / "HEAD").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            return git.Repo.init(self.path, bare=True)
        return git.Repo(self.path)

    def has_commit(self, sha: str) -> bool:
        try:
            return self.repo().commit(sha).type == "commit"
        except (ValueError, git.BadName, git.GitCommandError):
            return False

    async def fetch(self, remote: Remote, shas: list[str], refs: list[str] | None = None) -> None:
        """Make every commit in `shas` present, fetching by id (then by `refs` if needed)."""
        wanted = sorted({sha for sha in shas if is_sha(sha)})
        async with self._lock:
            missing = [sha for sha in wanted if not await asyncio.to_thread(self.has_commit, sha)]
            if not missing:
                return
            error = await self._git_fetch(remote, missing)
            still = [sha for sha in missing if not await asyncio.to_thread(self.has_commit, sha)]
            if still and refs:
                error = await self._git_fetch(remote, refs) or error
                still = [s for s in still if not await asyncio.to_thread(self.has_commit, s)]
            if still:
                raise GitFetchError(
                    f"could not fetch {', '.join(s[:12] for s in still)} from "
                    f"{safe_url(remote.url)}" + (f": {error}" if error else "")
                )
            # keep fetched commits reachable, so `git gc` never drops a planned revision
            await asyncio.to_thread(self._pin, missing)

    async def branch_tip(self, remote: Remote, branch: str) -> str:
        """Fetch `branch` from the remote into `refs/nixmox/branches/` and return its commit."""
        local = f"{BRANCH_REFS}{branch}"
        if not await asyncio.to_thread(self._valid_ref, local):
            raise GitFetchError(f"{branch!r} is not a valid branch name")
        async with self._lock:
            error = await self._git_fetch(remote, [f"+refs/heads/{branch}:{local}"])
            if error is not None:
                raise GitFetchError(
                    f"could not fetch branch {branch} from {safe_url(remote.url)}: {error}"
                )
            return str(await asyncio.to_thread(lambda: self.repo().commit(local).hexsha))

    def _valid_ref(self, ref: str) -> bool:
        """Git's own rules for a ref name (`git check-ref-format`), no option-like names."""
        if ref.startswith("-") or any(ord(char) < 32 for char in ref):
            return False
        try:
            self.repo().git.check_ref_format(ref)
        except git.GitCommandError:
            return False
        return True

    def _pin(self, shas: list[str]) -> None:
        repo = self.repo()
        for sha in shas:
            repo.git.update_ref(f"refs/nixmox/seen/{sha}", sha)

    async def _git_fetch(self, remote: Remote, what: list[str]) -> str | None:
        """Run one `git fetch`; return its (credential-free) error text, None on success."""
        await asyncio.to_thread(self.repo)
        env = git_environment(remote)
        proc = await asyncio.create_subprocess_exec(
            *git_command(
                "-C", str(self.path), "fetch", "--no-tags", "--quiet", "--no-write-fetch-head"
            ),
            remote.url,
            *what,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        try:
            _, stderr = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"git fetch took longer than {self.timeout:g} s"
        if proc.returncode == 0:
            return None
        text = stderr.decode(errors="replace").strip().splitlines()
        message = fetch_failure(text) or f"git fetch exited {proc.returncode}"
        return redact(message, remote.token)

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """Whether `ancestor` is contained in `descendant`'s history (or is it)."""
        repo = self.repo()
        # GitPython hints Commit but passes both to `git merge-base` as given: any rev works
        return bool(repo.is_ancestor(ancestor, descendant))  # type: ignore[arg-type]  # str rev

    def merge_base(self, a: str, b: str) -> str | None:
        """The best common ancestor of two commits (what a PR's diff is taken against)."""
        try:
            bases = self.repo().merge_base(a, b)
        except git.GitCommandError:
            return None
        return bases[0].hexsha if bases else None


def git_environment(remote: Remote) -> dict[str, str]:
    """The environment a `git` talking to `remote` runs with (our own plus its settings)."""
    return {**os.environ, **remote.environment()}


async def ls_remote(
    remote: Remote, options: list[str], patterns: list[str] | None = None
) -> dict[str, str]:
    """`git ls-remote OPTIONS URL PATTERNS`: ref name → commit id (GitFetchError if unreadable)."""
    args = git_command("ls-remote", *options, remote.url, *(patterns or []))
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=git_environment(remote),
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), LS_REMOTE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise GitFetchError(f"{safe_url(remote.url)} did not answer in time") from None
    if proc.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else f"git ls-remote exited {proc.returncode}"
        raise GitFetchError(f"cannot read {safe_url(remote.url)}: {redact(detail, remote.token)}")
    refs: dict[str, str] = {}
    for line in stdout.decode(errors="replace").splitlines():
        value, _, name = line.partition("\t")
        if not value.startswith("ref:"):
            refs[name.strip()] = value.strip()
    return refs


def fetch_failure(lines: list[str]) -> str | None:
    """The line of git's stderr that says why a fetch failed (a failed object check first)."""
    for line in lines:
        found = FSCK_ERROR.match(line)
        if found:
            return FSCK_MESSAGE.format(object=found[1][:12], check=found[2], detail=found[3])
    return lines[-1] if lines else None


def safe_url(url: str) -> str:
    """A remote URL without any user:password part."""
    parsed = urlparse(url)
    if parsed.password or parsed.username:
        host = parsed.hostname or ""
        port = f":{parsed.port}" if parsed.port else ""
        return parsed._replace(netloc=host + port).geturl()
    return url


def redact(text: str, token: str | None) -> str:
    return text.replace(token, "<redacted>") if token else text

"""The bot's Git access to the manifest repository: `ls-remote` and a bare cache clone.

The cache is fetched by commit id for each plan; `ls_remote` reads a remote's refs.
`ManifestGit` is the one way the front ends and the monitor reach the manifest repository
by its settings (NIXMOX_GIT_REMOTE, or NIXMOX_REPO on GitHub with the installation's token):
a ref resolved with `ls-remote`, then fetched into the cache (e.g. the default branch's head,
which Slack plans from and the monitor compares the deployed state with for drift).

The bot never checks anything out: the planner reads trees from this bare repository. When the
remote is GitHub, the token goes in an HTTP header passed through the environment (never on a
command line or in a URL, where `ps` and error messages would show it).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from collections.abc import Awaitable, Callable
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
NO_REMOTE = (
    "the bot does not know where the manifest repository is: set NIXMOX_GIT_REMOTE "
    "(or NIXMOX_REPO for a GitHub repository)"
)
NO_TOKEN = "cannot get a GitHub token to fetch with: {error}"
DEFAULT_BRANCH = "HEAD"  # what `ls-remote --symref` names the remote's default branch
TokenSource = Callable[[], Awaitable[str | None]]
"""A GitHub token for fetching (the installation's, fresh enough; None: none configured)."""


class GitFetchError(Exception):
    """The commits to plan could not be fetched (message safe to show: no credentials)."""


class UnknownRef(GitFetchError):
    """The remote has no branch or tag of that name."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        super().__init__(f"{ref} is not a branch or tag of the manifest repository")


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


@dataclass
class ManifestGit:
    """The manifest repository as the settings name it, and the bot's cache of it."""

    settings: Settings
    cache: GitCache
    token: TokenSource | None = None  # for a github.com remote (NIXMOX_REPO)

    @classmethod
    def of(
        cls, settings: Settings, cache: GitCache | None, token: TokenSource | None
    ) -> ManifestGit:
        """The bot's access: its shared cache (one of our own if it has none yet)."""
        return cls(settings, cache or GitCache.for_settings(settings), token)

    def clone_url(self) -> str | None:
        """The GitHub clone URL of NIXMOX_REPO, unless NIXMOX_GIT_REMOTE names the remote."""
        if self.settings.repo and not self.settings.git_remote:
            return f"https://github.com/{self.settings.repo}.git"
        return None

    async def remote(self) -> Remote:
        """Where to fetch from, with the token (GitFetchError when the bot cannot know)."""
        clone_url = self.clone_url()
        if not (self.settings.git_remote or clone_url):
            raise GitFetchError(NO_REMOTE)
        token = None
        if self.token is not None and clone_url is not None:
            try:
                token = await self.token()
            except Exception as exc:  # the message never carries the credentials
                raise GitFetchError(NO_TOKEN.format(error=exc)) from None
        return remote_for(self.settings, clone_url, token)

    async def default_branch(self) -> str:
        """The head of the remote's default branch, fetched into the cache."""
        remote = await self.remote()
        sha, names = await resolve_ref(remote, None)
        await self.cache.fetch(remote, [sha], refs=names)
        return sha


async def resolve_ref(remote: Remote, ref: str | None) -> tuple[str, list[str]]:
    """`git ls-remote`: the commit of a branch or tag (None: the default branch) and the ref
    name to fetch it by; UnknownRef when the remote has none of that name."""
    refs = await ls_remote(remote, ["--symref"], [DEFAULT_BRANCH if ref is None else ref])
    wanted = (
        [DEFAULT_BRANCH]
        if ref is None
        else [ref, f"refs/heads/{ref}", f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}"]
    )
    for name in wanted:
        if name in refs and SHA_PATTERN.match(refs[name]):
            return refs[name], [name.removesuffix("^{}")]
    raise UnknownRef(ref or DEFAULT_BRANCH)


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

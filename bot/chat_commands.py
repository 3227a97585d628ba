"""The one command parser for PR comments (`/nixmox apply`) and Slack (`/nixmox deploy x`).

`parse_command(text)` returns a typed command object or a `ParseError` carrying the help
text; it never raises and does no I/O, so both front ends share exactly one grammar.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

PREFIX = "/nixmox"
ALL = "all"
MAX_COMMAND_LENGTH = 1000
SERVICE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# a Git ref or commit: no whitespace, no leading dash, no `..`, nothing Git forbids in refs
REF_PATTERN = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9_./@{}^~+-]{1,200}$")
DEPLOYMENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
REASON_MAX = 200


class CommandName(StrEnum):
    PLAN = "plan"
    DEPLOY = "deploy"
    APPLY = "apply"
    ROLLBACK = "rollback"
    STATUS = "status"
    HISTORY = "history"
    LOCK = "lock"
    UNLOCK = "unlock"
    HELP = "help"


USAGE: dict[CommandName, tuple[str, str]] = {
    CommandName.PLAN: ("plan [service] [--ref REF]", "show what a deployment would do"),
    CommandName.DEPLOY: (
        "deploy <service>|all [--ref REF]",
        "deploy a service (and what it needs) or everything",
    ),
    CommandName.APPLY: ("apply", "deploy this pull request's plan (PR comments only)"),
    CommandName.ROLLBACK: (
        "rollback [service] [--to DEPLOYMENT_ID|REF]",
        "roll back the last deployment, or to a deployment or Git ref",
    ),
    CommandName.STATUS: ("status [service]", "deployed revision and health per service"),
    CommandName.HISTORY: ("history [service]", "recent deployments"),
    CommandName.LOCK: ("lock <service> [reason]", "stop deployments of a service"),
    CommandName.UNLOCK: ("unlock <service>", "allow deployments of a service again"),
    CommandName.HELP: ("help", "this text"),
}


def help_text(prefix: str = PREFIX) -> str:
    """Every command with its arguments, one per line (Markdown and Slack mrkdwn friendly)."""
    lines = [f"Usage: `{prefix} <command>`"]
    lines += [f"• `{prefix} {usage}`: {what}" for usage, what in USAGE.values()]
    return "\n".join(lines)


HELP_TEXT = help_text()


@dataclass(frozen=True)
class PlanCommand:
    service: str | None = None
    ref: str | None = None
    name: ClassVar[CommandName] = CommandName.PLAN


@dataclass(frozen=True)
class DeployCommand:
    """`service` is None for `deploy all`."""

    service: str | None
    ref: str | None = None
    name: ClassVar[CommandName] = CommandName.DEPLOY

    @property
    def everything(self) -> bool:
        return self.service is None


@dataclass(frozen=True)
class ApplyCommand:
    name: ClassVar[CommandName] = CommandName.APPLY


@dataclass(frozen=True)
class RollbackCommand:
    """`to` is a deployment id or a Git ref; None means "what each service ran before"."""

    service: str | None = None
    to: str | None = None
    name: ClassVar[CommandName] = CommandName.ROLLBACK


@dataclass(frozen=True)
class StatusCommand:
    service: str | None = None
    name: ClassVar[CommandName] = CommandName.STATUS


@dataclass(frozen=True)
class HistoryCommand:
    service: str | None = None
    name: ClassVar[CommandName] = CommandName.HISTORY


@dataclass(frozen=True)
class LockCommand:
    service: str
    reason: str | None = None
    name: ClassVar[CommandName] = CommandName.LOCK


@dataclass(frozen=True)
class UnlockCommand:
    service: str
    name: ClassVar[CommandName] = CommandName.UNLOCK


@dataclass(frozen=True)
class HelpCommand:
    name: ClassVar[CommandName] = CommandName.HELP


Command = (
    PlanCommand
    | DeployCommand
    | ApplyCommand
    | RollbackCommand
    | StatusCommand
    | HistoryCommand
    | LockCommand
    | UnlockCommand
    | HelpCommand
)


@dataclass(frozen=True)
class ParseError:
    """What was wrong with the command, plus the help text to show with it."""

    message: str
    help: str = HELP_TEXT

    def render(self) -> str:
        return f"{self.message}\n\n{self.help}"


class _Invalid(Exception):
    """Internal: a parse failure carrying the user-facing message."""


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def without_prefix(line: str, prefix: str = PREFIX) -> str | None:
    """The command after `prefix` (None when the line is not addressed to the bot)."""
    head, *tail = line.split(None, 1) or [""]
    if head.lower() != prefix:
        return None
    return tail[0].strip() if tail else ""


def is_command(text: str, prefix: str = PREFIX) -> bool:
    """Whether a PR comment is addressed to the bot (its first line starts with the prefix)."""
    return without_prefix(first_line(text), prefix) is not None


def parse_command(text: str, prefix: str = PREFIX) -> Command | ParseError:
    """Parse `[/nixmox] <command> [args]`; only the first line counts (the rest is free text)."""
    line = first_line(text)
    stripped = without_prefix(line, prefix)
    if stripped is not None:
        line = stripped
    if len(line) > MAX_COMMAND_LENGTH:
        return ParseError(f"the command is longer than {MAX_COMMAND_LENGTH} characters")
    if not line:
        return HelpCommand()
    verb, *tail = line.split(None, 1)
    rest = tail[0] if tail else ""
    try:
        name = CommandName(verb.lower())
    except ValueError:
        return ParseError(f"unknown command `{_shown(verb)}`")
    try:
        return _PARSERS[name](_words(name, rest.strip()))
    except _Invalid as exc:
        usage = USAGE[name][0]
        return ParseError(f"{exc} (usage: `{prefix} {usage}`)")


def _words(name: CommandName, rest: str) -> list[str]:
    """Arguments of a command; a lock reason is free text (apostrophes welcome)."""
    if name is CommandName.LOCK:
        return rest.split(None, 1)
    try:
        return shlex.split(rest)
    except ValueError as exc:
        raise _Invalid(f"cannot read the arguments: {exc}") from None


def _shown(word: str, limit: int = 40) -> str:
    """A user's word echoed back safely: short, without backticks."""
    word = word.replace("`", "'")
    return word if len(word) <= limit else word[:limit] + "…"


def _options(args: list[str], allowed: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """Split `--opt VALUE` / `--opt=VALUE` options from positional words."""
    positional: list[str] = []
    options: dict[str, str] = {}
    index = 0
    while index < len(args):
        word = args[index]
        if word.startswith("--"):
            key, has_value, value = word[2:].partition("=")
            if key not in allowed:
                raise _Invalid(f"unknown option `--{_shown(key)}`")
            if key in options:
                raise _Invalid(f"`--{key}` given twice")
            if not has_value:
                index += 1
                if index >= len(args) or args[index].startswith("--"):
                    raise _Invalid(f"`--{key}` needs a value")
                value = args[index]
            options[key] = value
        elif word.startswith("-") and len(word) > 1:
            raise _Invalid(f"unknown option `{_shown(word)}`")
        else:
            positional.append(word)
        index += 1
    return positional, options


def _service(word: str) -> str:
    if not SERVICE_PATTERN.match(word):
        raise _Invalid(f"`{_shown(word)}` is not a service name")
    return word


def _ref(word: str) -> str:
    if not REF_PATTERN.match(word):
        raise _Invalid(f"`{_shown(word)}` is not a Git ref or commit")
    return word


def _at_most(positional: list[str], count: int) -> None:
    if len(positional) > count:
        extra = " ".join(positional[count:])
        raise _Invalid(f"unexpected `{_shown(extra)}`")


def _optional_service(positional: list[str]) -> str | None:
    _at_most(positional, 1)
    return _service(positional[0]) if positional else None


def _parse_plan(args: list[str]) -> PlanCommand:
    positional, options = _options(args, ("ref",))
    ref = _ref(options["ref"]) if "ref" in options else None
    return PlanCommand(service=_optional_service(positional), ref=ref)


def _parse_deploy(args: list[str]) -> DeployCommand:
    positional, options = _options(args, ("ref",))
    if not positional:
        raise _Invalid("say which service to deploy, or `all`")
    target = _optional_service(positional)
    ref = _ref(options["ref"]) if "ref" in options else None
    return DeployCommand(service=None if target == ALL else target, ref=ref)


def _parse_apply(args: list[str]) -> ApplyCommand:
    positional, _ = _options(args, ())
    _at_most(positional, 0)
    return ApplyCommand()


def _parse_rollback(args: list[str]) -> RollbackCommand:
    positional, options = _options(args, ("to",))
    to = options.get("to")
    if to is not None and not (DEPLOYMENT_ID_PATTERN.match(to) or REF_PATTERN.match(to)):
        raise _Invalid(f"`{_shown(to)}` is not a deployment id or Git ref")
    return RollbackCommand(service=_optional_service(positional), to=to)


def _parse_status(args: list[str]) -> StatusCommand:
    positional, _ = _options(args, ())
    return StatusCommand(service=_optional_service(positional))


def _parse_history(args: list[str]) -> HistoryCommand:
    positional, _ = _options(args, ())
    return HistoryCommand(service=_optional_service(positional))


def _parse_lock(args: list[str]) -> LockCommand:
    if not args:
        raise _Invalid("say which service to lock")
    reason = args[1].strip() if len(args) > 1 else None
    if reason is not None and len(reason) > REASON_MAX:
        raise _Invalid(f"the reason is longer than {REASON_MAX} characters")
    return LockCommand(service=_service(args[0]), reason=reason)


def _parse_unlock(args: list[str]) -> UnlockCommand:
    positional, _ = _options(args, ())
    if not positional:
        raise _Invalid("say which service to unlock")
    _at_most(positional, 1)
    return UnlockCommand(service=_service(positional[0]))


def _parse_help(args: list[str]) -> HelpCommand:
    return HelpCommand()


_PARSERS: dict[CommandName, Callable[[list[str]], Command]] = {
    CommandName.PLAN: _parse_plan,
    CommandName.DEPLOY: _parse_deploy,
    CommandName.APPLY: _parse_apply,
    CommandName.ROLLBACK: _parse_rollback,
    CommandName.STATUS: _parse_status,
    CommandName.HISTORY: _parse_history,
    CommandName.LOCK: _parse_lock,
    CommandName.UNLOCK: _parse_unlock,
    CommandName.HELP: _parse_help,
}

"""The shared command parser: every command, its arguments, and every kind of bad input."""

from __future__ import annotations

import pytest

from bot.chat_commands import (
    HELP_TEXT,
    ApplyCommand,
    CommandName,
    DeployCommand,
    HelpCommand,
    HistoryCommand,
    LockCommand,
    ParseError,
    PlanCommand,
    RollbackCommand,
    StatusCommand,
    UnlockCommand,
    help_text,
    is_command,
    parse_command,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plan", PlanCommand()),
        ("plan vaultwarden", PlanCommand(service="vaultwarden")),
        ("plan --ref main", PlanCommand(ref="main")),
        ("plan vaultwarden --ref=feature/x", PlanCommand(service="vaultwarden", ref="feature/x")),
        ("plan --ref 0123abcd vaultwarden", PlanCommand(service="vaultwarden", ref="0123abcd")),
        ("deploy vaultwarden", DeployCommand(service="vaultwarden")),
        ("deploy all", DeployCommand(service=None)),
        ("deploy all --ref v1.2", DeployCommand(service=None, ref="v1.2")),
        ("deploy caddy --ref HEAD~1", DeployCommand(service="caddy", ref="HEAD~1")),
        ("apply", ApplyCommand()),
        ("rollback", RollbackCommand()),
        ("rollback vaultwarden", RollbackCommand(service="vaultwarden")),
        ("rollback --to 42", RollbackCommand(to="42")),
        ("rollback vaultwarden --to abc123", RollbackCommand(service="vaultwarden", to="abc123")),
        ("status", StatusCommand()),
        ("status caddy", StatusCommand(service="caddy")),
        ("history", HistoryCommand()),
        ("history caddy", HistoryCommand(service="caddy")),
        ("lock caddy", LockCommand(service="caddy")),
        (
            "lock caddy don't touch: disk swap until 18:00",
            LockCommand(service="caddy", reason="don't touch: disk swap until 18:00"),
        ),
        ("unlock caddy", UnlockCommand(service="caddy")),
        ("help", HelpCommand()),
        ("", HelpCommand()),
    ],
)
def test_parses_every_command(text: str, expected: object) -> None:
    assert parse_command(text) == expected
    assert parse_command(f"/nixmox {text}") == expected


def test_deploy_all_means_everything() -> None:
    command = parse_command("deploy all")
    assert isinstance(command, DeployCommand)
    assert command.everything
    assert not DeployCommand(service="caddy").everything


def test_commands_carry_their_name() -> None:
    assert parse_command("apply").name is CommandName.APPLY
    assert parse_command("lock x").name is CommandName.LOCK


def test_only_the_first_line_of_a_comment_counts() -> None:
    body = "/nixmox apply\n\nLooks good, shipping it. deploy all --ref evil"
    assert parse_command(body) == ApplyCommand()


def test_case_and_whitespace_are_forgiven() -> None:
    assert parse_command("  /nixmox   Deploy\tvaultwarden  ") == DeployCommand("vaultwarden")
    assert parse_command("/NIXMOX status") == StatusCommand()


def test_quoted_arguments_are_one_word() -> None:
    assert parse_command('plan --ref "main"') == PlanCommand(ref="main")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("frobnicate", "unknown command `frobnicate`"),
        ("deploy", "say which service to deploy, or `all`"),
        ("deploy a b", "unexpected `b`"),
        ("deploy vaultwarden --ref", "`--ref` needs a value"),
        ("deploy vaultwarden --force", "unknown option `--force`"),
        ("deploy vaultwarden -f", "unknown option `-f`"),
        ("deploy vaultwarden --ref a --ref b", "`--ref` given twice"),
        ("deploy vaultwarden --ref=", "`` is not a Git ref or commit"),
        ("deploy vaultwarden --ref 'a b'", "`a b` is not a Git ref or commit"),
        ("deploy vaultwarden --ref main..evil", "is not a Git ref or commit"),
        ("deploy vault$warden", "`vault$warden` is not a service name"),
        ("plan --to x", "unknown option `--to`"),
        ("apply now", "unexpected `now`"),
        ("apply --ref x", "unknown option `--ref`"),
        ("rollback a b", "unexpected `b`"),
        ("rollback --to 'a b'", "is not a deployment id or Git ref"),
        ("status a b", "unexpected `b`"),
        ("history a b", "unexpected `b`"),
        ("lock", "say which service to lock"),
        ("lock ../etc reason", "is not a service name"),
        ("unlock", "say which service to unlock"),
        ("unlock a b", "unexpected `b`"),
        ('plan --ref "main', "cannot read the arguments"),
        ("lock caddy " + "x" * 300, "the reason is longer than 200 characters"),
        ("deploy " + "x" * 2000, "longer than 1000 characters"),
    ],
)
def test_bad_input_is_a_parse_error_with_help(text: str, message: str) -> None:
    result = parse_command(text)
    assert isinstance(result, ParseError), result
    assert message in result.message
    assert result.help == HELP_TEXT
    assert result.render().endswith(HELP_TEXT)


def test_errors_on_a_command_show_its_usage() -> None:
    result = parse_command("deploy")
    assert isinstance(result, ParseError)
    assert "usage: `/nixmox deploy <service>|all [--ref REF]`" in result.message


def test_echoed_words_are_defused() -> None:
    result = parse_command("`rm` -rf")
    assert isinstance(result, ParseError)
    assert "`'rm'`" in result.message
    long = parse_command("x" * 100)
    assert isinstance(long, ParseError)
    assert "…" in long.message and len(long.message) < 80


def test_help_lists_every_command() -> None:
    for name in CommandName:
        assert f"/nixmox {name.value}" in HELP_TEXT
    assert "`nixmox deploy <service>|all [--ref REF]`" in help_text("nixmox")


@pytest.mark.parametrize(
    ("body", "addressed"),
    [
        ("/nixmox apply", True),
        ("/nixmox", True),
        ("  /nixmox plan\nthanks", True),
        ("/nixmoxapply", False),
        ("please /nixmox apply", False),
        ("LGTM\n/nixmox apply", False),
        ("", False),
    ],
)
def test_is_command_only_for_comments_starting_with_the_prefix(body: str, addressed: bool) -> None:
    assert is_command(body) is addressed

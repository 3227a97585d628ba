"""The Slack bot's parts: approval rules, signature checks, Block Kit within Slack's limits,
the progress model fed by the real executor, redaction, coalesced edits of a 500-step
deployment against the fake Slack over HTTP, and payloads shaped as `@slack/bolt` types them."""

from __future__ import annotations

import functools
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.approvals import (
    Policy,
    Refusal,
    approval_refusal,
    button_value,
    cancel_refusal,
    lock_refusal,
    parse_button_value,
    request_refusal,
)
from bot.slack.asks import Ask
from bot.slack.blocks import RequestStatus, RequestView, request_blocks
from bot.slack.bot import verify_signature
from bot.slack.notifier import MessagePacer, SecretRedactor, SlackNotifier
from bot.slack.progress import (
    Progress,
    ServiceState,
    failure_blocks,
    progress_blocks,
)
from planner.models import Manifest
from planner.plan import Plan, Step, plan_full
from planner.synthetic import synthetic_manifest
from runners.base import Context
from runners.config import RunnerConfig, SimulateConfig
from runners.executor import Executor
from runners.registry import build_runners
from state.approvals import ApprovalRecord, ApprovalState
from state.events import (
    DeploymentKind,
    DeploymentStarted,
    Event,
    StepFinished,
    StepResult,
    StepStarted,
    StepState,
    utcnow,
)
from tests.fakes.slack import DEFAULT_TOKEN, FakeSlack, Message, check_blocks
from tests.fixtures_slack import (
    ACTION_TYPES,
    APPROVER,
    CHANNEL,
    COMMAND_TYPES,
    PROGRESS_INTERVAL,
    REQUESTER,
    STRANGER,
    SlackDriver,
    bolt_types,
    interface_fields,
)

DIGEST = "d" * 64
POLICY = Policy(
    approvers=frozenset({APPROVER, REQUESTER}),
    deployers=frozenset(),
    allow_self_approval=False,
    ttl=timedelta(minutes=15),
)


def approval(**changes: Any) -> ApprovalRecord:
    values: dict[str, Any] = {
        "id": "a1",
        "kind": "deploy",
        "requested_by": f"slack:{REQUESTER}",
        "state": ApprovalState.PENDING,
        "digest": DIGEST,
        "expires_at": utcnow() + timedelta(minutes=5),
    }
    values.update(changes)
    return ApprovalRecord(**values)


# -- approval rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "record", "policy_changes", "digest", "expected"),
    [
        (APPROVER, {}, {}, DIGEST, None),
        (STRANGER, {}, {}, DIGEST, Refusal.NOT_APPROVER),
        (APPROVER, {}, {"approvers": frozenset()}, DIGEST, Refusal.NO_APPROVERS),
        (REQUESTER, {}, {}, DIGEST, Refusal.SELF_APPROVAL),
        (REQUESTER, {}, {"allow_self_approval": True}, DIGEST, None),
        (APPROVER, {"expires_at": utcnow() - timedelta(seconds=1)}, {}, DIGEST, Refusal.EXPIRED),
        (APPROVER, {"state": ApprovalState.EXPIRED}, {}, DIGEST, Refusal.EXPIRED),
        (APPROVER, {"state": ApprovalState.APPROVED}, {}, DIGEST, Refusal.NOT_PENDING),
        (APPROVER, {"state": ApprovalState.CANCELLED}, {}, DIGEST, Refusal.NOT_PENDING),
        (APPROVER, {}, {}, "e" * 64, Refusal.PLAN_CHANGED),
        # a stranger learns only that they may not approve, even of an expired request
        (STRANGER, {"state": ApprovalState.EXPIRED}, {}, DIGEST, Refusal.NOT_APPROVER),
    ],
)
def test_who_may_approve(
    user: str,
    record: dict[str, Any],
    policy_changes: dict[str, Any],
    digest: str,
    expected: Refusal | None,
) -> None:
    policy = Policy(**{**POLICY.__dict__, **policy_changes})
    refusal = approval_refusal(policy, approval(**record), user, now=utcnow(), button_digest=digest)
    assert refusal is expected


def test_who_may_request_and_cancel() -> None:
    assert request_refusal(POLICY, STRANGER) is None  # no deployers configured: anyone
    strict = Policy(**{**POLICY.__dict__, "deployers": frozenset({REQUESTER})})
    assert request_refusal(strict, REQUESTER) is None
    assert request_refusal(strict, STRANGER) is Refusal.NOT_DEPLOYER
    assert cancel_refusal(POLICY, approval(), REQUESTER) is None
    assert cancel_refusal(POLICY, approval(), APPROVER) is None
    assert cancel_refusal(POLICY, approval(), STRANGER) is Refusal.NOT_ALLOWED_TO_CANCEL
    done = approval(state=ApprovalState.APPROVED)
    assert cancel_refusal(POLICY, done, REQUESTER) is Refusal.NOT_PENDING


def test_who_may_lock_and_unlock() -> None:
    # no deployers configured does not open locks to everyone while approvers are configured
    assert lock_refusal(POLICY, STRANGER) is Refusal.NOT_LOCKER
    assert lock_refusal(POLICY, APPROVER) is None
    deployer = "U0DEPLOYER"
    strict = Policy(**{**POLICY.__dict__, "deployers": frozenset({deployer})})
    assert lock_refusal(strict, deployer) is None
    assert lock_refusal(strict, APPROVER) is None
    assert lock_refusal(strict, STRANGER) is Refusal.NOT_LOCKER
    homelab = Policy(**{**POLICY.__dict__, "approvers": frozenset(), "deployers": frozenset()})
    assert lock_refusal(homelab, STRANGER) is None  # no lists at all: anyone


def test_button_values_carry_request_and_digest() -> None:
    assert parse_button_value(button_value("a1b2", DIGEST)) == ("a1b2", DIGEST)
    for junk in (None, "", "nospace", " onlydigest", "onlyid "):
        assert parse_button_value(junk) is None


# -- signatures ------------------------------------------------------------------------------


def test_signature_check_never_raises() -> None:
    secret = "s3cr3t"
    verifier = SignatureVerifier(secret)
    body = b"command=%2Fnixmox&text=help"
    now = str(int(time.time()))
    good = verifier.generate_signature(timestamp=now, body=body)
    assert verify_signature(
        verifier, body, {"X-Slack-Request-Timestamp": now, "X-Slack-Signature": good}
    )
    other = SignatureVerifier("other").generate_signature(timestamp=now, body=body)
    stale = str(int(time.time()) - 301)
    stale_signature = verifier.generate_signature(timestamp=stale, body=body)
    for headers in (
        {"X-Slack-Request-Timestamp": now, "X-Slack-Signature": other},
        {"X-Slack-Request-Timestamp": stale, "X-Slack-Signature": stale_signature},
        {"X-Slack-Request-Timestamp": now},
        {"X-Slack-Signature": good},
        {"X-Slack-Request-Timestamp": "1e9", "X-Slack-Signature": good},
        {"X-Slack-Request-Timestamp": "9" * 40, "X-Slack-Signature": good},
        {"X-Slack-Request-Timestamp": now, "X-Slack-Signature": "v0=é"},
        {"X-Slack-Request-Timestamp": "١٢٣", "X-Slack-Signature": good},
    ):
        assert not verify_signature(verifier, body, headers), headers
    assert not verify_signature(
        verifier, body + b"x", {"X-Slack-Request-Timestamp": now, "X-Slack-Signature": good}
    )


# -- Block Kit limits ------------------------------------------------------------------------


@functools.cache  # planned once per size for the file; no test changes what it returns
def big_plan(services: int) -> tuple[Manifest, Plan]:
    manifest = Manifest.model_validate(synthetic_manifest(services))
    return manifest, plan_full(manifest)


@pytest.mark.parametrize("status", list(RequestStatus))
def test_approval_message_of_a_huge_plan_stays_within_limits(status: RequestStatus) -> None:
    _, plan = big_plan(600)
    view = RequestView(
        Ask(DeploymentKind.DEPLOY),
        f"slack:{REQUESTER}",
        head="a" * 40,
        approval=ApprovalRecord(
            "a1", "deploy", f"slack:{REQUESTER}", ApprovalState.PENDING, plan.digest, utcnow()
        ),
        resolved_by=f"slack:{APPROVER}",
        error="x" * 5000,
        extra=["undo deployment d1: " + "svc, " * 1000],
    )
    blocks = request_blocks(view, status, plan)
    assert check_blocks(blocks) == []
    buttons = [e for b in blocks if b["type"] == "actions" for e in b["elements"]]
    if status is RequestStatus.PENDING:
        assert [b["text"]["text"] for b in buttons] == ["Approve", "Cancel"]
    elif status in {RequestStatus.EXPIRED, RequestStatus.PLAN_CHANGED}:
        assert [b["text"]["text"] for b in buttons] == ["Re-plan"]
    else:
        assert buttons == []


def test_progress_of_500_services_is_summarised_within_limits() -> None:
    _, plan = big_plan(500)
    progress = Progress("d1", plan)
    progress.apply(DeploymentStarted("d1", plan))
    by_id = plan.by_id()
    first, second = plan.waves[0], plan.waves[1]
    for sid in first:
        progress.apply(StepStarted("d1", by_id[sid]))
        progress.apply(StepFinished("d1", by_id[sid], StepState.SUCCEEDED))
    failing = by_id[second[0]]
    progress.apply(StepStarted("d1", failing))
    progress.apply(StepFinished("d1", failing, StepState.FAILED, StepResult(False, "boom")))
    progress.apply(StepStarted("d1", by_id[second[1]]))
    blocks = progress_blocks(progress, utcnow())
    assert check_blocks(blocks) == []
    text = "\n".join(b["text"]["text"] for b in blocks if b["type"] == "section")
    assert f"*{failing.service}* — failed" in text  # noteworthy services keep their line
    assert f"*{by_id[second[1]].service}* — running" in text
    assert "_505 services:_" in text  # the rest are counted, not listed
    assert text.count("\n") < 60


def test_failure_reply_keeps_the_last_lines_within_limits() -> None:
    output = "\n".join(f"line {n} " + "x" * 200 for n in range(10_000))
    progress = Progress("d1", Plan(steps=[Step(id="verify:a", phase="verify", service="a")]))
    step = progress.plan.steps[0]
    [note] = progress.apply(StepFinished("d1", step, StepState.FAILED, StepResult(False, output)))
    assert note.failure is not None
    blocks = failure_blocks(note.failure)
    assert check_blocks(blocks) == []
    text = blocks[1]["text"]["text"]
    assert "line 9999" in text and "line 9979" not in text


# -- the progress model with the real executor -----------------------------------------------


async def run_simulated(
    plan: Plan, manifest: Manifest, subscribers: list[Any], **simulate: Any
) -> Any:
    config = RunnerConfig(simulate=SimulateConfig(**simulate))
    executor = Executor(build_runners("simulate", config), parallel=16, subscribers=subscribers)
    ctx = Context("d1", manifest, plan, Path("."), "rev1")
    return await executor.execute(plan, ctx)


async def test_a_failed_rollback_is_reported() -> None:
    manifest, plan = big_plan(2)
    events: list[Event] = []

    async def record(event: Event) -> None:
        events.append(event)

    await run_simulated(
        plan,
        manifest,
        [record],
        scale=0.001,
        fail=["verify:app00001"],
        fail_rollback=["app00001"],
    )
    progress = Progress("d1", plan)
    notes = [note for event in events for note in progress.apply(event)]
    assert progress.service_state("app00001", progress.services()["app00001"]) is (
        ServiceState.ROLLBACK_FAILED
    )
    [failure] = [note.failure for note in notes if note.failure is not None]
    assert failure.step_id == "verify:app00001"
    text = "\n".join(b["text"]["text"] for b in failure_blocks(failure) if "text" in b)
    assert "rollback of *app00001* FAILED" in text
    assert "simulated rollback failure of app00001" in text


def test_secrets_never_reach_a_thread_reply() -> None:
    redactor = SecretRedactor(values=["hunter2-the-password"])
    output = "\n".join(
        [
            "connecting with hunter2-the-password",
            "export PASSWORD=s3cret-value",
            "api_key: abcdef123456",
            "token xoxb-1234567890-abcdefghijkl in the log",
            "ghp_" + "a" * 36,
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU=",
            "-----END OPENSSH PRIVATE KEY-----",
            "done",
        ]
    )
    progress = Progress(
        "d1", Plan(steps=[Step(id="verify:a", phase="verify", service="a")]), redact=redactor.text
    )
    step = progress.plan.steps[0]
    [note] = progress.apply(
        StepFinished(
            "d1", step, StepState.FAILED, StepResult(False, output), "x hunter2-the-password"
        )
    )
    assert note.failure is not None
    text = "\n".join(b["text"]["text"] for b in failure_blocks(note.failure) if "text" in b)
    for secret in (
        "hunter2-the-password",
        "s3cret-value",
        "abcdef123456",
        "xoxb-1234567890",
        "ghp_",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU",
    ):
        assert secret not in text
    assert "PASSWORD=&lt;redacted&gt;" in text and "done" in text


# -- coalescing ------------------------------------------------------------------------------


async def test_a_500_step_deployment_is_edited_a_handful_of_times(fake_slack: FakeSlack) -> None:
    manifest, plan = big_plan(160)
    assert len(plan.steps) > 500
    client = AsyncWebClient(token=DEFAULT_TOKEN, base_url=fake_slack.api_url)
    notifier = SlackNotifier(client, CHANNEL, pacer=MessagePacer(PROGRESS_INTERVAL))
    events: list[Event] = []

    async def count(event: Event) -> None:
        events.append(event)

    started = time.monotonic()
    result = await run_simulated(plan, manifest, [notifier, count], scale=0.01)
    elapsed = time.monotonic() - started
    assert result.state.value == "succeeded"

    [message] = fake_slack.channel_messages(CHANNEL)
    assert "Succeeded" in message.text and f"{len(plan.steps)}/{len(plan.steps)} steps" in (
        message.all_text()
    )
    edits = len(fake_slack.calls_to("chat.update"))
    assert len(events) > 3 * len(plan.steps) - 10  # started, output, finished per step
    assert 1 <= edits <= elapsed / PROGRESS_INTERVAL + 2, (edits, elapsed)
    print(f"{len(events)} events, {edits} edits in {elapsed:.2f}s")
    assert len(fake_slack.calls_to("chat.postMessage")) == 1


# -- payloads as Slack sends them --------------------------------------------------------------


def test_test_payloads_have_every_field_bolt_declares(fake_slack: FakeSlack) -> None:
    driver = SlackDriver(client=None, fake=fake_slack)
    command = interface_fields(bolt_types(COMMAND_TYPES), "SlashCommand")
    payload = driver.command_payload("help", REQUESTER, CHANNEL)
    assert {name for name, required in command.items() if required} <= set(payload)
    assert set(payload) <= set(command)

    actions = bolt_types(ACTION_TYPES)
    block_action = interface_fields(actions, "BlockAction")
    button = {
        **interface_fields(actions, "BasicElementAction"),
        **interface_fields(actions, "ButtonAction"),
    }
    message_blocks = [
        {
            "type": "actions",
            "block_id": "b",
            "elements": [
                {
                    "type": "button",
                    "action_id": "nixmox_approve",
                    "value": "a1 " + DIGEST,
                    "text": {"type": "plain_text", "text": "Approve"},
                }
            ],
        }
    ]
    message = Message(CHANNEL, "1.000001", "text", message_blocks)
    payload = driver.action_payload(message, message.buttons()[0], APPROVER)
    assert {name for name, required in block_action.items() if required} <= set(payload)
    assert set(payload) <= set(block_action)
    [action] = payload["actions"]
    assert {name for name, required in button.items() if required} <= set(action)
    assert set(action) - {"style"} <= set(button)


# -- the Slack app manifest --------------------------------------------------------------------


def test_the_app_manifest_asks_only_for_what_the_bot_uses() -> None:
    import yaml  # PyYAML comes with openapi-core (a test dependency)

    from tests.conftest import REPO_ROOT

    manifest = yaml.safe_load((REPO_ROOT / "slack-app-manifest.yml").read_text())
    # commands: the slash command; chat:write: chat.postMessage / update / postEphemeral;
    # channels:history: conversations.history / .replies (bot.slack.once: a re-run's look-up)
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == {
        "commands",
        "chat:write",
        "channels:history",
    }
    [command] = manifest["features"]["slash_commands"]
    assert command["command"] == "/nixmox"
    assert command["url"].endswith("/slack/events")
    interactivity = manifest["settings"]["interactivity"]
    assert interactivity["is_enabled"] and interactivity["request_url"].endswith("/slack/events")
    assert "README" in (REPO_ROOT / "slack-app-manifest.yml").read_text()
    assert "slack-app-manifest.yml" in (REPO_ROOT / "README.md").read_text()

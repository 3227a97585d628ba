"""`POST /github/webhook`: signature first, bad requests, ping, filtering, deduplication."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from bot.app import build_app
from bot.context import CONTEXT
from state.queue import JobState
from state.store import Store
from tests.fakes.github import DEFAULT_TOKEN, FakeGitHub
from tests.fixtures_github import (
    WEBHOOK_SECRET,
    ManifestRepo,
    Payloads,
    bot_settings,
    delivery_headers,
    sign,
)

SHA_A = "a" * 40
SHA_B = "b" * 40


async def queued_jobs(bot: Any) -> list[Any]:
    """Every job in the store (claimed to look at them: the worker is not running)."""
    store: Store = bot.ctx.require_store()
    jobs = []
    while job := await store.queue.claim("inspector", lease=__import__("datetime").timedelta(1)):
        jobs.append(job)
    return jobs


def pr_payload(payloads: Payloads, action: str = "opened", **kw: Any) -> dict[str, Any]:
    return payloads.pull_request(action, number=7, head_sha=SHA_B, base_sha=SHA_A, **kw)


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "sha1=0123456789abcdef0123456789abcdef01234567",
        "sha256=",
        "sha256=zz" + "0" * 62,
        "sha256=" + "0" * 63,
        "SHA256=" + "0" * 64,
        "sha256=" + "0" * 64,
    ],
    ids=["missing", "empty", "sha1", "no-digest", "not-hex", "short", "uppercase-prefix", "wrong"],
)
async def test_unsigned_or_badly_signed_deliveries_get_401_and_nothing_is_recorded(
    make_bot: Any, payloads: Payloads, signature: str | None
) -> None:
    bot = await make_bot()
    payload = pr_payload(payloads)
    body = json.dumps(payload).encode()
    headers = delivery_headers("pull_request", body, delivery="d-1")
    if signature is None:
        del headers["X-Hub-Signature-256"]
    else:
        headers["X-Hub-Signature-256"] = signature
    response = await bot.client.post("/github/webhook", data=body, headers=headers)
    assert response.status == 401
    assert await queued_jobs(bot) == []
    # the delivery id was not recorded: the genuine delivery is still accepted
    genuine = await bot.deliver("pull_request", payload, delivery="d-1")
    assert (await genuine.json())["status"] == "accepted"


async def test_signature_with_another_secret_is_refused(make_bot: Any, payloads: Payloads) -> None:
    bot = await make_bot()
    response = await bot.deliver("pull_request", pr_payload(payloads), secret="not the secret")
    assert response.status == 401
    assert "signature" in (await response.json())["error"]
    assert await queued_jobs(bot) == []


async def test_signature_is_checked_before_headers_and_body(make_bot: Any) -> None:
    bot = await make_bot()
    response = await bot.client.post("/github/webhook", data=b"not json")
    assert response.status == 401


@pytest.mark.parametrize("missing", ["X-GitHub-Event", "X-GitHub-Delivery"])
async def test_missing_event_or_delivery_header_is_400(
    make_bot: Any, payloads: Payloads, missing: str
) -> None:
    bot = await make_bot()
    body = json.dumps(pr_payload(payloads)).encode()
    headers = delivery_headers("pull_request", body)
    del headers[missing]
    response = await bot.client.post("/github/webhook", data=body, headers=headers)
    assert response.status == 400
    assert missing in (await response.json())["error"]
    assert await queued_jobs(bot) == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
async def test_signed_body_that_is_not_a_json_object_is_400(make_bot: Any, body: bytes) -> None:
    bot = await make_bot()
    response = await bot.client.post(
        "/github/webhook", data=body, headers=delivery_headers("pull_request", body)
    )
    assert response.status == 400
    assert await queued_jobs(bot) == []


async def test_signed_payload_missing_required_fields_is_400_and_not_recorded(
    make_bot: Any, payloads: Payloads
) -> None:
    bot = await make_bot()
    payload = pr_payload(payloads)
    del payload["pull_request"]["head"]["sha"]
    response = await bot.deliver("pull_request", payload, delivery="d-2")
    assert response.status == 400
    error = (await response.json())["error"]
    assert "missing required field `sha` - at `$.pull_request.head`" in error
    fixed = await bot.deliver("pull_request", pr_payload(payloads), delivery="d-2")
    assert (await fixed.json())["status"] == "accepted"


async def test_signed_payload_with_wrongly_typed_fields_is_400(
    make_bot: Any, payloads: Payloads
) -> None:
    bot = await make_bot()
    payload = pr_payload(payloads)
    payload["pull_request"]["number"] = "seven"
    response = await bot.deliver("pull_request", payload)
    assert response.status == 400
    assert (
        "Expected `int`, got `str` - at `$.pull_request.number`" in (await response.json())["error"]
    )
    assert await queued_jobs(bot) == []


async def test_form_encoded_deliveries_are_accepted(make_bot: Any, payloads: Payloads) -> None:
    from urllib.parse import urlencode

    bot = await make_bot()
    body = urlencode({"payload": json.dumps(pr_payload(payloads))}).encode()
    headers = delivery_headers("pull_request", body)
    headers["Content-Type"] = "application/x-www-form-urlencoded"
    response = await bot.client.post("/github/webhook", data=body, headers=headers)
    assert (await response.json())["status"] == "accepted"


async def test_ping_is_answered(make_bot: Any, payloads: Payloads, fake_github: FakeGitHub) -> None:
    bot = await make_bot()
    response = await bot.deliver("ping", payloads.ping())
    assert response.status == 200
    assert (await response.json())["status"] == "pong"
    assert fake_github.requests == []


async def test_other_repositories_are_ignored(make_bot: Any, webhook_examples: Any) -> None:
    bot = await make_bot()
    other = Payloads(webhook_examples, repo="someone/else")
    payload = other.pull_request("opened", number=7, head_sha=SHA_B, base_sha=SHA_A)
    response = await bot.deliver("pull_request", payload)
    assert (await response.json())["status"] == "ignored"
    assert await queued_jobs(bot) == []


async def test_a_redelivery_does_nothing_twice(make_bot: Any, payloads: Payloads) -> None:
    bot = await make_bot()
    payload = pr_payload(payloads)
    first = await bot.deliver("pull_request", payload, delivery="same-id")
    second = await bot.deliver("pull_request", payload, delivery="same-id")
    assert (await first.json())["status"] == "accepted"
    assert second.status == 200
    assert (await second.json())["status"] == "duplicate"
    assert len(await queued_jobs(bot)) == 1


async def test_deduplication_holds_across_restarts(
    aiohttp_client: Any,
    tmp_path: Path,
    fake_github: FakeGitHub,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
) -> None:
    settings = bot_settings(tmp_path, fake_github.url, manifest_repo.path)
    body = json.dumps(pr_payload(payloads)).encode()
    headers = delivery_headers("pull_request", body, delivery="restart-id")
    answers = []
    for _ in range(2):  # two processes' worth of app, one after the other, same database
        client = await aiohttp_client(build_app(settings, start_worker=False))
        answers.append(
            (await (await client.post("/github/webhook", data=body, headers=headers)).json())[
                "status"
            ]
        )
        await client.close()
    assert answers == ["accepted", "duplicate"]


@pytest.mark.parametrize(
    ("event", "make", "settings", "reason"),
    [
        (
            "pull_request",
            lambda p: pr_payload(p, "closed"),
            {},
            "pull_request closed needs no plan",
        ),
        ("pull_request", lambda p: pr_payload(p, fork=True), {}, "forks are not planned"),
        (
            "issue_comment",
            lambda p: {**p.issue_comment(number=7, body="LGTM")},
            {},
            "not a /nixmox command",
        ),
        (
            "push",
            lambda p: p.push(before=SHA_A, after=SHA_B, branch="feature"),
            {"plan_branch_pushes": False},  # planned otherwise (tests/test_github_branch_push.py)
            "not the default branch",
        ),
        ("push", lambda p: p.push(before=SHA_A, after="0" * 40), {}, "deleted"),
        (
            "push",
            lambda p: p.push(before=SHA_A, after=SHA_B),
            {"apply_on_merge": False},
            "NIXMOX_APPLY_ON_MERGE",
        ),
        ("workflow_run", lambda p: p.ping(), {}, "workflow_run events are not used"),
    ],
    ids=[
        "pr-closed",
        "fork",
        "plain-comment",
        "other-branch",
        "deleted-branch",
        "no-apply-on-merge",
        "unused-event",
    ],
)
async def test_events_that_need_no_work_are_acknowledged_and_ignored(
    make_bot: Any, payloads: Payloads, event: str, make: Any, settings: dict[str, Any], reason: str
) -> None:
    bot = await make_bot(**settings)
    response = await bot.deliver(event, make(payloads))
    answer = await response.json()
    assert response.status == 200
    assert answer["status"] == "ignored"
    assert reason in answer["message"]
    assert await queued_jobs(bot) == []


async def test_comments_on_issues_and_by_bots_are_not_commands(
    make_bot: Any, payloads: Payloads
) -> None:
    bot = await make_bot()
    on_issue = payloads.issue_comment(number=7, body="/nixmox apply")
    del on_issue["issue"]["pull_request"]
    by_bot = payloads.issue_comment(number=7, body="/nixmox apply")
    by_bot["comment"]["user"]["type"] = "Bot"
    for payload in (on_issue, by_bot):
        assert (await (await bot.deliver("issue_comment", payload)).json())["status"] == "ignored"
    assert await queued_jobs(bot) == []


async def test_fork_prs_are_queued_when_plan_forks_is_on(make_bot: Any, payloads: Payloads) -> None:
    bot = await make_bot(plan_forks=True)
    response = await bot.deliver("pull_request", pr_payload(payloads, fork=True))
    assert (await response.json())["status"] == "accepted"
    (job,) = await queued_jobs(bot)
    assert job.payload["fork"] is True


@pytest.mark.parametrize("action", ["opened", "synchronize", "reopened", "ready_for_review"])
async def test_pull_request_actions_that_plan(
    make_bot: Any, payloads: Payloads, action: str
) -> None:
    bot = await make_bot()
    response = await bot.deliver("pull_request", pr_payload(payloads, action))
    assert (await response.json())["status"] == "accepted"
    (job,) = await queued_jobs(bot)
    assert job.kind == "github.plan"
    assert job.payload["head_sha"] == SHA_B and job.payload["base_sha"] == SHA_A
    assert job.payload["number"] == 7


async def test_accepted_work_survives_a_restart(
    aiohttp_client: Any,
    tmp_path: Path,
    fake_github: FakeGitHub,
    manifest_repo: ManifestRepo,
    payloads: Payloads,
) -> None:
    """The delivery is acknowledged by one app that stops at once; the next one does the work."""
    settings = bot_settings(tmp_path, fake_github.url, manifest_repo.path)
    base = manifest_repo.repo.heads.main.commit.hexsha
    fake_github.add_pull(7, head_sha=base, base_sha=base)
    first = await aiohttp_client(build_app(settings, start_worker=False))
    payload = payloads.pull_request("opened", number=7, head_sha=base, base_sha=base)
    body = json.dumps(payload).encode()
    response = await first.post(
        "/github/webhook", data=body, headers=delivery_headers("pull_request", body)
    )
    assert (await response.json())["status"] == "accepted"
    await first.close()
    assert fake_github.requests == []
    second_app = build_app(settings, start_worker=True)
    second = await aiohttp_client(second_app)
    await second_app[CONTEXT].require_jobs().drain()
    assert fake_github.last_status(base, "nixmox/plan")["state"] == "success"
    job = await second_app[CONTEXT].require_store().queue.get(1)
    assert job.state is JobState.DONE
    await second.close()


async def test_secrets_never_reach_the_logs(
    make_bot: Any, payloads: Payloads, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bot = await make_bot()
    await bot.deliver("pull_request", pr_payload(payloads), secret="wrong")
    await bot.deliver("pull_request", pr_payload(payloads))
    await bot.drain()  # planning fails (unknown commits): errors are logged
    text = caplog.text
    assert WEBHOOK_SECRET not in text
    assert DEFAULT_TOKEN not in text
    assert sign(b"x") not in text


async def test_webhook_metrics_count_outcomes(make_bot: Any, payloads: Payloads) -> None:
    bot = await make_bot()
    await bot.deliver("pull_request", pr_payload(payloads), delivery="m1")
    await bot.deliver("pull_request", pr_payload(payloads), delivery="m1")
    await bot.deliver("pull_request", pr_payload(payloads), secret="bad")
    text = await (await bot.client.get("/metrics")).text()
    assert 'nixmox_github_webhooks_total{event="pull_request",outcome="accepted"} 1.0' in text
    assert 'nixmox_github_webhooks_total{event="pull_request",outcome="duplicate"} 1.0' in text
    assert 'nixmox_github_webhooks_total{event="-",outcome="unauthorized"} 1.0' in text

"""Handler unit tests on the recording fakes: the calls a handler makes, without an HTTP server."""

from __future__ import annotations

from typing import Any, cast

from slack_sdk.web.async_client import AsyncWebClient

from bot.github.checks import ANNOTATIONS_PER_REQUEST, CheckRuns, Report
from bot.github.client import GitHubClient
from bot.github.pulls import MARKER_PREFIX, upsert_plan_comment
from bot.github.rest import DESCRIPTION_LIMIT, Repo, StatusState, set_status
from bot.slack.notifier import MessagePacer, SlackNotifier
from planner.findings import Finding, Severity
from planner.plan import Phase, Plan, Step
from state.events import DeploymentFinished, DeploymentStarted, DeploymentState
from tests.fakes.recording import RecordingGitHub, RecordingSlack

REPO = Repo("homelab", "nixmox")
BOT = "nixmox-bot[bot]"
COMMENTS = "/repos/homelab/nixmox/issues/7/comments?per_page=100"
SHA = "a" * 40


def github(fake: RecordingGitHub) -> GitHubClient:
    """The fake where a handler expects gidgethub's client (it has the same request methods)."""
    return cast(GitHubClient, fake)


def plan_comment(comment_id: int, body: str, login: str = BOT) -> dict[str, Any]:
    return {"id": comment_id, "body": f"{MARKER_PREFIX} -->\n{body}", "user": {"login": login}}


async def test_plan_comment_upsert_edits_in_place_and_deletes_the_extra_part() -> None:
    fake = RecordingGitHub()
    forged = plan_comment(5, "forged", login="mallory")
    fake.answer("GET", COMMENTS, [plan_comment(12, "part 2"), forged, plan_comment(11, "part 1")])
    parts = [f"{MARKER_PREFIX} -->\nnew part 1"]
    ids = await upsert_plan_comment(github(fake), REPO, 7, parts, BOT)
    assert ids == [11]
    assert fake.calls == [
        ("GET", COMMENTS, None),
        ("PATCH", "/repos/homelab/nixmox/issues/comments/11", {"body": parts[0]}),
        ("DELETE", "/repos/homelab/nixmox/issues/comments/12", None),
    ]


async def test_plan_comment_upsert_leaves_an_unchanged_part_and_adds_a_missing_one() -> None:
    fake = RecordingGitHub()
    first = plan_comment(11, "part 1")
    fake.answer("GET", COMMENTS, [first])
    fake.answer("POST", "/repos/homelab/nixmox/issues/7/comments", {"id": 13})
    ids = await upsert_plan_comment(github(fake), REPO, 7, [first["body"], "part 2"], BOT)
    assert ids == [11, 13]
    assert fake.made("PATCH") == [] and fake.made("DELETE") == []
    assert fake.made("POST") == [("/repos/homelab/nixmox/issues/7/comments", {"body": "part 2"})]


async def test_a_status_is_posted_on_the_commit_with_a_one_line_description() -> None:
    fake = RecordingGitHub()
    await set_status(
        github(fake), REPO, SHA, StatusState.FAILURE, "nixmox/plan", "two\nlines " + "x" * 200,
        target_url="http://127.0.0.1/plans/1",
    )  # fmt: skip
    [(url, data)] = fake.made("POST")
    assert url == f"/repos/homelab/nixmox/statuses/{SHA}"
    assert data["state"] == "failure" and data["context"] == "nixmox/plan"
    assert data["target_url"] == "http://127.0.0.1/plans/1"
    assert "\n" not in data["description"] and len(data["description"]) == DESCRIPTION_LIMIT
    assert data["description"].startswith("two lines x") and data["description"].endswith("…")


async def test_a_check_run_update_takes_over_the_unfinished_run_and_batches_annotations() -> None:
    fake = RecordingGitHub()
    lookup = (
        f"/repos/homelab/nixmox/commits/{SHA}/check-runs?check_name=nixmox%2Fplan&filter=latest"
    )
    fake.answer(
        "GET", lookup, {"check_runs": [{"id": 41, "name": "nixmox/plan", "status": "queued"}]}
    )
    findings = [
        Finding(severity=Severity.ERROR, code="bad", message=f"bad {n}", file="m.nix", line=n)
        for n in range(1, 121)
    ]
    report = Report(
        StatusState.FAILURE, "120 errors", "http://127.0.0.1/plans/2", findings=findings
    )
    await CheckRuns(github(fake), REPO).final(SHA, "nixmox/plan", report)
    assert fake.calls[0] == ("GET", lookup, None)
    assert fake.made("POST") == []  # the run another job started is updated, not doubled
    patches = fake.made("PATCH")
    assert {url for url, _ in patches} == {"/repos/homelab/nixmox/check-runs/41"}
    sizes = [len(data["output"]["annotations"]) for _, data in patches]
    assert sizes == [ANNOTATIONS_PER_REQUEST, ANNOTATIONS_PER_REQUEST, 20]
    assert all("conclusion" not in data for _, data in patches[:-1])
    last = patches[-1][1]
    assert (last["status"], last["conclusion"]) == ("completed", "failure")
    assert last["details_url"] == "http://127.0.0.1/plans/2"


async def test_slack_progress_edits_the_message_it_took_over() -> None:
    slack = RecordingSlack()
    plan = Plan(steps=[Step(id="verify:app", phase=Phase.VERIFY, service="app")])
    links: list[tuple[str, str, str]] = []

    async def link(deployment_id: str, channel: str, ts: str) -> None:
        links.append((deployment_id, channel, ts))

    notifier = SlackNotifier(
        cast(AsyncWebClient, slack), "C1", ts="111.222", pacer=MessagePacer(0.0), on_message=link
    )
    await notifier(DeploymentStarted("d1", plan))
    await notifier(DeploymentFinished("d1", DeploymentState.SUCCEEDED))
    assert slack.made("chat.postMessage") == []  # the approval message is edited, not reposted
    edits = slack.made("chat.update")
    assert edits and {(args["channel"], args["ts"]) for args in edits} == {("C1", "111.222")}
    assert "app" in edits[-1]["text"] and edits[-1]["blocks"]
    assert links == [("d1", "C1", "111.222")]
    assert notifier.updates_sent == len(edits)

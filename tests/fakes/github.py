"""A fake GitHub REST API on 127.0.0.1 that checks every request against GitHub's OpenAPI.

Each request is validated with openapi-core against `@octokit/openapi`'s description of
api.github.com (path, method, parameters, JSON body); one that does not match is answered 400
and recorded in `violations`, so a test ends with `assert fake.violations == []`. Answers are
GitHub's own example responses (`components/examples`) adapted to the state the fake keeps:
comments, commit statuses, deployments and their statuses, reactions, collaborator
permissions, reviews and pull requests. `GET /user` (token) and `GET /app` (App JWT) name the
bot: the bot's own comments are authored by `bot_login` (`<app_slug>[bot]` for an App). `fail_next()` makes the next N matching requests fail
with a 5xx, a secondary rate limit (403 + retry-after), a 429 or an exhausted quota, to test
retries. Every request is recorded as `(method, path, json)`.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import jwt
from aiohttp import web
from openapi_core import OpenAPI
from openapi_core.contrib.aiohttp import AIOHTTPOpenAPIWebRequest

BOT_LOGIN = "nixmox[bot]"
APP_SLUG = "nixmox"
DEFAULT_TOKEN = "ghp_faketoken0000000000000000000000000000"
PER_PAGE_DEFAULT = 30
ANNOTATIONS_PER_REQUEST = 50  # GitHub answers 422 to more in one request


class Failure(StrEnum):
    SERVER_ERROR = "5xx"
    SECONDARY_LIMIT = "secondary"
    TOO_MANY = "429"
    RATE_LIMIT = "ratelimit"


@dataclass
class Recorded:
    method: str
    path: str
    json: Any
    status: int = 0
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class PlannedFailure:
    kind: Failure
    remaining: int
    method: str | None
    path: re.Pattern[str] | None
    retry_after: int | None


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Handler = Callable[[web.Request, dict[str, str], Any], Awaitable[web.Response]]


@dataclass(frozen=True)
class Permission:
    """The GitHub App permission an endpoint needs (GitHub's REST docs, "fine-grained")."""

    name: str
    level: str  # read | write

    def granted_by(self, granted: dict[str, str]) -> bool:
        level = granted.get(self.name)
        return level == "write" or (level == "read" and self.level == "read")


PULLS_READ = Permission("pull_requests", "read")
PULLS_WRITE = Permission("pull_requests", "write")
STATUSES = Permission("statuses", "write")
DEPLOYMENTS = Permission("deployments", "write")
DEPLOYMENTS_READ = Permission("deployments", "read")
METADATA = Permission("metadata", "read")
CHECKS = Permission("checks", "write")
CHECKS_READ = Permission("checks", "read")
NOT_ACCESSIBLE = "Resource not accessible by integration"


class FakeGitHub:
    """The fake; `await start()` serves it, `url` is its base URL."""

    def __init__(
        self,
        openapi: OpenAPI,
        examples: dict[str, Any],
        *,
        repo: str = "octo-org/homelab",
        token: str = DEFAULT_TOKEN,
        app_id: int | None = None,
        app_public_key: str | None = None,
        installation_id: int = 4242,
    ) -> None:
        self.openapi = openapi
        self.examples = examples
        self.owner, self.name = repo.split("/")
        self.tokens = {token} if token else set()
        self.app_id = app_id
        self.app_public_key = app_public_key
        self.installation_id = installation_id
        # whom the bot's token belongs to (an App's comments are by `<slug>[bot]` either way)
        self.bot_login = BOT_LOGIN
        self.requests: list[Recorded] = []
        self.violations: list[str] = []
        self.failures: list[PlannedFailure] = []
        self.issued_tokens: list[str] = []
        # state
        self.comments: dict[int, dict[str, Any]] = {}
        self.statuses: list[dict[str, Any]] = []
        self.deployments: dict[int, dict[str, Any]] = {}
        self.deployment_statuses: dict[int, list[dict[str, Any]]] = {}
        self.reactions: list[dict[str, Any]] = []
        self.permissions: dict[str, str] = {}
        self.reviews: dict[int, list[dict[str, Any]]] = {}
        self.pulls: dict[int, dict[str, Any]] = {}
        self.check_runs: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1000)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.routes: list[tuple[str, re.Pattern[str], Handler, Permission | None]] = []
        # App mode: what the installation was granted (an installation token may do no more),
        # and every permission the bot's calls needed
        self.granted: dict[str, str] | None = None
        self.used_permissions: set[Permission] = set()
        self._route("POST", r"/app/installations/(?P<id>\d+)/access_tokens", self.access_token)
        self._route("GET", r"/app", self.get_app)
        self._route("GET", r"/user", self.get_user)
        repo_prefix = r"/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)"
        comments = repo_prefix + r"/issues/(?P<number>\d+)/comments"
        comment = repo_prefix + r"/issues/comments/(?P<id>\d+)"
        self._route("GET", repo_prefix + r"/installation", self.repo_installation)
        self._route("GET", comments, self.list_comments, PULLS_READ)
        self._route("POST", comments, self.add_comment, PULLS_WRITE)
        self._route("GET", comment, self.get_comment, PULLS_READ)
        self._route("PATCH", comment, self.edit_comment, PULLS_WRITE)
        self._route("DELETE", comment, self.delete_comment, PULLS_WRITE)
        self._route("POST", comment + r"/reactions", self.add_reaction, PULLS_WRITE)
        self._route(
            "POST", repo_prefix + r"/statuses/(?P<sha>[0-9a-f]{40})", self.add_status, STATUSES
        )
        self._route("POST", repo_prefix + r"/deployments", self.add_deployment, DEPLOYMENTS)
        self._route("POST", repo_prefix + r"/check-runs", self.add_check_run, CHECKS)
        self._route(
            "GET",
            repo_prefix + r"/commits/(?P<ref>[^/]+)/check-runs",
            self.list_check_runs,
            CHECKS_READ,
        )
        self._route(
            "PATCH", repo_prefix + r"/check-runs/(?P<id>\d+)", self.update_check_run, CHECKS
        )
        self._route("GET", repo_prefix + r"/deployments", self.list_deployments, DEPLOYMENTS_READ)
        self._route(
            "POST",
            repo_prefix + r"/deployments/(?P<id>\d+)/statuses",
            self.add_deployment_status,
            DEPLOYMENTS,
        )
        self._route(
            "GET",
            repo_prefix + r"/collaborators/(?P<user>[^/]+)/permission",
            self.get_permission,
            METADATA,
        )
        self._route(
            "GET", repo_prefix + r"/pulls/(?P<number>\d+)/reviews", self.list_reviews, PULLS_READ
        )
        self._route("GET", repo_prefix + r"/pulls/(?P<number>\d+)", self.get_pull, PULLS_READ)
        self._route("GET", repo_prefix + r"/pulls", self.list_pulls, PULLS_READ)

    # --- set-up -------------------------------------------------------------------------------

    def _route(
        self, method: str, pattern: str, handler: Handler, permission: Permission | None = None
    ) -> None:
        self.routes.append((method, re.compile(f"^{pattern}$"), handler, permission))

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # started above: the site has its server
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def fail_next(
        self,
        count: int,
        kind: Failure = Failure.SERVER_ERROR,
        *,
        method: str | None = None,
        path: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """The next `count` requests (matching `method` and the `path` regex) fail like this."""
        self.failures.append(
            PlannedFailure(kind, count, method, re.compile(path) if path else None, retry_after)
        )

    def example(self, name: str) -> Any:
        return copy.deepcopy(self.examples[name]["value"])

    def add_pull(
        self,
        number: int,
        *,
        head_sha: str,
        base_sha: str,
        author: str = "alice",
        base_ref: str = "main",
        head_ref: str = "feature",
        fork: bool = False,
        mergeable: bool | None = True,
        state: str = "open",
        draft: bool = False,
    ) -> dict[str, Any]:
        """A pull request the API will describe (from the `pull-request` example)."""
        pull = self.example("pull-request")
        repo_obj = pull["base"]["repo"]
        repo_obj.update(
            name=self.name,
            full_name=f"{self.owner}/{self.name}",
            clone_url=f"https://github.com/{self.owner}/{self.name}.git",
        )
        repo_obj["owner"]["login"] = self.owner
        pull.update(number=number, state=state, draft=draft, mergeable=mergeable, merged=False)
        pull["user"]["login"] = author
        pull["base"].update(sha=base_sha, ref=base_ref)
        pull["head"].update(sha=head_sha, ref=head_ref)
        head_repo = copy.deepcopy(repo_obj)
        if fork:
            head_repo.update(id=repo_obj["id"] + 1, full_name=f"{author}/{self.name}", fork=True)
        pull["head"]["repo"] = head_repo
        self.pulls[number] = pull
        return pull

    def add_review(self, number: int, user: str, state: str, commit_id: str | None = None) -> None:
        """A review on `commit_id` (default: the PR's head as the fake knows it now)."""
        review = self.example("pull-request-review-items")[0]
        if commit_id is None and number in self.pulls:
            commit_id = self.pulls[number]["head"]["sha"]
        review.update(id=next(self._ids), state=state, commit_id=commit_id or review["commit_id"])
        review["user"]["login"] = user
        self.reviews.setdefault(number, []).append(review)

    def add_comment_by(self, number: int, user: str, body: str) -> dict[str, Any]:
        """A comment someone else wrote on the PR (as a browser would post it)."""
        comment = self.example("issue-comment")
        comment_id = next(self._ids)
        comment.update(id=comment_id, body=body, created_at=now_iso(), updated_at=now_iso())
        comment["user"].update(login=user, type="User")
        comment["_number"] = number
        comment["_edits"] = 0
        self.comments[comment_id] = comment
        return comment

    # --- queries for assertions ---------------------------------------------------------------

    def comments_on(self, number: int) -> list[dict[str, Any]]:
        return sorted(
            (c for c in self.comments.values() if c["_number"] == number), key=lambda c: c["id"]
        )

    def statuses_for(self, sha: str, context: str | None = None) -> list[dict[str, Any]]:
        return [
            s
            for s in self.statuses
            if s["_sha"] == sha and (context is None or s["context"] == context)
        ]

    def last_status(self, sha: str, context: str) -> dict[str, Any] | None:
        found = self.statuses_for(sha, context)
        return found[-1] if found else None

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        pattern = re.compile(path) if path else None
        return [
            r
            for r in self.requests
            if (method is None or r.method == method)
            and (pattern is None or pattern.search(r.path))
        ]

    # --- the server ---------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        record = Recorded(request.method, request.path, data, query=dict(request.query))
        self.requests.append(record)
        response = await self._answer(request, body, data)
        record.status = response.status
        return response

    async def _answer(self, request: web.Request, body: bytes, data: Any) -> web.Response:
        problem = self.validate(request, body)
        if problem is not None:
            self.violations.append(f"{request.method} {request.path}: {problem}")
            return web.json_response({"message": f"Invalid request: {problem}"}, status=400)
        if request.headers.get("Accept", "").find("application/vnd.github") < 0:
            self.violations.append(f"{request.method} {request.path}: no GitHub Accept header")
        failure = self._planned_failure(request)
        if failure is not None:
            return failure
        for method, pattern, handler, permission in self.routes:
            match = pattern.match(request.path)
            if match and method == request.method:
                auth_problem = self.authenticate(request, match.groupdict())
                if auth_problem is not None:
                    return web.json_response({"message": auth_problem}, status=401)
                if permission is not None and not self.permitted(request, permission):
                    self.violations.append(
                        f"{request.method} {request.path}: needs {permission.name}: "
                        f"{permission.level}, which the installation was not granted"
                    )
                    return web.json_response({"message": NOT_ACCESSIBLE}, status=403)
                if "owner" in match.groupdict() and (
                    match["owner"] != self.owner or match["repo"] != self.name
                ):
                    self.violations.append(f"{request.method} {request.path}: wrong repository")
                    return web.json_response({"message": "Not Found"}, status=404)
                return await handler(request, match.groupdict(), data)
        self.violations.append(f"{request.method} {request.path}: not implemented by the fake")
        return web.json_response({"message": "Not implemented by the fake"}, status=501)

    def validate(self, request: web.Request, body: bytes) -> str | None:
        try:
            self.openapi.validate_request(AIOHTTPOpenAPIWebRequest(request, body=body or None))
        except Exception as exc:
            cause = getattr(exc, "__cause__", None)
            detail = f"{type(exc).__name__}: {exc}"
            if cause is not None:
                detail += f" ({cause})"
            return detail[:2000]
        return None

    def authenticate(self, request: web.Request, params: dict[str, str]) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        app_path = request.path == "/app" or request.path.startswith("/app/")
        if app_path or request.path.endswith("/installation"):
            if scheme.lower() != "bearer" or self.app_public_key is None:
                return "A JSON web token could not be decoded"
            try:
                claims = jwt.decode(credential, self.app_public_key, algorithms=["RS256"])
            except jwt.PyJWTError as exc:
                return f"A JSON web token could not be decoded: {exc}"
            if str(claims.get("iss")) != str(self.app_id):
                return "'Issuer' claim ('iss') must be the App's id"
            return None
        if scheme.lower() not in ("token", "bearer") or credential not in self.tokens:
            return "Bad credentials"
        return None

    def permitted(self, request: web.Request, permission: Permission) -> bool:
        """An installation token may use only what the installation was granted."""
        token = request.headers.get("Authorization", "").partition(" ")[2]
        if token not in self.issued_tokens:
            return True  # a personal token: its scopes are not modelled
        self.used_permissions.add(permission)
        return self.granted is None or permission.granted_by(self.granted)

    def _planned_failure(self, request: web.Request) -> web.Response | None:
        for planned in self.failures:
            if planned.remaining <= 0:
                continue
            if planned.method and planned.method != request.method:
                continue
            if planned.path and not planned.path.search(request.path):
                continue
            planned.remaining -= 1
            headers = {}
            if planned.retry_after is not None:
                headers["Retry-After"] = str(planned.retry_after)
            if planned.kind is Failure.SERVER_ERROR:
                return web.json_response({"message": "Server Error"}, status=502, headers=headers)
            if planned.kind is Failure.SECONDARY_LIMIT:
                return web.json_response(
                    {"message": "You have exceeded a secondary rate limit."},
                    status=403,
                    headers=headers,
                )
            if planned.kind is Failure.TOO_MANY:
                return web.json_response(
                    {"message": "Too many requests"}, status=429, headers=headers
                )
            reset = int(time.time()) + (planned.retry_after or 1)
            return web.json_response(
                {"message": "API rate limit exceeded"},
                status=403,
                headers={
                    "X-RateLimit-Limit": "5000",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": str(reset),
                    "X-RateLimit-Used": "5000",
                },
            )
        return None

    # --- handlers -----------------------------------------------------------------------------

    def _repo_url(self) -> str:
        return f"{self.url}/repos/{self.owner}/{self.name}"

    async def access_token(self, request: web.Request, params: dict[str, str], data: Any):
        if int(params["id"]) != self.installation_id:
            return web.json_response({"message": "Not Found"}, status=404)
        token = self.example("installation-token")
        token["token"] = "ghs_" + secrets.token_hex(18)
        expires = datetime.now(UTC) + timedelta(hours=1)
        token["expires_at"] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
        if self.granted is not None:
            token["permissions"] = dict(self.granted)
        self.tokens.add(token["token"])
        self.issued_tokens.append(token["token"])
        return web.json_response(token, status=201)

    async def get_app(self, request: web.Request, params: dict[str, str], data: Any):
        app = self.example("integration")
        app.update(id=self.app_id, slug=APP_SLUG)
        return web.json_response(app)

    async def get_user(self, request: web.Request, params: dict[str, str], data: Any):
        # an installation token has no user: GitHub answers 403 to /user
        token = request.headers.get("Authorization", "").partition(" ")[2]
        if token in self.issued_tokens:
            return web.json_response(
                {"message": "Resource not accessible by integration"}, status=403
            )
        user = self.example("private-user-response-with-public-and-private-profile-information")
        user.update(login=self.bot_login, type="User")
        return web.json_response(user)

    async def repo_installation(self, request: web.Request, params: dict[str, str], data: Any):
        installation = self.example("installation")
        installation["id"] = self.installation_id
        installation["app_id"] = self.app_id
        return web.json_response(installation)

    def _page(self, request: web.Request, items: list[Any]) -> web.Response:
        per_page = int(request.query.get("per_page", PER_PAGE_DEFAULT))
        page = int(request.query.get("page", 1))
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = {}
        if page * per_page < len(items):
            query = {**request.query, "page": str(page + 1), "per_page": str(per_page)}
            next_url = request.url.with_query(query)
            next_url = next_url.with_host("127.0.0.1").with_port(request.url.port)
            headers["Link"] = f'<{next_url}>; rel="next"'
        return web.json_response(chunk, headers=headers)

    def _public(self, comment: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in comment.items() if not k.startswith("_")}

    async def list_comments(self, request: web.Request, params: dict[str, str], data: Any):
        items = [self._public(c) for c in self.comments_on(int(params["number"]))]
        return self._page(request, items)

    async def add_comment(self, request: web.Request, params: dict[str, str], data: Any):
        number = int(params["number"])
        body = data["body"]
        if len(body) > 65536:
            return web.json_response(
                {
                    "message": "Validation Failed",
                    "errors": [
                        {
                            "code": "custom",
                            "field": "body",
                            "message": "body is too long (maximum is 65536 characters)",
                        }
                    ],
                },
                status=422,
            )
        comment = self.example("issue-comment")
        comment_id = next(self._ids)
        comment.update(
            id=comment_id,
            body=body,
            url=f"{self._repo_url()}/issues/comments/{comment_id}",
            html_url=f"https://github.com/{self.owner}/{self.name}/pull/{number}#issuecomment-{comment_id}",
            issue_url=f"{self._repo_url()}/issues/{number}",
            created_at=now_iso(),
            updated_at=now_iso(),
        )
        comment["user"].update(login=self.bot_login, type="Bot")
        comment["_number"] = number
        comment["_edits"] = 0
        self.comments[comment_id] = comment
        return web.json_response(self._public(comment), status=201)

    async def get_comment(self, request: web.Request, params: dict[str, str], data: Any):
        comment = self.comments.get(int(params["id"]))
        if comment is None:
            return web.json_response({"message": "Not Found"}, status=404)
        return web.json_response(self._public(comment))

    async def edit_comment(self, request: web.Request, params: dict[str, str], data: Any):
        comment = self.comments.get(int(params["id"]))
        if comment is None:
            return web.json_response({"message": "Not Found"}, status=404)
        if len(data["body"]) > 65536:
            return web.json_response({"message": "Validation Failed"}, status=422)
        comment.update(body=data["body"], updated_at=now_iso())
        comment["_edits"] += 1
        return web.json_response(self._public(comment))

    async def delete_comment(self, request: web.Request, params: dict[str, str], data: Any):
        if self.comments.pop(int(params["id"]), None) is None:
            return web.json_response({"message": "Not Found"}, status=404)
        return web.Response(status=204)

    async def add_reaction(self, request: web.Request, params: dict[str, str], data: Any):
        reaction = self.example("reaction")
        reaction.update(id=next(self._ids), content=data["content"], created_at=now_iso())
        reaction["user"]["login"] = BOT_LOGIN
        reaction["_comment"] = int(params["id"])
        self.reactions.append(reaction)
        return web.json_response(
            {k: v for k, v in reaction.items() if not k.startswith("_")}, status=201
        )

    async def add_status(self, request: web.Request, params: dict[str, str], data: Any):
        status = self.example("status")
        status.update(
            id=next(self._ids),
            state=data["state"],
            context=data.get("context", "default"),
            description=data.get("description"),
            target_url=data.get("target_url"),
            created_at=now_iso(),
            updated_at=now_iso(),
        )
        status["_sha"] = params["sha"]
        self.statuses.append(status)
        return web.json_response(
            {k: v for k, v in status.items() if not k.startswith("_")}, status=201
        )

    def check_runs_for(self, sha: str, name: str | None = None) -> list[dict[str, Any]]:
        return [
            run
            for run in self.check_runs.values()
            if run["head_sha"] == sha and (name is None or run["name"] == name)
        ]

    def _too_many_annotations(self, request: web.Request, data: Any) -> web.Response | None:
        annotations = (data.get("output") or {}).get("annotations") or []
        if len(annotations) <= ANNOTATIONS_PER_REQUEST:
            return None
        self.violations.append(f"{request.method} {request.path}: {len(annotations)} annotations")
        return web.json_response(
            {"message": "Only 50 annotations are allowed per request"}, status=422
        )

    def _apply_check_update(self, run: dict[str, Any], data: Any) -> None:
        for key in ("status", "conclusion", "details_url", "external_id", "name"):
            if key in data:
                run[key] = data[key]
        if "output" in data:
            output = dict(data["output"])
            run["annotations"].extend(output.pop("annotations", None) or [])
            run["output"].update(output)
        if run.get("conclusion") and run.get("status") != "completed":
            run["status"] = "completed"  # GitHub: a conclusion completes the run
        run["updates"].append(data)

    def _public_run(self, run: dict[str, Any]) -> dict[str, Any]:
        answer = self.example("check-run-example-of-completed-conclusion")
        answer.update(
            id=run["id"],
            name=run["name"],
            head_sha=run["head_sha"],
            status=run["status"],
            conclusion=run.get("conclusion"),
            details_url=run.get("details_url"),
        )
        answer["output"].update(
            title=run["output"].get("title"),
            summary=run["output"].get("summary"),
            text=run["output"].get("text"),
            annotations_count=len(run["annotations"]),
        )
        return answer

    async def add_check_run(self, request: web.Request, params: dict[str, str], data: Any):
        refused = self._too_many_annotations(request, data)
        if refused is not None:
            return refused
        run: dict[str, Any] = {
            "id": next(self._ids),
            "name": data["name"],
            "head_sha": data["head_sha"],
            "status": "queued",
            "conclusion": None,
            "output": {},
            "annotations": [],
            "updates": [],
        }
        self._apply_check_update(run, data)
        self.check_runs[run["id"]] = run
        return web.json_response(self._public_run(run), status=201)

    async def list_check_runs(self, request: web.Request, params: dict[str, str], data: Any):
        name = request.query.get("check_name")
        runs = sorted(self.check_runs_for(params["ref"], name), key=lambda r: -r["id"])
        if request.query.get("filter", "latest") == "latest":
            runs = runs[:1]
        public = [self._public_run(run) for run in runs]
        return web.json_response({"total_count": len(public), "check_runs": public})

    async def update_check_run(self, request: web.Request, params: dict[str, str], data: Any):
        run = self.check_runs.get(int(params["id"]))
        if run is None:
            return web.json_response({"message": "Not Found"}, status=404)
        refused = self._too_many_annotations(request, data)
        if refused is not None:
            return refused
        self._apply_check_update(run, data)
        return web.json_response(self._public_run(run))

    async def add_deployment(self, request: web.Request, params: dict[str, str], data: Any):
        deployment = self.example("deployment-simple-example")
        deployment_id = next(self._ids)
        deployment.update(
            id=deployment_id,
            sha=data["ref"],
            ref=data["ref"],
            environment=data.get("environment", "production"),
            original_environment=data.get("environment", "production"),
            description=data.get("description"),
            payload=data.get("payload", {}),
            production_environment=data.get("production_environment", False),
            url=f"{self._repo_url()}/deployments/{deployment_id}",
            statuses_url=f"{self._repo_url()}/deployments/{deployment_id}/statuses",
            created_at=now_iso(),
            updated_at=now_iso(),
        )
        self.deployments[deployment_id] = deployment
        self.deployment_statuses[deployment_id] = []
        return web.json_response(deployment, status=201)

    async def list_deployments(self, request: web.Request, params: dict[str, str], data: Any):
        return self._page(request, list(self.deployments.values()))

    async def add_deployment_status(self, request: web.Request, params: dict[str, str], data: Any):
        deployment_id = int(params["id"])
        if deployment_id not in self.deployments:
            return web.json_response({"message": "Not Found"}, status=404)
        status = self.example("deployment-status")
        status.update(
            id=next(self._ids),
            state=data["state"],
            description=data.get("description", ""),
            log_url=data.get("log_url", ""),
            environment=self.deployments[deployment_id]["environment"],
            created_at=now_iso(),
            updated_at=now_iso(),
        )
        self.deployment_statuses[deployment_id].append(status)
        return web.json_response(status, status=201)

    async def get_permission(self, request: web.Request, params: dict[str, str], data: Any):
        user = params["user"]
        if user not in self.permissions:
            return web.json_response({"message": "Not Found"}, status=404)
        role = self.permissions[user]
        answer = self.example(
            "repository-collaborator-permission-response-if-user-has-admin-permissions"
        )
        legacy = {"maintain": "write", "triage": "read"}.get(role, role)
        answer.update(permission=legacy, role_name=role)
        answer["user"]["login"] = user
        return web.json_response(answer)

    async def list_reviews(self, request: web.Request, params: dict[str, str], data: Any):
        return self._page(request, self.reviews.get(int(params["number"]), []))

    async def list_pulls(self, request: web.Request, params: dict[str, str], data: Any):
        """`state` (default open), `head` (`owner:branch`) and `base` filters, as GitHub has."""
        state = request.query.get("state", "open")
        head = request.query.get("head")
        base = request.query.get("base")
        found = [
            pull
            for _, pull in sorted(self.pulls.items())
            if state in ("all", pull["state"])
            and (head is None or head == self._head_label(pull))
            and (base is None or base == pull["base"]["ref"])
        ]
        return self._page(request, found)

    @staticmethod
    def _head_label(pull: dict[str, Any]) -> str:
        """`owner:branch` of the PR's head (a fork's owner for a fork)."""
        owner = pull["head"]["repo"]["full_name"].split("/")[0]
        return f"{owner}:{pull['head']['ref']}"

    async def get_pull(self, request: web.Request, params: dict[str, str], data: Any):
        pull = self.pulls.get(int(params["number"]))
        if pull is None:
            return web.json_response({"message": "Not Found"}, status=404)
        return web.json_response(pull)

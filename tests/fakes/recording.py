"""Small fakes that record calls, bedevere-style, for handler unit tests without an HTTP server.

`RecordingGitHub` has gidgethub's `getitem`, `getiter`, `post`, `patch` and `delete`: each call
is recorded as `(method, url, data)` with the URL template expanded the way gidgethub expands
it, and answered from a small table keyed by `(method, url)`. `RecordingSlack` has the Web
client's `api_call`, recording `(method, args)`. The end-to-end tests keep the OpenAPI-checked
HTTP fakes of tests/fakes/github.py and tests/fakes/slack.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gidgethub.sansio import format_url

BASE_URL = "https://api.github.com"

Answer = dict[str, Any] | list[dict[str, Any]] | None


@dataclass
class RecordingGitHub:
    """gidgethub's request methods; every call lands in `calls`, answers come from `answers`."""

    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    calls: list[tuple[str, str, Any]] = field(default_factory=list)

    def answer(self, method: str, url: str, value: Answer) -> None:
        """What `method` on the expanded `url` (without the API's base URL) returns."""
        self.answers[(method, url)] = value

    def _record(self, method: str, url: str, url_vars: Mapping[str, Any], data: Any) -> Answer:
        expanded = format_url(url, dict(url_vars), base_url=BASE_URL).removeprefix(BASE_URL)
        self.calls.append((method, expanded, data))
        return self.answers.get((method, expanded))

    def made(self, method: str) -> list[tuple[str, Any]]:
        """The `(url, data)` of every call of one method, in order."""
        return [(url, data) for made, url, data in self.calls if made == method]

    async def getitem(self, url: str, url_vars: Mapping[str, Any] = {}, **_: Any) -> Any:
        return self._record("GET", url, url_vars, None) or {}

    async def getiter(
        self, url: str, url_vars: Mapping[str, Any] = {}, **_: Any
    ) -> AsyncIterator[Any]:
        for item in self._record("GET", url, url_vars, None) or []:
            yield item

    async def post(self, url: str, url_vars: Mapping[str, Any] = {}, *, data: Any, **_: Any) -> Any:
        return self._record("POST", url, url_vars, data) or {}

    async def patch(
        self, url: str, url_vars: Mapping[str, Any] = {}, *, data: Any, **_: Any
    ) -> Any:
        return self._record("PATCH", url, url_vars, data) or {}

    async def delete(
        self, url: str, url_vars: Mapping[str, Any] = {}, *, data: Any = None, **_: Any
    ) -> None:
        self._record("DELETE", url, url_vars, data)


@dataclass
class RecordingSlack:
    """The Web client's `api_call`: records `(method, args)`, answers `ok` with a fresh `ts`."""

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def api_call(
        self, api_method: str, *, json: dict[str, Any] | None = None, **more: Any
    ) -> dict[str, Any]:
        args = dict(json or more.get("params") or more.get("data") or {})
        self.calls.append((api_method, args))
        answer = {"ok": True, "ts": f"1700000000.{len(self.calls):06d}"}
        if args.get("ts"):
            answer["ts"] = str(args["ts"])  # an edit answers with the message it edited
        return {**answer, **self.answers.get(api_method, {})}

    def made(self, method: str) -> list[dict[str, Any]]:
        """The arguments of every call of one method, in order."""
        return [args for made, args in self.calls if made == method]

"""Plans posted to GitHub, kept so that `/plans/{key}` can show them later."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from planner.plan import Plan


class PlanArchive:
    """Plans posted to GitHub, kept as JSON files so `/plans/{key}` can show them later."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def key(plan: Plan) -> str:
        """The plan's digest; an invalid plan (no digest) is keyed by its content."""
        if plan.digest:
            return plan.digest
        text = json.dumps(plan.to_json(), sort_keys=True)
        return "invalid-" + hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path | None:
        if not key.replace("-", "").isalnum() or len(key) > 100:
            return None
        return self.directory / f"{key}.json"

    def save(self, plan: Plan) -> str:
        key = self.key(plan)
        path = self.path(key)
        assert path is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(plan.model_dump_json())
        partial.replace(path)
        return key

    def load(self, key: str) -> Plan | None:
        path = self.path(key)
        if path is None or not path.is_file():
            return None
        return Plan.model_validate_json(path.read_text())

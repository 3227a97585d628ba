"""The base of the models the planner outputs (findings, plans, previews)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Output(BaseModel):
    """A model the planner builds itself: its pydantic schema is built on first use, not at import.

    A `nixmox validate` of a valid manifest never validates or dumps one, so it skips their
    schema building (about a tenth of the command's start-up).
    """

    model_config = ConfigDict(defer_build=True)

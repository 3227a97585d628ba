"""Finding secrets before terraform runs: sensitive declarations and secret-looking names."""

from __future__ import annotations

import json
import re
from pathlib import Path

from runners.redact import (
    DEFAULT_SECRET_NAMES,
    REDACTED,
    Redactor,
    named_secrets,
    sensitive_variables,
)

NAMES = re.compile(DEFAULT_SECRET_NAMES, re.IGNORECASE)

DECLARATIONS = """
variable "plain" { type = string }
variable "one_line" { sensitive = true }
variable "braced" {
  type = object({ a = string })
  default = { a = "x}y" } # a comment's } counts for nothing
  /* nor does this one's } */
  validation {
    condition     = true
    error_message = "never {shown}."
  }
  sensitive = true
}
variable "nested_only" {
  validation {
    condition     = true
    error_message = "sensitive = true is only text here"
  }
}
variable "off" {
  sensitive = false
}
# variable "commented" { sensitive = true }
"""


def test_sensitive_variables_are_read_from_tf_and_tf_json_files(tmp_path: Path) -> None:
    (tmp_path / "variables.tf").write_text(DECLARATIONS)
    (tmp_path / "more.tf.json").write_text(
        json.dumps({"variable": {"json_secret": {"sensitive": True}, "json_plain": {}}})
    )
    (tmp_path / "broken.tf.json").write_text("{not json")
    assert sensitive_variables(tmp_path) == {"one_line", "braced", "json_secret"}


def test_strings_under_secret_looking_keys_at_any_depth_are_secrets() -> None:
    manifest = {
        "network": {
            "domain": "lab.lan",
            "outposts": {"radius": {"shared_secret": "radius-s3cret", "port": 1812}},
        },
        "services": {
            "app": {
                "hostname": "app.lab.lan",
                "variables": {
                    "DB_Password": "pw-value",
                    "api_tokens": ["tok-1", {"note": "tok-2"}],
                    "quota": "100GB",
                    "private": True,
                },
            }
        },
    }
    assert sorted(named_secrets(manifest, NAMES)) == ["pw-value", "radius-s3cret", "tok-1", "tok-2"]


def test_a_redactor_with_step_secrets_hides_them_and_keeps_the_rest() -> None:
    base = Redactor([r"hunter\d+"])
    step = base.with_values(["radius-s3cret", "abc"])
    text = "secret radius-s3cret, short abc, pattern hunter2"
    assert step.text(text) == f"secret {REDACTED}, short abc, pattern {REDACTED}"
    # the shared redactor learns nothing from one step
    assert base.text(text) == f"secret radius-s3cret, short abc, pattern {REDACTED}"

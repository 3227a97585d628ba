"""Configuration: one TOML file read once, strict about unknown keys; NIXMOX_* variables warned."""

from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bot.config import ConfigError, Settings, load_configuration, load_settings, unknown_variables
from cli.main import main
from runners.config import RunnerConfig

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "manifests" / "small.nix"


@pytest.fixture(autouse=True)
def no_nixmox_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings come from the file in these tests, not from the developer's shell."""
    for name in list(os.environ):
        if name.upper().startswith("NIXMOX_") and name != "NIXMOX_TESTDATA":
            monkeypatch.delenv(name)


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nixmox.toml"
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_configuration(path)
    return str(caught.value)


def test_an_unknown_runners_key_names_the_file_the_table_and_the_key(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[runners.nixos]\nbiuld = true\n")
    assert (
        config_error(path) == f"{path}: unknown setting [runners.nixos] biuld (did you mean build?)"
    )


def test_a_near_miss_gets_a_suggestion_at_every_level(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        'databse_url = "sqlite+aiosqlite:///x.db"\n'
        "[runners.simulate]\nscael = 0.1\n"
        "[runners.transport.ssh]\nconect_timeout = 3\n"
        '[[runners.nixos.deploy]]\nrunn = "true"\n',
    )
    lines = config_error(path).splitlines()
    assert lines == [f"{path}: unknown setting databse_url (did you mean database_url?)"]
    # the top level is checked first; with it fixed, every [runners] key is named at once
    path.write_text(path.read_text().replace("databse_url", "database_url"))
    assert sorted(config_error(path).splitlines()) == sorted(
        [
            f"{path}: unknown setting [runners.simulate] scael (did you mean scale?)",
            f"{path}: unknown setting [runners.transport.ssh] conect_timeout "
            "(did you mean connect_timeout?)",
            f"{path}: unknown setting [runners.nixos.deploy[0]] runn (did you mean run?)",
        ]
    )


def test_an_unknown_top_level_table_is_an_error(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[runers.simulate]\nscale = 2\n")
    assert config_error(path) == f"{path}: unknown setting runers (did you mean runners?)"


def test_free_form_tables_take_any_key(tmp_path: Path) -> None:
    path = config_file(
        tmp_path,
        "[runners.terraform.env]\nTF_LOG = 'warn'\n"
        "[runners.simulate.durations]\n'nix:core' = 0.5\n"
        "[runners.transport.addresses]\ngitea = '127.0.0.1'\n",
    )
    runners = load_configuration(path).runners
    assert runners.terraform.env == {"TF_LOG": "warn"}
    assert runners.simulate.durations["nix:core"] == 0.5
    assert runners.transport.addresses == {"gitea": "127.0.0.1"}


def test_the_file_is_parsed_once_for_settings_and_runners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(
        tmp_path, 'runner = "simulate"\nparallel = 7\n[runners.simulate]\nscale = 0.5\n'
    )
    loads: list[Any] = []
    real_load = tomllib.load

    def counting_load(handle: Any) -> dict[str, Any]:
        loads.append(handle)
        return real_load(handle)

    monkeypatch.setattr(tomllib, "load", counting_load)
    configuration = load_configuration(path)
    assert len(loads) == 1
    assert configuration.settings.parallel == 7 and configuration.settings.runner == "simulate"
    assert configuration.runners.simulate.scale == 0.5


def test_environment_wins_over_the_file_and_overrides_over_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(tmp_path, "parallel = 7\nplan_forks = true\n")
    monkeypatch.setenv("NIXMOX_PARALLEL", "3")
    settings = load_configuration(path).settings
    assert settings.parallel == 3 and settings.plan_forks is True
    assert load_configuration(path, parallel=9).settings.parallel == 9


def test_unknown_nixmox_variables_are_warnings_with_a_suggestion() -> None:
    environ = {
        "NIXMOX_PARALEL": "2",
        "NIXMOX_PARALLEL": "2",
        "NIXMOX_CONFIG": "x.toml",
        "NIXMOX_LOCK_LEASE": "30",
        "NIXMOX_TESTDATA": "/tmp/x",
        "NIXMOXIFY": "1",
        "HOME": "/root",
    }
    assert unknown_variables(environ) == [
        "unknown environment variable NIXMOX_PARALEL ignored (did you mean NIXMOX_PARALLEL?)"
    ]


def test_an_unknown_variable_does_not_stop_loading(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NIXMOX_OLD_SETTING", "1")
    monkeypatch.setenv("NIXMOX_PARALLEL", "5")
    configuration = load_configuration()
    assert configuration.settings.parallel == 5
    assert configuration.warnings == ["unknown environment variable NIXMOX_OLD_SETTING ignored"]
    with caplog.at_level("WARNING", logger="bot.config"):
        assert load_settings().parallel == 5
    assert "unknown environment variable NIXMOX_OLD_SETTING ignored" in caplog.text


def test_an_unknown_keyword_to_settings_is_refused() -> None:
    with pytest.raises(ValueError, match="paralel"):
        Settings(paralel=3)  # type: ignore[call-arg]  # the typo under test


def test_runner_config_from_toml_is_as_strict(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[runners.health]\nretires = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting \[runners.health\] retires"):
        RunnerConfig.from_toml(path)


# --- the commands ----------------------------------------------------------------------------


def test_serve_names_the_unknown_key_and_warns_about_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = config_file(tmp_path, "[runners.nixos]\nbiuld = true\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert result.exit_code == 1
    assert f"{path}: unknown setting [runners.nixos] biuld" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setenv("NIXMOX_RUNER", "simulate")
    monkeypatch.setenv("NIXMOX_RUNNER", "yolo")  # refused at start-up, after the warning
    path.write_text("")
    result = CliRunner().invoke(main, ["serve", "--config", str(path), "--port", "1"])
    assert result.exit_code == 1 and "cannot start" in result.output
    assert "warning: unknown environment variable NIXMOX_RUNER ignored" in result.output


def test_deploy_and_render_refuse_an_unknown_key(tmp_path: Path) -> None:
    path = config_file(tmp_path, "[runners.simulate]\nscael = 0.1\n")
    deploy = CliRunner().invoke(
        main, ["deploy", str(SMALL), "--runner", "simulate", "--config", str(path)]
    )
    assert deploy.exit_code == 2
    assert f"{path}: unknown setting [runners.simulate] scael (did you mean scale?)" in (
        deploy.output
    )
    render = CliRunner().invoke(
        main, ["render", str(SMALL), "--out", str(tmp_path / "out"), "--config", str(path)]
    )
    assert render.exit_code == 2
    assert f"{path}: unknown setting [runners.simulate] scael" in render.output
    assert "Traceback" not in deploy.output + render.output


# --- nothing reads the environment at import time -----------------------------------------------


def environment_reads_at_import(path: Path) -> list[int]:
    """Lines outside any function that read os.environ or os.getenv."""
    tree = ast.parse(path.read_text())
    inside_functions: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside_functions.update(id(child) for child in ast.walk(node))
    lines: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        else:
            continue
        if name in {"environ", "getenv"} and id(node) not in inside_functions:
            lines.append(node.lineno)
    return sorted(lines)


def test_no_module_reads_the_environment_at_import_time() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for package in ("planner", "state", "runners", "deployments", "bot", "cli")
        for path in sorted((ROOT / package).rglob("*.py"))
        for line in environment_reads_at_import(path)
    ]
    assert not found, f"environment read at import time: {found}"


def test_the_import_time_check_finds_a_module_level_read(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import os\nfrom os import environ\nA = os.environ.get('X')\n"
        "def f():\n    return os.getenv('Y')\nB = environ['Z']\n"
    )
    assert environment_reads_at_import(module) == [3, 6]

"""Settings refuse absurd values at start-up: durations past a day, numbers written in ways the
README does not document, and tokens too short to keep anyone out."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from graceful import Config, ConfigError
from graceful._core.config import MAX_SECONDS, MIN_TOKEN_LENGTH

if TYPE_CHECKING:
    from conftest import Spawn

DURATIONS = [
    "GRACEFUL_DELAY",
    "GRACEFUL_QUIET_PERIOD",
    "GRACEFUL_MIN_DELAY",
    "GRACEFUL_DRAIN_TIMEOUT",
    "GRACEFUL_INTERRUPT_TIMEOUT",
    "GRACEFUL_DRAIN_FILE_INTERVAL",
    "GRACEFUL_CHECK_TIMEOUT",
    "GRACEFUL_CHECK_CACHE",
    "GRACEFUL_EVENTS_HEARTBEAT",
]


@pytest.mark.parametrize("variable", DURATIONS)
@pytest.mark.parametrize("value", ["86401", "100000", "9999999999"])
def test_a_duration_past_a_day_is_refused_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable) as raised:
        Config.from_env(environ={variable: value})
    assert "at most 86400" in str(raised.value)


@pytest.mark.parametrize("variable", DURATIONS)
def test_a_duration_of_a_day_is_accepted(variable: str) -> None:
    environ = {variable: "86400"}
    if variable == "GRACEFUL_MIN_DELAY":  # min_delay may not exceed delay
        environ["GRACEFUL_DELAY"] = "86400"
    Config.from_env(environ=environ)


@pytest.mark.parametrize("name", ["delay", "drain_timeout", "events_heartbeat"])
def test_python_values_past_a_day_are_refused_too(name: str) -> None:
    for value in (MAX_SECONDS + 1, 10**400):
        changes: dict[str, Any] = {name: value}
        with pytest.raises(ConfigError, match=name):
            Config(**changes)


@pytest.mark.parametrize(
    "value", ["1_000", "\u0663", "1e10", "1E3", "+5", "-0", "inf", "nan", "0x10"]
)
@pytest.mark.parametrize("variable", ["GRACEFUL_DRAIN_TIMEOUT", "GRACEFUL_EVENTS_HEARTBEAT"])
def test_only_plain_decimals_are_numbers(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"{variable}=.*is not a number"):
        Config.from_env(environ={variable: value})


@pytest.mark.parametrize("value", ["1_000", "\u0663", "1e2", "+5", "10.0"])
def test_only_plain_whole_numbers_are_counts(value: str) -> None:
    with pytest.raises(ConfigError, match="GRACEFUL_EVENTS_MAX_SUBSCRIBERS"):
        Config.from_env(environ={"GRACEFUL_EVENTS_MAX_SUBSCRIBERS": value})


@pytest.mark.parametrize("value", ["2", "0.5", ".5", "2.", " 3 "])
def test_plain_decimals_are_accepted(value: str) -> None:
    assert Config.from_env(environ={"GRACEFUL_DRAIN_TIMEOUT": value}).drain_timeout == float(value)


@pytest.mark.parametrize("token", ["Q", "short-Token", "x" * (MIN_TOKEN_LENGTH - 1)])
def test_a_short_token_is_refused_without_echoing_it(token: str) -> None:
    makes: list[Callable[[], Config]] = [
        lambda: Config(token=token),
        lambda: Config.from_env(environ={"GRACEFUL_TOKEN": token}),
    ]
    for make in makes:
        with pytest.raises(ConfigError, match="too short") as raised:
            make()
        assert f"at least {MIN_TOKEN_LENGTH}" in str(raised.value)
        assert token not in str(raised.value)


def test_a_token_of_the_minimum_length_is_accepted() -> None:
    assert Config(token="k" * MIN_TOKEN_LENGTH).token == "k" * MIN_TOKEN_LENGTH


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("variable", "value"),
    [("GRACEFUL_DELAY", "1e10"), ("GRACEFUL_DRAIN_TIMEOUT", "100000"), ("GRACEFUL_TOKEN", "t")],
)
def test_gunicorn_refuses_to_start_with_an_absurd_setting_and_names_it(
    spawn: Spawn, tmp_path: Path, free_port: int, variable: str, value: str
) -> None:
    app = tmp_path / "bounds_app.py"
    app.write_text(
        "import graceful\n"
        "def inner(environ, start_response):\n"
        "    start_response('200 OK', [])\n"
        "    return [b'ok']\n"
        "app = graceful.WSGIMiddleware(inner)\n"
    )
    proc = spawn(
        [
            sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn",
            "-b", f"127.0.0.1:{free_port}", "bounds_app:app",
        ],
        env={variable: value},
        cwd=tmp_path,
        name="gunicorn",
    )  # fmt: skip
    assert proc.wait(30) != 0
    output = proc.output()
    assert "ConfigError" in output and variable in output, output

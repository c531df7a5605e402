"""Config: every bad value gets a ConfigError that names the setting, the value and what is allowed;
``from_env`` reads GRACEFUL_* variables; the token never shows up in messages or reprs."""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any

import pytest

from graceful import Config, ConfigError

SECONDS = [
    "delay",
    "min_delay",
    "drain_timeout",
    "interrupt_timeout",
    "drain_file_interval",
    "check_timeout",
    "check_cache",
    "events_heartbeat",
]
#: Durations whose 0 means nothing (a heartbeat every instant, a check given no time): > 0.
POSITIVE = ["check_timeout", "events_heartbeat"]
BAD_SECONDS: list[Any] = [-1, -0.001, math.nan, math.inf, -math.inf, True, False, "5", None, [1]]
PATHS = ["livez_path", "readyz_path", "control_prefix"]
BAD_PATHS: list[Any] = [
    "readyz",  # no leading slash
    "/readyz/",  # trailing slash
    "/readyz?full=1",
    "/ready#z",
    "/",
    "",
    "/ready z",
    "/rédyz",
    5,
    None,
]
SECRET = "s3cr3t-Token_value"


def config_error(**settings: Any) -> str:
    with pytest.raises(ConfigError) as info:
        Config(**settings)
    return str(info.value)


def env_error(environ: dict[str, str]) -> ConfigError:
    """The :class:`ConfigError` that ``Config.from_env(environ=environ)`` raises."""
    with pytest.raises(ConfigError) as info:
        Config.from_env(environ=environ)
    return info.value


def refused_saying(says: list[str], **settings: Any) -> str:
    """The message of the :class:`ConfigError` that ``Config(**settings)`` raises, which must
    say each of ``says``."""
    message = config_error(**settings)
    for part in says:
        assert part in message, f"{part!r} not in {message!r}"
    return message


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_defaults_are_valid_and_documented() -> None:
    config = Config(delay=2.0)
    assert config.quiet_period is None
    assert config.drain_timeout == 25.0
    assert (config.livez_path, config.readyz_path) == ("/livez", "/readyz")
    assert config.control_prefix == "/-/graceful"
    assert config.token is None
    assert config.drain_file is None
    assert dict(config.checks) == {}
    for field in dataclasses.fields(Config):
        assert field.metadata["doc"], field.name


@pytest.mark.parametrize("name", SECONDS)
@pytest.mark.parametrize("value", BAD_SECONDS, ids=repr)
def test_bad_seconds_name_setting_value_and_what_is_allowed(name: str, value: Any) -> None:
    refused_saying(**{name: value}, says=[f"{name}={value!r}", "expected a", "number of seconds"])


@pytest.mark.parametrize("value", [*BAD_SECONDS[:-2], 0, 0.0], ids=repr)
def test_bad_quiet_period_names_setting_value_and_what_is_allowed(value: Any) -> None:
    message = refused_saying(
        quiet_period=value, min_delay=0.0, says=[f"quiet_period={value!r}", "number of seconds"]
    )
    if type(value) in (int, float) and value == 0:
        assert "> 0" in message


@pytest.mark.parametrize("name", [n for n in SECONDS if n not in POSITIVE])
def test_zero_and_whole_numbers_are_accepted_as_seconds(name: str) -> None:
    # 0 means "none" here: no delay, no wait, no cache, the drain file looked at every request.
    settings: dict[str, Any] = {"delay": 3.0, name: 0}
    config = Config(**settings)
    assert getattr(config, name) == 0.0
    assert isinstance(getattr(config, name), float)


@pytest.mark.parametrize("name", POSITIVE)
@pytest.mark.parametrize("value", [0, 0.0, -0.0], ids=repr)
def test_zero_is_refused_where_it_means_nothing(name: str, value: float) -> None:
    refused_saying(
        **{name: value}, says=[f"{name}={value!r} is not allowed", "number of seconds > 0"]
    )
    settings: dict[str, Any] = {name: 3}
    assert getattr(Config(**settings), name) == 3.0  # whole numbers are fine


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"], ids=repr)
def test_bad_subscriber_cap_names_setting_value_and_what_is_allowed(value: Any) -> None:
    refused_saying(
        events_max_subscribers=value, says=[f"events_max_subscribers={value!r}", "whole number"]
    )


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("value", BAD_PATHS, ids=repr)
def test_bad_paths_name_setting_value_and_what_is_allowed(name: str, value: Any) -> None:
    refused_saying(
        **{name: value}, says=[f"{name}={value!r}", "leading slash", "no trailing slash", "'?'"]
    )


def test_livez_and_readyz_must_differ() -> None:
    refused_saying(
        livez_path="/health",
        readyz_path="/health",
        says=["livez_path", "readyz_path", "'/health'", "its own path"],
    )


@pytest.mark.parametrize("name", ["livez_path", "readyz_path"])
@pytest.mark.parametrize("path", ["/-/graceful/ready", "/-/graceful"])
def test_probe_paths_must_lie_outside_the_control_prefix(name: str, path: str) -> None:
    refused_saying(
        **{name: path},
        says=[f"{name}={path!r}", "control_prefix='/-/graceful'", "outside the control prefix"],
    )


def test_a_probe_path_sharing_only_a_string_prefix_with_the_control_prefix_is_fine() -> None:
    assert Config(readyz_path="/-/gracefulness").readyz_path == "/-/gracefulness"


def test_min_delay_longer_than_delay_with_a_quiet_period_is_refused() -> None:
    refused_saying(
        delay=1.0,
        min_delay=2.0,
        quiet_period=0.5,
        says=["min_delay=2.0", "delay=1.0", "at most delay"],
    )


def test_min_delay_longer_than_delay_is_fine_without_a_quiet_period() -> None:
    assert Config(delay=0.5).min_delay == 1.0


@pytest.mark.parametrize("token", ["", "has space", "tab\there", "new\nline", "naïve", 12345])
def test_bad_tokens_are_refused_without_echoing_the_value(token: Any) -> None:
    message = refused_saying(
        token=token, says=["token", "value hidden", "printable ASCII without spaces"]
    )
    if token != "":
        assert str(token) not in message
        assert repr(token) not in message


def test_the_token_never_appears_in_repr_or_in_other_errors() -> None:
    config = Config(token=SECRET)
    assert config.token == SECRET
    assert SECRET not in repr(config)
    assert SECRET not in str(config)
    message = config_error(token=SECRET, delay=-1)
    assert SECRET not in message
    with pytest.raises(ConfigError) as info:
        config.replace(readyz_path="bad")
    assert SECRET not in str(info.value)


def test_checks_must_be_callables_with_names() -> None:
    refused_saying(checks={"db": 42}, says=["checks['db']=42", "not callable"])
    refused_saying(checks={"": lambda: True}, says=["checks", "non-empty strings"])
    refused_saying(checks=["db"], says=["checks=['db']", "mapping of check name to callable"])


def test_checks_are_stored_read_only() -> None:
    config = Config(checks={"db": lambda: True})
    with pytest.raises(TypeError):
        config.checks["cache"] = lambda: True  # type: ignore[index]


@pytest.mark.parametrize("value", ["", 5])
def test_bad_drain_file_names_setting_value_and_what_is_allowed(value: Any) -> None:
    refused_saying(drain_file=value, says=[f"drain_file={value!r}", "file path or None"])


def test_drain_file_accepts_a_path_object() -> None:
    path: Any = pathlib.Path("/tmp/drain")  # accepted at run time, typed as str
    assert Config(drain_file=path).drain_file == "/tmp/drain"


def test_config_is_frozen_and_replace_validates() -> None:
    config = Config(delay=2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.delay = 3.0  # type: ignore[misc]
    assert config.replace(delay=3.0).delay == 3.0
    assert config.delay == 2.0
    with pytest.raises(ConfigError, match="delay=-3"):
        config.replace(delay=-3)


# -- from_env ------------------------------------------------------------------------------


def test_from_env_reads_graceful_variables() -> None:
    config = Config.from_env(
        environ={
            "GRACEFUL_DELAY": "7",
            "GRACEFUL_DRAIN_TIMEOUT": " 12.5 ",
            "GRACEFUL_TOKEN": SECRET,
            "GRACEFUL_DRAIN_FILE": "/run/app/drain",
            "GRACEFUL_QUIET_PERIOD": "1.5",
            "GRACEFUL_MIN_DELAY": "0.5",
            "GRACEFUL_INTERRUPT_TIMEOUT": "3",
            "GRACEFUL_LIVEZ_PATH": "/alive",
            "GRACEFUL_READYZ_PATH": "/ready",
            "GRACEFUL_CONTROL_PREFIX": "/admin/drain",
            "GRACEFUL_CHECK_TIMEOUT": "0.5",
            "GRACEFUL_CHECK_CACHE": "0",
            "GRACEFUL_EVENTS_MAX_SUBSCRIBERS": "3",
            "GRACEFUL_EVENTS_HEARTBEAT": "30",
            "GRACEFUL_DRAIN_FILE_INTERVAL": "0.25",
        }
    )
    assert config.delay == 7.0
    assert config.drain_timeout == 12.5
    assert config.token == SECRET
    assert config.drain_file == "/run/app/drain"
    assert config.quiet_period == 1.5
    assert config.min_delay == 0.5
    assert config.interrupt_timeout == 3.0
    assert (config.livez_path, config.readyz_path) == ("/alive", "/ready")
    assert config.control_prefix == "/admin/drain"
    assert (config.check_timeout, config.check_cache) == (0.5, 0.0)
    assert config.events_max_subscribers == 3
    assert config.events_heartbeat == 30.0
    assert config.drain_file_interval == 0.25


@pytest.mark.parametrize("off", ["", "none", "OFF"])
def test_from_env_quiet_period_can_be_turned_off(off: str) -> None:
    assert Config.from_env(environ={"GRACEFUL_QUIET_PERIOD": off}).quiet_period is None


@pytest.mark.parametrize(
    ("variable", "raw", "allowed"),
    [
        ("GRACEFUL_DELAY", "soon", "a number of seconds"),
        ("GRACEFUL_DRAIN_TIMEOUT", "25s", "a number of seconds"),
        ("GRACEFUL_QUIET_PERIOD", "a bit", "a number of seconds"),
        ("GRACEFUL_EVENTS_MAX_SUBSCRIBERS", "1.5", "a whole number"),
    ],
)
def test_from_env_non_numbers_name_the_variable(variable: str, raw: str, allowed: str) -> None:
    message = str(env_error({variable: raw}))
    assert f"{variable}={raw!r}" in message
    assert "not a number" in message
    assert allowed in message


def test_from_env_values_are_validated_like_arguments() -> None:
    with pytest.raises(ConfigError, match=r"delay=100000\.0 is not allowed"):
        Config.from_env(environ={"GRACEFUL_DELAY": "100000"})
    with pytest.raises(ConfigError, match="readyz_path='ready'"):
        Config.from_env(environ={"GRACEFUL_READYZ_PATH": "ready"})


@pytest.mark.parametrize(
    ("variable", "raw", "allowed"),
    [
        ("GRACEFUL_DELAY", "-1", "seconds >= 0"),
        ("GRACEFUL_DRAIN_TIMEOUT", "100000", "seconds >= 0 and at most 86400"),
        ("GRACEFUL_QUIET_PERIOD", "0", "seconds > 0"),
        ("GRACEFUL_CHECK_TIMEOUT", "0", "seconds > 0"),
        ("GRACEFUL_EVENTS_HEARTBEAT", "0", "seconds > 0"),
        ("GRACEFUL_EVENTS_MAX_SUBSCRIBERS", "-1", "whole number >= 0"),
        ("GRACEFUL_READYZ_PATH", "ready", "leading slash"),
    ],
)
def test_from_env_values_out_of_range_name_the_variable_value_and_what_is_allowed(
    variable: str, raw: str, allowed: str
) -> None:
    error = env_error({variable: raw})
    message = str(error)
    assert isinstance(error, ValueError)
    assert f"{variable}={raw!r}" in message
    assert allowed in message
    assert variable.removeprefix("GRACEFUL_").lower() in message  # and the setting


def test_from_env_a_bad_token_names_the_variable_but_never_its_value() -> None:
    message = str(env_error({"GRACEFUL_TOKEN": SECRET + " x"}))
    assert "GRACEFUL_TOKEN" in message
    assert SECRET not in message


def test_from_env_a_bad_variable_overridden_by_a_keyword_is_not_what_is_refused() -> None:
    # The keyword wins; only its own value is checked, and named as the setting.
    assert Config.from_env(environ={"GRACEFUL_DELAY": "-1"}, delay=3).delay == 3.0
    with pytest.raises(ConfigError) as info:
        Config.from_env(environ={"GRACEFUL_DELAY": "4"}, delay=-2)
    assert "delay=-2 is not allowed" in str(info.value)
    assert "GRACEFUL_DELAY" not in str(info.value)


@pytest.mark.parametrize("variable", ["GRACEFUL_TOKEN", "GRACEFUL_DRAIN_FILE"])
def test_from_env_empty_token_or_file_names_the_variable(variable: str) -> None:
    with pytest.raises(ConfigError, match=f"{variable} is set but empty"):
        Config.from_env(environ={variable: "  "})


def test_from_env_bad_token_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env(environ={"GRACEFUL_TOKEN": "my secret"})
    assert "token" in str(info.value)
    assert "my secret" not in str(info.value)


def test_from_env_logs_unknown_graceful_variables(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="graceful"):
        config = Config.from_env(
            environ={"GRACEFUL_DELAYY": "3", "GRACEFUL_DELAY": "4", "OTHER_DELAY": "9"}
        )
    assert config.delay == 4.0
    warnings = [r for r in caplog.records if r.name == "graceful"]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert "GRACEFUL_DELAYY" in warnings[0].getMessage()
    assert "GRACEFUL_DELAY," in warnings[0].getMessage()  # the known names are listed
    assert "OTHER_DELAY" not in caplog.text


def test_from_env_keyword_overrides_win_and_unknown_ones_are_refused() -> None:
    assert Config.from_env(environ={"GRACEFUL_DELAY": "7"}, delay=3).delay == 3.0
    with pytest.raises(ConfigError, match="unknown setting 'delays'"):
        Config.from_env(environ={}, delays=3)


def test_from_env_reads_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRACEFUL_DRAIN_TIMEOUT", "9")
    assert Config.from_env().drain_timeout == 9.0


@pytest.mark.parametrize(("host", "expected"), [("10.96.0.1", 5.0), (None, 2.0)])
def test_delay_default_is_5_under_kubernetes_else_2(
    monkeypatch: pytest.MonkeyPatch, host: str | None, expected: float
) -> None:
    environ = {} if host is None else {"KUBERNETES_SERVICE_HOST": host}
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert Config.from_env(environ=environ).delay == expected
    if host is not None:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    assert Config().delay == expected
    assert Config.from_env().delay == expected
    assert Config.from_env(environ={**environ, "GRACEFUL_DELAY": "1"}).delay == 1.0

"""Every setting, given a bad value through each source, is refused naming the setting.

The sources: the environment (``GRACEFUL_<NAME>``, read by :meth:`graceful.Config.from_env`
and so by the middleware's process-wide lifecycle), the Flask config (``app.config`` keys with
the ``GRACEFUL_`` prefix) and the Django settings (the ``settings.GRACEFUL`` dict). Each refusal
is a :class:`graceful.ConfigError` (under Django, Django's ``ImproperlyConfigured`` raised from
one) whose message names the setting, never echoes a token, and nothing is changed or started:
no process-wide lifecycle is created or reconfigured, no app is wrapped.

The bad values are listed per setting below; a test keeps that list in step with the fields of
:class:`graceful.Config`, so a new setting cannot go without its bad-input tests.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings as django_conf
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st

import graceful
import graceful._runtime.lifecycle
import graceful.django
from graceful import Config, ConfigError, Lifecycle
from graceful._core.config import ENV_PREFIX, MAX_SECONDS, MIN_TOKEN_LENGTH
from graceful._core.surface import MAX_WAIT, Surface, WaitDrained
from graceful.flask import Graceful

FIELDS = {f.name: f.metadata["kind"] for f in dataclasses.fields(Config)}
SECRET = "has space"  # a bad token: never echoed back

#: Bad raw strings for a ``GRACEFUL_*`` environment variable, by kind.
ENV_BAD: dict[str, list[str]] = {
    "seconds": ["soon", "-1", "nan", "inf", "", "1,5", "2s"],
    "optional_seconds": ["soon", "-1", "0", "inf", "nan"],
    "count": ["2.5", "-1", "many", "", "1e3"],
    "path": ["readyz", "/", "/x/", "/é", "/a?b", "/a b", ""],
    "token": ["", "   ", SECRET, "tök"],
    "file": ["", "   "],
    "bool": ["maybe", "2", "", "enabled"],
}

#: Bad Python values (Flask ``app.config`` and Django ``settings.GRACEFUL``), by kind. Strings
#: that are numbers are fine in Flask's config (it reads them like the environment), so the
#: bad strings here are bad for both.
VALUE_BAD: dict[str, list[Any]] = {
    "seconds": ["soon", -1, math.nan, math.inf, 10**400, True, None, [1]],
    "optional_seconds": ["soon", -1, 0, math.inf, 10**400, True],
    "count": [2.5, -1, True, "many", None],
    "path": ["readyz", "/", "/x/", "/é", "/a b", "", 5, None],
    "token": [SECRET, "", "tök", 5],
    "file": ["", 5, ["a"]],
    "checks": ["SELECT 1", {"db": "SELECT 1"}, {"": lambda: True}, [lambda: True]],
    "bool": ["maybe", 2, None],
}

#: Durations whose 0 means nothing: 0 is a bad value for them on top of their kind's.
ZERO_BAD = {"check_timeout", "events_heartbeat"}

ENV_CASES = [
    pytest.param(name, raw, id=f"{name}={raw!r}")
    for name, kind in FIELDS.items()
    if kind != "checks"  # Python only: never read from the environment
    for raw in ENV_BAD[kind] + (["0", "0.0"] if name in ZERO_BAD else [])
]
VALUE_CASES = [
    pytest.param(name, value, id=f"{name}={value!r:.20}")
    for name, kind in FIELDS.items()
    for value in VALUE_BAD[kind] + ([0, 0.0] if name in ZERO_BAD else [])
]
#: Settings that are each fine but clash together: (settings, a name the message must hold).
TOGETHER = [
    pytest.param({"livez_path": "/health", "readyz_path": "/health"}, "readyz_path", id="same"),
    pytest.param({"readyz_path": "/-/graceful/ready"}, "control_prefix", id="under-prefix"),
    pytest.param({"control_prefix": "/readyz"}, "control_prefix", id="prefix-is-probe"),
    pytest.param({"quiet_period": 1, "min_delay": 5, "delay": 2}, "min_delay", id="min-delay"),
]


def key(name: str) -> str:
    return ENV_PREFIX + name.upper()


def assert_names(message: str, name: str, value: Any) -> None:
    assert name in message or key(name) in message, message
    if FIELDS[name] == "token" and isinstance(value, str) and value.strip():
        assert value not in message, f"the token was echoed: {message}"


@pytest.fixture(autouse=True)
def clean_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No GRACEFUL_* variables, and no process-wide lifecycle, before and after each test."""
    for name in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    graceful.set_lifecycle(None)
    yield
    graceful.set_lifecycle(None)


def test_every_setting_has_bad_values_for_every_source() -> None:
    kinds = set(FIELDS.values())
    assert kinds <= set(VALUE_BAD), kinds - set(VALUE_BAD)
    assert kinds - {"checks"} <= set(ENV_BAD), kinds - set(ENV_BAD)


# -- the environment -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "raw"), ENV_CASES)
def test_a_bad_environment_variable_is_refused_naming_it(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_env({key(name): raw})
    assert_names(str(raised.value), name, raw)
    assert key(name) in str(raised.value)  # the variable itself, not only the setting


@pytest.mark.parametrize(("name", "raw"), ENV_CASES)
def test_a_bad_environment_variable_starts_no_lifecycle_and_wraps_no_app(
    name: str, raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(key(name), raw)

    def wsgi_app(environ: Any, start_response: Any) -> list[bytes]:
        raise AssertionError("never called")

    async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    with pytest.raises(ConfigError) as raised:
        graceful.WSGIMiddleware(wsgi_app)
    assert_names(str(raised.value), name, raw)
    with pytest.raises(ConfigError):
        graceful.ASGIMiddleware(asgi_app)
    assert graceful._runtime.lifecycle._default is None, (
        "a process-wide lifecycle was created anyway"
    )


@pytest.mark.parametrize(("settings", "named"), TOGETHER)
def test_environment_settings_that_clash_together_are_refused_naming_one(
    settings: dict[str, Any], named: str
) -> None:
    env = {key(name): str(value) for name, value in settings.items()}
    with pytest.raises(ConfigError, match=named):
        Config.from_env(env)


# -- Flask -----------------------------------------------------------------------------------


@pytest.fixture
def flask_app() -> Flask:
    return Flask(__name__)


@pytest.mark.parametrize(("name", "value"), VALUE_CASES)
def test_a_bad_flask_config_value_is_refused_naming_the_key_and_nothing_is_set_up(
    name: str, value: Any, flask_app: Flask
) -> None:
    existing = Lifecycle(Config(delay=3.0))
    graceful.set_lifecycle(existing)
    flask_app.config[key(name)] = value
    original = flask_app.wsgi_app

    with pytest.raises(ConfigError) as raised:
        Graceful(flask_app)

    message = str(raised.value)
    assert message.startswith("app.config "), message
    assert key(name) in message, message
    assert_names(message, name, value)
    assert flask_app.wsgi_app == original and "graceful" not in flask_app.extensions
    assert graceful.get_lifecycle() is existing and existing.config == Config(delay=3.0)


@pytest.mark.parametrize(("name", "raw"), ENV_CASES[:: max(1, len(ENV_CASES) // 8)])
def test_a_bad_environment_variable_under_flask_is_refused_naming_it(
    name: str, raw: str, flask_app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(key(name), raw)
    original = flask_app.wsgi_app
    with pytest.raises(ConfigError) as raised:
        Graceful(flask_app)
    assert_names(str(raised.value), name, raw)
    assert flask_app.wsgi_app == original and "graceful" not in flask_app.extensions


# -- Django ----------------------------------------------------------------------------------


@pytest.fixture
def django_settings() -> Any:
    """Django configured in this process, as tests/test_django.py does. Settings are configured
    at most once per process, so here only at test time: when test_django.py is collected too,
    its settings (configured at import) stand."""
    if not django_conf.configured:
        django_conf.configure(
            SECRET_KEY="test-only",
            DEBUG=False,
            ALLOWED_HOSTS=["good.example"],
            INSTALLED_APPS=["graceful.django"],
            MIDDLEWARE=[],
            DATABASES={},
            USE_TZ=True,
            WSGI_APPLICATION=None,
            LOGGING_CONFIG=None,
        )
        django.setup()
    return django_conf


def _django_refuses(graceful_setting: Any) -> str:
    existing = Lifecycle(Config(delay=3.0))
    graceful.set_lifecycle(existing)
    messages = []
    with override_settings(GRACEFUL=graceful_setting):
        for entry in (graceful.django.get_wsgi_application, graceful.django.get_asgi_application):
            with pytest.raises(ImproperlyConfigured) as raised:
                entry()
            assert isinstance(raised.value.__cause__, ConfigError), raised.value.__cause__
            messages.append(str(raised.value))
    assert graceful.get_lifecycle() is existing and existing.config == Config(delay=3.0)
    assert messages[0] == messages[1]
    assert messages[0].startswith("settings.GRACEFUL: "), messages[0]
    return messages[0]


@pytest.mark.parametrize(("name", "value"), VALUE_CASES)
def test_a_bad_django_setting_is_refused_naming_it_and_nothing_is_set_up(
    name: str, value: Any, django_settings: Any
) -> None:
    assert_names(_django_refuses({name: value}), name, value)


@pytest.mark.parametrize(("settings", "named"), TOGETHER)
def test_django_settings_that_clash_together_are_refused_naming_one(
    settings: dict[str, Any], named: str, django_settings: Any
) -> None:
    assert named in _django_refuses(settings)


@pytest.mark.parametrize(("name", "raw"), ENV_CASES[:: max(1, len(ENV_CASES) // 8)])
def test_a_bad_environment_variable_under_django_is_refused_naming_it(
    name: str, raw: str, django_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(key(name), raw)
    assert_names(_django_refuses({}), name, raw)


# -- any value at all: a setting or a ConfigError, never another exception -------------------

any_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
any_env_text = st.one_of(
    st.text(max_size=40).filter(lambda t: "\x00" not in t),
    st.integers().map(str),
    st.floats().map(repr),
    st.integers(min_value=300, max_value=400).map(lambda n: "9" * n),
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(name=st.sampled_from([n for n, k in FIELDS.items() if k != "checks"]), raw=any_env_text)
def test_any_environment_value_gives_a_config_or_a_config_error(name: str, raw: str) -> None:
    try:
        config = Config.from_env({key(name): raw})
    except ConfigError as error:
        message = str(error)
        assert_names(message, name, raw)
        assert key(name) in message
    else:
        assert isinstance(config, Config)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(name=st.sampled_from(sorted(FIELDS)), value=any_value)
def test_any_python_value_gives_a_config_or_a_config_error(name: str, value: Any) -> None:
    try:
        config = Config(**{name: value})
    except ConfigError as error:
        assert_names(str(error), name, value)
    else:
        assert isinstance(config, Config)


def test_huge_but_finite_timings_never_make_the_drain_route_wait_unboundedly() -> None:
    # delay + drain_timeout is the default wait of POST drain?wait=1: two days at most, bounded
    # like an explicit ?timeout= (at most MAX_WAIT).
    token = "t" * MIN_TOKEN_LENGTH
    lifecycle = Lifecycle(Config(delay=MAX_SECONDS, drain_timeout=MAX_SECONDS, token=token))
    lifecycle.mark_ready()
    surface = Surface(lifecycle)

    auth = f"Bearer {token}".encode()
    outcome = surface.handle(surface.routes["/-/graceful/drain"], "POST", "wait=1", auth)

    assert isinstance(outcome, WaitDrained) and outcome.timeout == MAX_WAIT

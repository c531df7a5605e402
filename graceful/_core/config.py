"""Settings: one definition per setting drives validation, the environment and the docs.

Every field of :class:`Config` carries its documentation and kind in its metadata;
:meth:`Config.from_env` reads ``GRACEFUL_<NAME>`` for each field, and a test keeps the
README's settings table in step with the fields.

This module reads no environment and logs nothing itself: it parses the mapping it is given.
Where none is given it asks the source plugged in by :func:`plug_environment` (the runtime
plugs in ``os.environ`` and the ``graceful`` logger when the package is imported, see
:mod:`graceful._runtime.env`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Literal

from .errors import GracefulError
from .types import Check

__all__ = [
    "ENV_PREFIX",
    "MAX_SECONDS",
    "MIN_TOKEN_LENGTH",
    "Config",
    "ConfigError",
    "default_delay",
    "parse_count",
    "parse_seconds",
    "plug_environment",
    "unknown_variables",
]

ENV_PREFIX = "GRACEFUL_"

Kind = Literal["seconds", "optional_seconds", "count", "path", "token", "file", "checks", "bool"]

#: The longest any duration may be (a day): past it a setting is a typo, and the waits built on
#: it would overflow (``threading`` refuses timeouts past ~292 years, ``1e10`` s killed threads).
MAX_SECONDS = 86400.0
#: The shortest bearer token a node accepts: a short token can be guessed.
MIN_TOKEN_LENGTH = 16

# The numbers the README documents: plain ASCII decimals. No sign, exponent, ``_`` separator,
# ``inf``/``nan`` or non-ASCII digit (``float`` and ``int`` take all of those).
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_WHOLE = re.compile(r"[0-9]+")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(GracefulError, ValueError):
    """A setting has a value that is not allowed. The message names the setting."""


def _no_environment() -> Mapping[str, str]:
    return {}


def _say_nothing(message: str) -> None:
    pass


_environ: Callable[[], Mapping[str, str]] = _no_environment
_warn: Callable[[str], None] = _say_nothing


def plug_environment(environ: Callable[[], Mapping[str, str]], warn: Callable[[str], None]) -> None:
    """Where :meth:`Config.from_env` and the ``delay`` default read the process environment
    when given none (``environ()``), and where a remark about it goes (``warn(message)``).

    Until plugged the environment is empty and remarks go nowhere."""
    global _environ, _warn
    _environ, _warn = environ, warn


def parse_seconds(text: str) -> float:
    """A number of seconds written as a plain decimal (``2``, ``0.5``, ``.25``).

    Raises :class:`ValueError` for anything else: signs, exponents (``1e3``), ``1_000``,
    non-ASCII digits, ``inf`` and ``nan``. Upper bounds are the caller's to check.
    """
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not a plain decimal number like 2 or 0.5")
    return float(text)


def parse_count(text: str) -> int:
    """A whole number written with ASCII digits only (``100``); :class:`ValueError` otherwise."""
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"{text[:40]!r} is not a whole number like 100")
    return int(text)


def default_delay(environ: Mapping[str, str] | None = None) -> float:
    """5 s under Kubernetes (endpoints take a few seconds to update), otherwise 2 s."""
    env = _environ() if environ is None else environ
    return 5.0 if env.get("KUBERNETES_SERVICE_HOST") else 2.0


def _setting(default: Any, kind: Kind, doc: str, *, positive: bool = False, **extra: Any) -> Any:
    # ``positive``: a duration whose 0 means nothing (an interval, a bound on a run) must be > 0.
    metadata = {"kind": kind, "doc": doc, "positive": positive}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata, **extra)
    return dataclasses.field(default=default, metadata=metadata, **extra)


@dataclasses.dataclass(frozen=True)
class Config:
    """How a node drains. All times are in seconds."""

    delay: float = _setting(
        default_delay,
        "seconds",
        "Time to keep serving with readiness failing before stopping, so load balancers notice. "
        "Default 5 under Kubernetes (KUBERNETES_SERVICE_HOST set), otherwise 2.",
    )
    quiet_period: float | None = _setting(
        None,
        "optional_seconds",
        "End the delay early once no new request has arrived for this long (after min_delay). "
        "Off when unset.",
    )
    min_delay: float = _setting(
        1.0, "seconds", "With quiet_period: the delay never ends before this much time."
    )
    drain_timeout: float = _setting(
        25.0, "seconds", "Bound on waiting for in-flight work after the delay."
    )
    interrupt_timeout: float = _setting(
        5.0, "seconds", "Bound on waiting for in-flight work on a quick stop (SIGINT)."
    )
    handover_delay: float = _setting(
        1.0,
        "seconds",
        "On an in-place restart (graceful reload: a new master on the same listening sockets), "
        "the old one's delay: it serves this long, closing kept-alive connections after each "
        "answer, then stops. No balancer needs to notice: the new one already accepts.",
    )
    livez_path: str = _setting("/livez", "path", "Liveness route.")
    readyz_path: str = _setting("/readyz", "path", "Readiness route.")
    control_prefix: str = _setting(
        "/-/graceful", "path", "Prefix of the status, drain, resume and events routes."
    )
    token: str | None = _setting(
        None,
        "token",
        "Bearer token for the control routes. Unset: the control routes answer 404.",
        repr=False,
    )
    drain_file: str | None = _setting(
        None, "file", "While this file exists the node is draining; removing it resumes."
    )
    pid_file: str | None = _setting(
        None,
        "file",
        "python -m graceful.uvicorn writes its pid here, and NAME.ready once it serves, for "
        "graceful reload (gunicorn: its own --pid).",
    )
    drain_file_interval: float = _setting(
        1.0, "seconds", "How often, at most, the drain file is looked at (0: on every request)."
    )
    checks: Mapping[str, Check] = _setting(
        dict,
        "checks",
        "Readiness checks: name -> callable (sync or async). A check fails when it raises, "
        "returns False or outlives check_timeout. Python only.",
    )
    check_timeout: float = _setting(
        2.0, "seconds", "Bound on one run of a readiness check (> 0).", positive=True
    )
    check_cache: float = _setting(
        1.0,
        "seconds",
        "How long a check result is reused, so a probe storm costs nothing (0: never reused).",
    )
    events_max_subscribers: int = _setting(
        100, "count", "Cap on concurrent events-stream subscribers; past it, 503."
    )
    events_heartbeat: float = _setting(
        15.0,
        "seconds",
        "Interval of the heartbeat comment on the events stream (> 0).",
        positive=True,
    )
    reject_when_draining: bool = _setting(
        False,
        "bool",
        "While draining, answer new requests but POST/PATCH/LOCK 503 (Graceful-Rejected: 1) so "
        "a retrying proxy (nginx proxy_next_upstream http_503) sends them elsewhere. Off: direct "
        "callers are served to the end.",
    )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _validate(field.name, field.metadata["kind"], value)
            if checked is not value:
                object.__setattr__(self, field.name, checked)
        self._validate_together()

    def _validate_together(self) -> None:
        if self.quiet_period is not None and self.min_delay > self.delay:
            raise ConfigError(
                f"min_delay={self.min_delay!r} is longer than delay={self.delay!r}; "
                "min_delay must be at most delay"
            )
        paths = {"livez_path": self.livez_path, "readyz_path": self.readyz_path}
        if self.livez_path == self.readyz_path:
            raise ConfigError(
                f"livez_path and readyz_path are both {self.livez_path!r}; give each its own path"
            )
        for name, path in paths.items():
            if path == self.control_prefix or path.startswith(self.control_prefix + "/"):
                raise ConfigError(
                    f"{name}={path!r} lies under control_prefix={self.control_prefix!r}; "
                    "probe paths must be outside the control prefix"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Build a config from ``GRACEFUL_*`` variables; keyword arguments win over them."""
        env = _environ() if environ is None else environ
        names = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for field in names.values():
            kind = field.metadata["kind"]
            key = ENV_PREFIX + field.name.upper()
            # An override wins, unread: its own check names the setting.
            if kind == "checks" or key not in env or field.name in overrides:
                continue
            value = _parse_env(key, kind, env[key])
            values[field.name] = _validate_env(key, field.name, kind, env[key], value)
        values.setdefault("delay", default_delay(env))  # Kubernetes is detected in ``env`` too
        unknown = unknown_variables(env)
        if unknown:
            known = ", ".join(sorted(_known_variables()))
            for key in unknown:
                _warn(f"ignoring unknown environment variable {key}; known: {known}")
        for name in overrides:
            if name not in names:
                raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(names))}")
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed (validated like the original)."""
        return dataclasses.replace(self, **changes)


def _known_variables() -> frozenset[str]:
    return frozenset(
        ENV_PREFIX + f.name.upper()
        for f in dataclasses.fields(Config)
        if f.metadata["kind"] != "checks"
    )


#: Variables graceful's own processes pass to each other (an in-place restart's new runner,
#: a supervisor's workers): not settings, and not a typo either.
BETWEEN_PROCESSES = frozenset({"GRACEFUL_SUCCESSOR_OF", "GRACEFUL_READY_SOCKET"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The ``GRACEFUL_*`` names in ``environ`` that are no setting, sorted."""
    known = _known_variables() | BETWEEN_PROCESSES
    return sorted(key for key in environ if key.startswith(ENV_PREFIX) and key not in known)


#: Durations whose 0 means nothing: they must be > 0.
_POSITIVE = frozenset(f.name for f in dataclasses.fields(Config) if f.metadata["positive"])


def _parse_env(key: str, kind: str, raw: str) -> Any:
    text = raw.strip()
    if kind in ("seconds", "optional_seconds", "count"):
        if kind == "optional_seconds" and text.lower() in ("", "none", "off"):
            return None
        try:
            return parse_count(text) if kind == "count" else parse_seconds(text)
        except ValueError:
            allowed = (
                "a whole number >= 0 written with plain digits, like 100"
                if kind == "count"
                else "a number of seconds >= 0 written as plain decimal digits, like 2 or 0.5"
            )
            name = key.removeprefix(ENV_PREFIX).lower()
            raise ConfigError(f"{key}={raw!r} is not a number; {name} expects {allowed}") from None
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(
            f"{key}={raw!r} is not allowed; expected 1/0, true/false, yes/no or on/off"
        )
    if kind in ("token", "file") and text == "":
        raise ConfigError(f"{key} is set but empty; unset it to turn this off")
    return raw if kind == "token" else text


def _validate_env(key: str, name: str, kind: str, raw: str, value: Any) -> Any:
    """:func:`_validate`, its refusal also naming the variable (and, but for a token, its text)."""
    try:
        return _validate(name, kind, value)
    except ConfigError as error:
        source = key if kind == "token" else f"{key}={raw!r}"
        raise ConfigError(f"{error} (set by {source})") from None


def _validate(name: str, kind: str, value: Any) -> Any:
    if kind == "seconds" or (kind == "optional_seconds" and value is not None):
        allow_zero = kind == "seconds" and name not in _POSITIVE
        return _validate_seconds(name, value, allow_zero=allow_zero)
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name}={value!r} is not allowed; expected a whole number >= 0")
        return value
    if kind == "path":
        return _validate_path(name, value)
    if kind == "token":
        return _validate_token(name, value)
    if kind == "file":
        return _validate_file(name, value)
    if kind == "checks":
        return _validate_checks(name, value)
    if kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not allowed; expected True or False")
    return value


def _validate_file(name: str, value: Any) -> str | None:
    if value is None:
        return None
    # A str or an os.PathLike (read through its protocol: the core does not import os).
    path = value.__fspath__() if hasattr(value, "__fspath__") else value
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{name}={value!r} is not allowed; expected a file path or None")
    return path


def _validate_seconds(name: str, value: Any, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} is not allowed; expected a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float: as unusable as infinity
        seconds = math.inf
    if (
        not math.isfinite(seconds)
        or seconds < 0
        or (seconds == 0 and not allow_zero)
        or seconds > MAX_SECONDS
    ):
        low = ">= 0" if allow_zero else "> 0"
        raise ConfigError(
            f"{name}={value!r} is not allowed; expected a number of seconds {low} and at most "
            f"{MAX_SECONDS:g} (a day)"
        )
    return seconds


def _validate_path(name: str, value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or len(value) < 2
        or value.endswith("/")
        or any(ch in value for ch in "?# \t\r\n")
        or not value.isascii()
    ):
        raise ConfigError(
            f"{name}={value!r} is not allowed; expected an ASCII path with a leading slash, "
            "no trailing slash, no spaces, '?' or '#' (like '/readyz')"
        )
    return value


def _validate_token(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or not all(0x21 <= ord(ch) <= 0x7E for ch in value):
        # Never echo the value: it is a secret.
        raise ConfigError(
            f"{name} is not allowed (value hidden); expected printable ASCII without spaces, "
            "or None to turn the control routes off"
        )
    if len(value) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"{name} is too short ({len(value)} characters, value hidden); use at least "
            f"{MIN_TOKEN_LENGTH} random characters, e.g. the output of "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value


def _validate_checks(name: str, value: Any) -> Mapping[str, Check]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"{name}={value!r} is not allowed; expected a mapping of check name to callable"
        )
    for key, check in value.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{name} has a check named {key!r}; names must be non-empty strings")
        if not callable(check):
            raise ConfigError(f"{name}[{key!r}]={check!r} is not callable")
    return MappingProxyType(dict(value))

"""``settings.GRACEFUL``: one dict whose keys are :class:`graceful.Config` field names.

``GRACEFUL_*`` environment variables are read first and the dict wins over them. One more key,
``kill_deadline`` (seconds, default 30: Kubernetes' ``terminationGracePeriodSeconds``), is the
budget the ``graceful.W004`` check holds ``delay + drain_timeout`` to. A bad value of any key is
refused at start-up (the entry points and the middleware read the settings) with a
:class:`SettingsError`: a :class:`graceful.ConfigError` naming the key, which is also Django's
``ImproperlyConfigured``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from .._core.config import Config, ConfigError

__all__ = [
    "KILL_DEADLINE_DEFAULT",
    "SETTING",
    "SettingsError",
    "config_from",
    "get_config",
    "get_kill_deadline",
]

SETTING = "GRACEFUL"
KILL_DEADLINE = "kill_deadline"
#: Kubernetes' default terminationGracePeriodSeconds.
KILL_DEADLINE_DEFAULT = 30.0


class SettingsError(ConfigError, ImproperlyConfigured):
    """``settings.GRACEFUL`` has a value that is not allowed; the message names the key.

    ``except graceful.ConfigError`` catches it, as it does a bad setting anywhere else, and so
    does Django's ``except ImproperlyConfigured``.
    """


def _raw() -> Any:
    from django.conf import settings

    return getattr(settings, SETTING, {})


def _mapping(raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SettingsError(  # the type only: the value could be a token put in the wrong place
            f"settings.{SETTING} must be a dict of graceful.Config settings "
            f"(e.g. {SETTING} = {{'drain_timeout': 20}}), not a {type(raw).__name__}"
        )
    return raw


def _kill_deadline(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise SettingsError(
            f"settings.{SETTING}[{KILL_DEADLINE!r}]={value!r} is not allowed; "
            "expected a number of seconds > 0"
        )
    return float(value)


def config_from(raw: Any) -> Config:
    """The config for a ``GRACEFUL`` value (its ``kill_deadline`` checked too); errors name
    the key."""
    fields = [f.name for f in dataclasses.fields(Config)]
    overrides: dict[str, Any] = {}
    for key, value in _mapping(raw).items():
        if key == KILL_DEADLINE:
            _kill_deadline(value)
            continue
        if key not in fields:
            known = ", ".join(sorted([*fields, KILL_DEADLINE]))
            raise SettingsError(f"settings.{SETTING}[{key!r}] is not a setting; known: {known}")
        overrides[key] = value
    try:
        return Config.from_env(**overrides)
    except ConfigError as exc:
        raise SettingsError(f"settings.{SETTING}: {exc}") from exc


def get_config() -> Config:
    """The config from ``settings.GRACEFUL`` (over ``GRACEFUL_*`` variables)."""
    return config_from(_raw())


def get_kill_deadline() -> float:
    """``settings.GRACEFUL["kill_deadline"]``, default 30 s."""
    return _kill_deadline(_mapping(_raw()).get(KILL_DEADLINE, KILL_DEADLINE_DEFAULT))

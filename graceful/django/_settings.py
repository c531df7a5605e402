"""``settings.GRACEFUL``: one dict whose keys are :class:`graceful.Config` field names.

``GRACEFUL_*`` environment variables are read first and the dict wins over them. One more key,
``kill_deadline`` (seconds, default 30: Kubernetes' ``terminationGracePeriodSeconds``), is the
budget the ``graceful.W004`` check holds ``delay + drain_timeout`` to.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from ..config import Config, ConfigError

__all__ = ["KILL_DEADLINE_DEFAULT", "SETTING", "config_from", "get_config", "get_kill_deadline"]

SETTING = "GRACEFUL"
KILL_DEADLINE = "kill_deadline"
#: Kubernetes' default terminationGracePeriodSeconds.
KILL_DEADLINE_DEFAULT = 30.0


def _raw() -> Any:
    from django.conf import settings

    return getattr(settings, SETTING, {})


def _mapping(raw: Any) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(
            f"settings.{SETTING} must be a dict of graceful.Config settings, not {raw!r}"
        )
    return raw


def config_from(raw: Any) -> Config:
    """The config for a ``GRACEFUL`` value; errors name the key."""
    fields = [f.name for f in dataclasses.fields(Config)]
    overrides: dict[str, Any] = {}
    for key, value in _mapping(raw).items():
        if key == KILL_DEADLINE:
            continue
        if key not in fields:
            known = ", ".join(sorted([*fields, KILL_DEADLINE]))
            raise ImproperlyConfigured(
                f"settings.{SETTING}[{key!r}] is not a setting; known: {known}"
            )
        overrides[key] = value
    try:
        return Config.from_env(**overrides)
    except ConfigError as exc:
        raise ImproperlyConfigured(f"settings.{SETTING}: {exc}") from exc


def get_config() -> Config:
    """The config from ``settings.GRACEFUL`` (over ``GRACEFUL_*`` variables)."""
    return config_from(_raw())


def get_kill_deadline() -> float:
    """``settings.GRACEFUL["kill_deadline"]``, default 30 s."""
    value = _mapping(_raw()).get(KILL_DEADLINE, KILL_DEADLINE_DEFAULT)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ImproperlyConfigured(
            f"settings.{SETTING}[{KILL_DEADLINE!r}]={value!r} is not allowed; "
            "expected a number of seconds > 0"
        )
    return float(value)

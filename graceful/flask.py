"""Flask: ``Graceful(app)``, or ``ext = Graceful()`` then ``ext.init_app(app)`` in a factory.

It wraps ``app.wsgi_app`` (never ``app`` itself, which stays a Flask app) with
:class:`graceful.WSGIMiddleware` on the process-wide lifecycle (:func:`graceful.get_lifecycle`),
so ``gunicorn -c python:graceful.gunicorn`` links it and SIGTERM drains every worker. Probes
and control routes are answered before Flask sees the request; a request counts as in flight
until the server closes its response.

Settings are :class:`graceful.Config` fields in ``app.config`` with a ``GRACEFUL_`` prefix
(``GRACEFUL_DELAY``, ``GRACEFUL_TOKEN``, ``GRACEFUL_CHECKS``, ...); they win over the
``GRACEFUL_*`` environment variables. Numbers may be given as strings. An unknown key or a bad
value raises :class:`graceful.ConfigError` naming the key. Under gunicorn without ``--preload``
the master reads its timings (delay, drain timeout) from the environment only: set those there
(a worker logs a warning when ``app.config`` sets other ones). Apps set up in one process share
the process-wide lifecycle, so the timings of the last one apply; give an app a lifecycle of
its own with ``Graceful(app, lifecycle=graceful.Lifecycle(...))``.

In a view::

    from graceful.flask import hold, is_draining

    if is_draining():              # the node is going away: a good moment to say so
        ...
    with hold("report"):           # a drain waits for this work, even in a thread of its own
        ...

The state lives in ``app.extensions["graceful"]`` (a :class:`GracefulState`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

try:
    from flask import Flask, current_app, has_app_context
except ImportError as exc:  # pragma: no cover - exercised by hiding flask in a test
    raise ImportError(
        "graceful.flask needs Flask; install it with: pip install 'graceful-drain[flask]'"
    ) from exc

from ._adapters.wsgi import WSGIMiddleware
from ._core.config import ENV_PREFIX, Config, ConfigError, _parse_env, _validate
from ._core.errors import GracefulError
from ._runtime.lifecycle import Hold, Lifecycle, get_lifecycle

__all__ = [
    "EXTENSION_KEY",
    "Graceful",
    "GracefulState",
    "SetupError",
    "get_state",
    "hold",
    "is_draining",
    "settings_from",
]


class SetupError(GracefulError, RuntimeError):
    """The extension is used on an app it is not set up on, or set up twice."""


#: The key of this extension's state in ``app.extensions``.
EXTENSION_KEY = "graceful"

logger = logging.getLogger("graceful")

_FIELDS = {ENV_PREFIX + f.name.upper(): f for f in dataclasses.fields(Config)}


@dataclasses.dataclass(frozen=True)
class GracefulState:
    """What :meth:`Graceful.init_app` sets up for one app (``app.extensions["graceful"]``)."""

    extension: Graceful
    config: Config
    lifecycle: Lifecycle
    middleware: WSGIMiddleware


class Graceful:
    """The Flask extension. ``lifecycle`` defaults to the process-wide one (keep it so under
    gunicorn); ``auto_ready=False`` leaves ``lifecycle.mark_ready()`` to you, after warm-up."""

    def __init__(
        self,
        app: Flask | None = None,
        *,
        lifecycle: Lifecycle | None = None,
        auto_ready: bool = True,
    ) -> None:
        self._given = lifecycle
        self._last: Lifecycle | None = None
        self.auto_ready = auto_ready
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> GracefulState:
        """Read ``GRACEFUL_*`` from ``app.config``, wrap ``app.wsgi_app``, record the state."""
        if EXTENSION_KEY in app.extensions or isinstance(app.wsgi_app, WSGIMiddleware):
            raise SetupError(
                f"graceful is already set up on the Flask app {app.name!r}; "
                "call init_app once per app (and do not also wrap app.wsgi_app yourself)"
            )
        overrides = settings_from(app.config)
        if self._given is not None:  # its own settings, with the app's on top
            lifecycle, base = self._given, self._given.config
        else:  # the environment's settings (as gunicorn's master reads them), the app's on top
            lifecycle, base = get_lifecycle(), Config.from_env()
        try:
            config = base.replace(**overrides)
        except ConfigError as error:  # settings that are only wrong together
            keys = ", ".join(ENV_PREFIX + name.upper() for name in sorted(overrides))
            raise ConfigError(f"app.config ({keys}): {error}") from None
        if config != lifecycle.config:
            lifecycle.configure(config)
        if lifecycle.node is not None:  # a linked gunicorn worker: the master has its own timings
            _warn_unseen_timings(overrides)
        middleware = WSGIMiddleware(app.wsgi_app, lifecycle, auto_ready=self.auto_ready)
        app.wsgi_app = middleware  # type: ignore[method-assign]
        state = GracefulState(self, config, lifecycle, middleware)
        app.extensions[EXTENSION_KEY] = state
        self._last = lifecycle
        return state

    @property
    def lifecycle(self) -> Lifecycle:
        """The current app's lifecycle (outside an app context: the last app set up)."""
        if has_app_context():
            state = current_app.extensions.get(EXTENSION_KEY)
            if isinstance(state, GracefulState):
                return state.lifecycle
        if self._last is None:
            raise SetupError("Graceful is not set up on any app yet: call init_app(app) first")
        return self._last

    def is_draining(self) -> bool:
        """Whether the node is going away (draining, drained or stopping)."""
        return self.lifecycle.announcing

    def hold(self, name: str) -> Hold:
        """Count work as in flight, so a drain waits for it: ``with ext.hold("job"): ...``."""
        return self.lifecycle.hold(name)


def settings_from(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``GRACEFUL_*`` keys of a Flask config as :class:`Config` fields, each validated.

    Raises :class:`ConfigError` naming the key when one is unknown or has a bad value.
    """
    settings: dict[str, Any] = {}
    for key, value in config.items():
        if not (isinstance(key, str) and key.startswith(ENV_PREFIX)):
            continue
        field = _FIELDS.get(key)
        if field is None:
            raise ConfigError(
                f"app.config {key} is not a graceful setting; known: {', '.join(sorted(_FIELDS))}"
            )
        kind = field.metadata["kind"]
        try:
            if isinstance(value, str) and kind in ("seconds", "optional_seconds", "count", "bool"):
                value = _parse_env(key, kind, value)
            settings[field.name] = _validate(field.name, kind, value)
        except ConfigError as error:
            text = str(error)
            if text.startswith(field.name):  # "delay=... is not allowed" -> "GRACEFUL_DELAY=..."
                text = key + text[len(field.name) :]
            raise ConfigError(f"app.config {text}") from None
    return settings


#: Settings that gunicorn's master uses itself; without ``--preload`` it reads the environment.
_MASTER_TIMINGS = ("delay", "quiet_period", "min_delay", "drain_timeout", "interrupt_timeout")


def _warn_unseen_timings(overrides: Mapping[str, Any]) -> None:
    env = Config.from_env()
    unseen = [
        ENV_PREFIX + name.upper()
        for name in _MASTER_TIMINGS
        if name in overrides and overrides[name] != getattr(env, name)
    ]
    if unseen:
        logger.warning(
            "graceful: app.config sets %s, but gunicorn's master reads its drain timings from "
            "the environment (the app is loaded in each worker): set them as environment "
            "variables, or run gunicorn with --preload",
            ", ".join(unseen),
        )


def get_state(app: Flask | None = None) -> GracefulState:
    """The extension's state of ``app`` (default: the current app)."""
    target = current_app if app is None else app
    state = target.extensions.get(EXTENSION_KEY)
    if not isinstance(state, GracefulState):
        raise SetupError(
            "graceful is not set up on this Flask app: call Graceful(app) or ext.init_app(app)"
        )
    return state


def is_draining() -> bool:
    """In a view: whether the node is going away (draining, drained or stopping)."""
    return get_state().lifecycle.announcing


def hold(name: str) -> Hold:
    """In a view: count work as in flight so a drain waits for it (``with hold("job"):``)."""
    return get_state().lifecycle.hold(name)

"""System checks (``manage.py check``).

- ``graceful.E001``: ``settings.GRACEFUL`` is not valid.
- ``graceful.W001``: ``GracefulMiddleware`` is in ``MIDDLEWARE`` but not first.
- ``graceful.W002``: ``WSGI_APPLICATION`` is not wrapped by graceful and ``GracefulMiddleware``
  is not in ``MIDDLEWARE``: nothing answers ``/readyz`` or counts requests.
- ``graceful.W003``: ``ASGI_APPLICATION`` (when set) is not wrapped by graceful: under ASGI only
  the wrapped entry point counts requests whose client went away and links uvicorn's SIGTERM.
- ``graceful.W004``: ``delay + drain_timeout`` plus the server's stop exceeds
  ``GRACEFUL["kill_deadline"]`` (default 30 s, Kubernetes' ``terminationGracePeriodSeconds``):
  the platform kills before the drain ends (see :func:`graceful.budget.check_budget`).

An entry point that cannot be imported is skipped (Django reports that when it serves).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .._core import budget
from ._entry import is_wrapped
from ._settings import get_config, get_kill_deadline

__all__ = ["MIDDLEWARE_PATH", "check_budget", "check_entry_points", "check_middleware"]

MIDDLEWARE_PATH = "graceful.django.middleware.GracefulMiddleware"
_WRAP_HINT = (
    "In {file}: `import graceful.django` and "
    "`application = graceful.django.{function}()` instead of Django's own."
)


def _middleware() -> list[str]:
    return list(getattr(settings, "MIDDLEWARE", None) or [])


@register("graceful")
def check_middleware(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    middleware = _middleware()
    if MIDDLEWARE_PATH not in middleware or middleware[0] == MIDDLEWARE_PATH:
        return []
    before = ", ".join(middleware[: middleware.index(MIDDLEWARE_PATH)])
    return [
        Warning(
            f"{MIDDLEWARE_PATH} is not first in MIDDLEWARE: {before} run before it and can turn "
            "a failing /readyz into a redirect or a 400 that a probe reads as healthy.",
            hint="Move it to the top of MIDDLEWARE.",
            id="graceful.W001",
        )
    ]


def _unwrapped(setting: str) -> str | None:
    """The dotted path in ``setting`` when it imports and is not graceful's, else None."""
    path = getattr(settings, setting, None)
    if not path:
        return None
    try:
        app = import_string(path)
    except Exception:
        return None  # not importable here: Django says so when it serves
    return None if is_wrapped(app) else str(path)


@register("graceful")
def check_entry_points(
    app_configs: Sequence[Any] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    messages: list[CheckMessage] = []
    wsgi = _unwrapped("WSGI_APPLICATION")
    if wsgi is not None and MIDDLEWARE_PATH not in _middleware():
        messages.append(
            Warning(
                f"WSGI_APPLICATION {wsgi!r} is not wrapped by graceful and {MIDDLEWARE_PATH} is "
                "not in MIDDLEWARE: nothing answers /readyz or counts requests in flight.",
                hint=_WRAP_HINT.format(file="wsgi.py", function="get_wsgi_application")
                + f" Or put {MIDDLEWARE_PATH} first in MIDDLEWARE.",
                id="graceful.W002",
            )
        )
    asgi = _unwrapped("ASGI_APPLICATION")
    if asgi is not None:
        messages.append(
            Warning(
                f"ASGI_APPLICATION {asgi!r} is not wrapped by graceful: under ASGI requests must "
                "be counted outside Django (a client that goes away skips response.close()) and "
                "uvicorn's SIGTERM is linked to the drain only by the wrapped entry point.",
                hint=_WRAP_HINT.format(file="asgi.py", function="get_asgi_application"),
                id="graceful.W003",
            )
        )
    return messages


@register("graceful")
def check_budget(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        config = get_config()
        deadline = get_kill_deadline()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="graceful.E001")]
    return [
        Warning(
            warning,
            hint="Lower delay or drain_timeout in settings.GRACEFUL, or raise the platform's "
            "deadline (terminationGracePeriodSeconds, TimeoutStopSec) and "
            'GRACEFUL["kill_deadline"] with it.',
            id="graceful.W004",
        )
        for warning in budget.check_budget(
            config, deadline, deadline_name='GRACEFUL["kill_deadline"]'
        )
    ]

"""Django integration: settings, wrapped entry points, a probe middleware and system checks.

::

    INSTALLED_APPS = [..., "graceful.django"]
    GRACEFUL = {"drain_timeout": 20, "kill_deadline": 30}   # keys: graceful.Config fields

    # wsgi.py                                   # asgi.py
    import graceful.django                      import graceful.django
    application = graceful.django.get_wsgi_application()
                                                application = graceful.django.get_asgi_application()

The entry points wrap Django's handler in :class:`graceful.WSGIMiddleware` /
:class:`graceful.ASGIMiddleware` on the process-wide lifecycle (the gunicorn and uvicorn shims
link it), so probes are answered and requests counted outside Django. For those who prefer
``MIDDLEWARE``, :class:`graceful.django.middleware.GracefulMiddleware` (first in the list) does the
same under WSGI. ``manage.py check`` warns (``graceful.W001``..``W004``) when it is not first,
when an entry point is not wrapped, or when the drain does not fit the kill deadline. A bad
``GRACEFUL`` value is refused at start-up with a :class:`SettingsError`: a
:class:`graceful.ConfigError` naming the key, which is also Django's ``ImproperlyConfigured``.
"""

from __future__ import annotations

try:
    import django  # noqa: F401  (only to fail early with an install hint)
except ImportError as exc:
    raise ImportError("graceful.django needs Django: pip install 'graceful-drain[django]'") from exc

from ._entry import COUNTED, get_asgi_application, get_wsgi_application, is_wrapped
from ._settings import KILL_DEADLINE_DEFAULT, SettingsError, get_config, get_kill_deadline

__all__ = [
    "COUNTED",
    "KILL_DEADLINE_DEFAULT",
    "SettingsError",
    "get_asgi_application",
    "get_config",
    "get_kill_deadline",
    "get_wsgi_application",
    "is_wrapped",
]

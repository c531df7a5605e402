"""``load_app.asgi_app`` as a plain attribute of a module, for servers that look the app up in
the module's namespace (Hypercorn evaluates ``app`` in ``vars(module)``, where the lazy
``__getattr__`` of ``load_app`` is not consulted)::

    python -m graceful.hypercorn load_app_asgi:asgi_app   # with tests/e2e/apps on PYTHONPATH
"""

from __future__ import annotations

from load_app import asgi_app

__all__ = ["asgi_app"]

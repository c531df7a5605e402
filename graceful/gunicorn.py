"""gunicorn server hooks: the master drains on SIGTERM, every worker answers readiness alike.

The public face of :mod:`graceful._servers.gunicorn`:
every name in its ``__all__``.
"""

from __future__ import annotations

from ._servers.gunicorn import *  # noqa: F403
from ._servers.gunicorn import __all__ as __all__

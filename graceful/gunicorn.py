"""gunicorn server hooks: the master drains on SIGTERM, every worker answers readiness alike.

The public face of :mod:`graceful._servers.gunicorn`, where the code lives."""

from __future__ import annotations

from ._servers.gunicorn import (
    child_exit as child_exit,
)
from ._servers.gunicorn import (
    keepalive as keepalive,
)
from ._servers.gunicorn import (
    on_starting as on_starting,
)
from ._servers.gunicorn import (
    post_fork as post_fork,
)
from ._servers.gunicorn import (
    pre_fork as pre_fork,
)
from ._servers.gunicorn import (
    pre_request as pre_request,
)
from ._servers.gunicorn import (
    when_ready as when_ready,
)

__all__ = [
    "child_exit",
    "keepalive",
    "on_starting",
    "post_fork",
    "pre_fork",
    "pre_request",
    "when_ready",
]

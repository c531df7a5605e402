"""HAProxy's runtime API: take a server out of rotation and give it back, over the stats socket.

The public face of :mod:`graceful._balancers.haproxy`:
every name in its ``__all__``.
"""

from __future__ import annotations

from ._balancers.haproxy import *  # noqa: F403
from ._balancers.haproxy import __all__ as __all__

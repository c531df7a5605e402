"""A drain-aware client pool: calls a service's nodes and stays away from the ones going away.

The public face of :mod:`graceful._client.pool`:
every name in its ``__all__``.
"""

from __future__ import annotations

from ._client.pool import *  # noqa: F403
from ._client.pool import __all__ as __all__

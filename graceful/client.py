"""A drain-aware client pool: calls a service's nodes and stays away from the ones going away.

The public face of :mod:`graceful._client.pool`, where the code lives."""

from __future__ import annotations

from ._client.pool import (
    NodeState as NodeState,
)
from ._client.pool import (
    NodeStatus as NodeStatus,
)
from ._client.pool import (
    NoNodeAvailable as NoNodeAvailable,
)
from ._client.pool import (
    Pool as Pool,
)

__all__ = [
    "NoNodeAvailable",
    "NodeState",
    "NodeStatus",
    "Pool",
]

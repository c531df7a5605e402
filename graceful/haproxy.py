"""HAProxy's runtime API: take a server out of rotation and give it back, over the stats socket.

The public face of :mod:`graceful._balancers.haproxy`, where the code lives."""

from __future__ import annotations

from ._balancers.haproxy import (
    AdminState as AdminState,
)
from ._balancers.haproxy import (
    HAProxyError as HAProxyError,
)
from ._balancers.haproxy import (
    OperationalState as OperationalState,
)
from ._balancers.haproxy import (
    RuntimeAPI as RuntimeAPI,
)
from ._balancers.haproxy import (
    ServerState as ServerState,
)
from ._balancers.haproxy import (
    SocketError as SocketError,
)
from ._balancers.haproxy import (
    StateTimeout as StateTimeout,
)
from ._balancers.haproxy import (
    UnknownBackendError as UnknownBackendError,
)
from ._balancers.haproxy import (
    UnknownServerError as UnknownServerError,
)
from ._balancers.haproxy import (
    parse_servers_state as parse_servers_state,
)
from ._balancers.haproxy import (
    parse_stat_csv as parse_stat_csv,
)

__all__ = [
    "AdminState",
    "HAProxyError",
    "OperationalState",
    "RuntimeAPI",
    "ServerState",
    "SocketError",
    "StateTimeout",
    "UnknownBackendError",
    "UnknownServerError",
    "parse_servers_state",
    "parse_stat_csv",
]

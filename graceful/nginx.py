"""Take a server out of an nginx upstream and put it back, safely (open-source nginx).

The public face of :mod:`graceful._balancers.nginx`, where the code lives."""

from __future__ import annotations

from ._balancers.nginx import (
    MAX_FILE_BYTES as MAX_FILE_BYTES,
)
from ._balancers.nginx import (
    Change as Change,
)
from ._balancers.nginx import (
    LastServerError as LastServerError,
)
from ._balancers.nginx import (
    LockTimeoutError as LockTimeoutError,
)
from ._balancers.nginx import (
    NginxError as NginxError,
)
from ._balancers.nginx import (
    NotIncludedError as NotIncludedError,
)
from ._balancers.nginx import (
    ReloadError as ReloadError,
)
from ._balancers.nginx import (
    ReloadTimeoutError as ReloadTimeoutError,
)
from ._balancers.nginx import (
    Server as Server,
)
from ._balancers.nginx import (
    UnknownServerError as UnknownServerError,
)
from ._balancers.nginx import (
    UnknownUpstreamError as UnknownUpstreamError,
)
from ._balancers.nginx import (
    Upstream as Upstream,
)
from ._balancers.nginx import (
    UpstreamController as UpstreamController,
)
from ._balancers.nginx import (
    UpstreamFileError as UpstreamFileError,
)
from ._balancers.nginx import (
    ValidationError as ValidationError,
)
from ._balancers.nginx import (
    parse_upstreams as parse_upstreams,
)
from ._balancers.nginx import (
    set_down as set_down,
)

__all__ = [
    "MAX_FILE_BYTES",
    "Change",
    "LastServerError",
    "LockTimeoutError",
    "NginxError",
    "NotIncludedError",
    "ReloadError",
    "ReloadTimeoutError",
    "Server",
    "UnknownServerError",
    "UnknownUpstreamError",
    "Upstream",
    "UpstreamController",
    "UpstreamFileError",
    "ValidationError",
    "parse_upstreams",
    "set_down",
]

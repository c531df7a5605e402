"""graceful-drain: restart in daylight, lose nothing.

Middleware that counts in-flight work, probes that fail on a drain while the node keeps serving,
control routes, and the lifecycle they share. See the README for a quick start per stack.
"""

from __future__ import annotations

from . import _servers as _servers  # plugs the server shims into the adapters
from . import signals
from ._adapters.asgi import ASGIMiddleware
from ._adapters.wsgi import WSGIMiddleware
from ._core.config import Config, ConfigError
from ._core.errors import GracefulError
from ._runtime.lifecycle import (
    Hold,
    Lifecycle,
    LifecycleError,
    Phase,
    get_lifecycle,
    hold,
    is_draining,
    set_lifecycle,
)
from ._runtime.shutdown import SignalHandlers, install_signal_handlers
from ._version import __version__

__all__ = [
    "ASGIMiddleware",
    "Config",
    "ConfigError",
    "GracefulError",
    "Hold",
    "Lifecycle",
    "LifecycleError",
    "Phase",
    "SignalHandlers",
    "WSGIMiddleware",
    "__version__",
    "get_lifecycle",
    "hold",
    "install_signal_handlers",
    "is_draining",
    "set_lifecycle",
    "signals",
]

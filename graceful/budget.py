"""One budget: the delay, the drain timeout and the server's own stop must fit the kill deadline.

The public face of :mod:`graceful._core.budget`:
every name in its ``__all__``.
"""

from __future__ import annotations

from ._core.budget import *  # noqa: F403
from ._core.budget import __all__ as __all__

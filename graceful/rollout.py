"""``graceful rollout``: restart every node behind a load balancer, a batch at a time.

The public face of :mod:`graceful._tools.rollout`:
every name in its ``__all__``.
"""

from __future__ import annotations

from ._tools.rollout import *  # noqa: F403
from ._tools.rollout import __all__ as __all__

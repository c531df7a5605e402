"""Take a server out of an nginx upstream and put it back, safely (open-source nginx).

The public face of :mod:`graceful._balancers.nginx`:
every name in its ``__all__``.
"""

from __future__ import annotations

from ._balancers.nginx import *  # noqa: F403
from ._balancers.nginx import __all__ as __all__

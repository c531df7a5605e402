"""``graceful rollout``: restart every node behind a load balancer, a batch at a time.

The public face of :mod:`graceful._tools.rollout`, where the code lives."""

from __future__ import annotations

from ._tools.rollout import (
    READINESS_SETTLE as READINESS_SETTLE,
)
from ._tools.rollout import (
    Balancer as Balancer,
)
from ._tools.rollout import (
    HAProxyBalancer as HAProxyBalancer,
)
from ._tools.rollout import (
    NginxBalancer as NginxBalancer,
)
from ._tools.rollout import (
    NoBalancer as NoBalancer,
)
from ._tools.rollout import (
    Node as Node,
)
from ._tools.rollout import (
    Rollout as Rollout,
)
from ._tools.rollout import (
    RolloutUsageError as RolloutUsageError,
)
from ._tools.rollout import (
    StepFailed as StepFailed,
)
from ._tools.rollout import (
    check_template as check_template,
)
from ._tools.rollout import (
    make_nodes as make_nodes,
)

__all__ = [
    "READINESS_SETTLE",
    "Balancer",
    "HAProxyBalancer",
    "NginxBalancer",
    "NoBalancer",
    "Node",
    "Rollout",
    "RolloutUsageError",
    "StepFailed",
    "check_template",
    "make_nodes",
]

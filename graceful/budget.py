"""One budget: the delay, the drain timeout and the server's own stop must fit the kill deadline.

The public face of :mod:`graceful._core.budget`, where the code lives."""

from __future__ import annotations

from ._core.budget import (
    DOCKER_STOP_TIMEOUT as DOCKER_STOP_TIMEOUT,
)
from ._core.budget import (
    KUBERNETES_GRACE_PERIOD as KUBERNETES_GRACE_PERIOD,
)
from ._core.budget import (
    SERVER_STOP as SERVER_STOP,
)
from ._core.budget import (
    SYSTEMD_TIMEOUT_STOP as SYSTEMD_TIMEOUT_STOP,
)
from ._core.budget import (
    BudgetError as BudgetError,
)
from ._core.budget import (
    Problem as Problem,
)
from ._core.budget import (
    check_budget as check_budget,
)
from ._core.budget import (
    kubernetes_budget as kubernetes_budget,
)
from ._core.budget import (
    parse_timespan as parse_timespan,
)
from ._core.budget import (
    pod_spec as pod_spec,
)
from ._core.budget import (
    systemd_budget as systemd_budget,
)

__all__ = [
    "DOCKER_STOP_TIMEOUT",
    "KUBERNETES_GRACE_PERIOD",
    "SERVER_STOP",
    "SYSTEMD_TIMEOUT_STOP",
    "BudgetError",
    "Problem",
    "check_budget",
    "kubernetes_budget",
    "parse_timespan",
    "pod_spec",
    "systemd_budget",
]

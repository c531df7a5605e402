"""Tools to test graceful drains, shared by graceful's own tests, its benchmarks and its pytest
plugin, and public for yours (standard library only; no test framework, no server imported):

- :class:`FakeClock`: a monotonic clock that moves only when told to;
- :func:`poll_until` (and :func:`poll_until_async`): wait for a condition under a deadline,
  failing with :class:`WaitTimeout`, which names what it waited for; :func:`free_port`,
  :func:`wait_listening`, :func:`wait_answering`, :func:`http_status` on 127.0.0.1;
- :class:`Process` (a context manager) and :class:`Processes`: children in their own process
  group, ended by their own pid and group when the test is over, also when it failed;
  :class:`ExitWatch` notes the moment one exits;
- :func:`drain_under_load` and :func:`sigterm_under_load`: the live-drain harness. Start a
  server, put bounded :class:`Load` on it from N threads, signal it mid-load, and get a
  :class:`DrainResult` with the answers, the failures by kind, the exit status and the drain
  time::

      port = free_port()
      argv = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)]
      result = drain_under_load(argv, port, Load(call=Call(path="/orders/1"), callers=8))
      assert result.lost == 0 and result.exit_code == 0, result.summary()

- :class:`Cluster`: N nodes of an app on 127.0.0.1, restarted in turn (:meth:`Cluster.restart`,
  :meth:`Cluster.restart_in_turn`) under load spread as a load balancer with health checks
  spreads it (:meth:`Cluster.load`), and a :class:`ClusterReport` of every request and of the
  POSTs the app ran (a recorder in front of it counts them): ``assert_lossless()``::

      with Cluster("shop.app:app", server="gunicorn", nodes=3) as cluster:
          report = cluster.restart_under_load("/", post_path="/orders")
      report.assert_lossless()   # nothing failed, every POST ran once, every exit 0

- :func:`serve_lifespan`, :func:`read_body` and :func:`append_line` for the apps such tests
  serve; :func:`nginx_head` and :func:`nginx_temp_paths` for an nginx in front of them that
  keeps its files in one folder.
"""

from __future__ import annotations

from ._apps import append_line, read_body, serve_lifespan
from ._clock import FakeClock
from ._cluster import Cluster, ClusterLoad
from ._cluster_report import ClusterReport, NodeExchange, Restart
from ._errors import ProcessExited, WaitTimeout
from ._load import (
    Call,
    DrainResult,
    Exchange,
    Load,
    drain_under_load,
    failure_kind,
    sigterm_under_load,
)
from ._nginx import nginx_head, nginx_temp_paths
from ._procs import ExitWatch, Process, Processes, child_env
from ._wait import (
    free_port,
    http_status,
    poll_until,
    poll_until_async,
    wait_answering,
    wait_listening,
)

__all__ = [
    "Call",
    "Cluster",
    "ClusterLoad",
    "ClusterReport",
    "DrainResult",
    "Exchange",
    "ExitWatch",
    "FakeClock",
    "Load",
    "NodeExchange",
    "Process",
    "ProcessExited",
    "Processes",
    "Restart",
    "WaitTimeout",
    "append_line",
    "child_env",
    "drain_under_load",
    "failure_kind",
    "free_port",
    "http_status",
    "nginx_head",
    "nginx_temp_paths",
    "poll_until",
    "poll_until_async",
    "read_body",
    "serve_lifespan",
    "sigterm_under_load",
    "wait_answering",
    "wait_listening",
]

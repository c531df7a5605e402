"""Prometheus metrics of the node's drain: phase, in-flight work, drains, requests while draining.

::

    import graceful.prometheus        # pip install 'graceful-drain[prometheus]'
    from prometheus_client import make_wsgi_app

    graceful.prometheus.register()    # on prometheus_client's default registry
    metrics = make_wsgi_app()         # serve it at /metrics, outside graceful's middleware

The collector reads the lifecycle at scrape time, so the figures are never stale:

- ``graceful_phase{phase="..."}``: 1 for the current phase, 0 for the others;
- ``graceful_inflight``: requests and held work in flight on the whole node; under gunicorn
  with ``graceful.gunicorn`` it is the total of every worker (read from the shared slots), so
  it is the same whichever worker answers the scrape;
- ``graceful_inflight_by_worker{pid="..."}``: the same, per worker process;
- ``graceful_websockets``: open websockets in this process;
- ``graceful_drains_total``: drains started (every gunicorn worker follows each drain);
- ``graceful_requests_while_draining_total``: requests that arrived while the node was
  draining; under ``graceful.gunicorn`` those of every worker, the exited ones included (the
  master keeps their count when it clears their slot), so the counter never goes down.

Mount the metrics app outside the middleware (as a route of a dispatcher in front of it), so a
scrape is not counted as in flight.
"""

from __future__ import annotations

from collections.abc import Iterable

try:
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised by the import-hint test
    raise ImportError(
        "graceful.prometheus needs prometheus_client: "
        "pip install 'graceful-drain[prometheus]' (or pip install prometheus_client)"
    ) from exc

from ._core.protocol import Status
from ._runtime.lifecycle import Lifecycle, Phase, get_lifecycle
from ._servers.node_shm import SlotView

__all__ = ["GracefulCollector", "register"]


class GracefulCollector(Collector):
    """Reads ``lifecycle`` (by default the process-wide one, looked up at each scrape)."""

    def __init__(self, lifecycle: Lifecycle | None = None) -> None:
        self._lifecycle = lifecycle

    @property
    def lifecycle(self) -> Lifecycle:
        return self._lifecycle if self._lifecycle is not None else get_lifecycle()

    def collect(self) -> Iterable[Metric]:
        lifecycle = self.lifecycle
        status = Status.from_json(lifecycle.snapshot())
        phase = GaugeMetricFamily(
            "graceful_phase",
            "The node's lifecycle phase (1 for the current one).",
            labels=["phase"],
        )
        for candidate in Phase:
            phase.add_metric([candidate.value], 1.0 if candidate.value == status.phase else 0.0)
        yield phase
        yield GaugeMetricFamily(
            "graceful_inflight",
            "Requests and held work in flight on the node (every worker).",
            value=status.inflight,
        )
        by_worker = GaugeMetricFamily(
            "graceful_inflight_by_worker",
            "Requests and held work in flight, per worker process.",
            labels=["pid"],
        )
        for pid, count in sorted(status.inflight_by_worker.items()):
            by_worker.add_metric([pid], count)
        yield by_worker
        yield GaugeMetricFamily(
            "graceful_websockets",
            "Open websockets in this process.",
            value=status.websockets,
        )
        yield CounterMetricFamily("graceful_drains", "Drains started.", value=lifecycle.drains)
        served = lifecycle.served_while_draining
        if isinstance(lifecycle.node, SlotView):  # the other gunicorn workers' counts too
            served += lifecycle.node.others_served_while_draining()
        yield CounterMetricFamily(
            "graceful_requests_while_draining",
            "Requests that arrived while the node was draining (every worker, exited ones too).",
            value=served,
        )


def register(
    registry: CollectorRegistry | None = None, lifecycle: Lifecycle | None = None
) -> GracefulCollector:
    """Add graceful's metrics to ``registry`` (prometheus_client's default one when None)."""
    collector = GracefulCollector(lifecycle)
    (REGISTRY if registry is None else registry).register(collector)
    return collector

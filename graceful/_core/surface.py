"""The HTTP surface (probes and control routes), sans-io.

Adapters call :meth:`Surface.match` on every request (one dict lookup and one prefix test) and,
for a match, :meth:`Surface.handle`, which answers with a finished :class:`Response` or with one
of three things the adapter must do first: run the readiness checks (:class:`RunChecks`), wait
for the drain (:class:`WaitDrained`) or open an events stream (:class:`OpenEvents`).
"""

from __future__ import annotations

import enum
import hmac
import math
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from . import protocol as wire
from .config import Config, parse_seconds
from .errors import GracefulError
from .phases import LifecycleError, Phase
from .protocol import MAX_WAIT, REJECTED_HEADER

__all__ = [
    "EVENTS_FULL",
    "EVENTS_HEADER",
    "EVENTS_OFF",
    "MAX_WAIT",
    "NEVER_REJECTED",
    "REJECTED_HEADER",
    "OpenEvents",
    "Outcome",
    "QueryError",
    "Response",
    "Route",
    "RunChecks",
    "Surface",
    "SurfaceLifecycle",
    "WaitDrained",
    "rejection",
]


class Route(enum.Enum):
    LIVEZ = "livez"
    READYZ = "readyz"
    STATUS = "status"
    DRAIN = "drain"
    RESUME = "resume"
    EVENTS = "events"
    UNKNOWN = "unknown"


_METHODS = {
    Route.LIVEZ: ("GET", "HEAD"),
    Route.READYZ: ("GET", "HEAD"),
    Route.STATUS: ("GET", "HEAD"),
    Route.DRAIN: ("POST",),
    Route.RESUME: ("POST",),
    Route.EVENTS: ("GET",),
}
_NEEDS_TOKEN = frozenset({Route.STATUS, Route.DRAIN, Route.RESUME})


@dataclass(frozen=True)
class Response:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True)
class RunChecks:
    """Run the readiness checks, then call :meth:`Surface.readiness`."""

    head: bool


@dataclass(frozen=True)
class WaitDrained:
    """Wait (at most ``timeout``) for the drain, then call :meth:`Surface.drain_waited`."""

    timeout: float


@dataclass(frozen=True)
class OpenEvents:
    """Open a server-sent-event stream (see :mod:`graceful._core.stream`)."""


Outcome = Response | RunChecks | WaitDrained | OpenEvents


class CheckResult(Protocol):
    """One readiness check's result (the runtime's ``CheckOutcome``)."""

    @property
    def name(self) -> str: ...
    @property
    def ok(self) -> bool: ...
    @property
    def output(self) -> str: ...


class SurfaceLifecycle(Protocol):
    """What the surface needs of a node's lifecycle (the runtime's ``Lifecycle``).

    Reading ``phase`` and ``reason`` never changes anything; ``drain`` and ``resume`` raise
    :class:`~graceful._core.phases.LifecycleError` where the phase does not allow them.
    """

    @property
    def config(self) -> Config: ...
    @property
    def phase(self) -> Phase: ...
    @property
    def reason(self) -> str: ...
    def drain(self, reason: str) -> None: ...
    def resume(self, reason: str) -> None: ...
    def snapshot(self) -> Mapping[str, Any]: ...


def _json(
    status: int,
    body: Mapping[str, Any],
    content_type: str = wire.HEALTH_JSON,
    extra: Iterable[tuple[str, str]] = (),
    head: bool = False,
) -> Response:
    data = wire.encode_json(body)
    headers = (
        ("Content-Type", content_type),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        *extra,
    )
    return Response(status, headers, b"" if head else data)


def _fail(
    status: int, output: str, *, extra: Iterable[tuple[str, str]] = (), head: bool = False
) -> Response:
    return _json(status, wire.health("fail", output), extra=extra, head=head)


#: The answer to an events subscriber past ``events_max_subscribers`` (node-wide) or past this
#: worker's share of streams, wherever it is refused.
EVENTS_FULL = _fail(
    503,
    "too many event subscribers",
    extra=((wire.RETRY_AFTER_HEADER, str(wire.EVENTS_FULL_RETRY_AFTER)),),
)

#: Set to ``off`` on :data:`EVENTS_OFF` (re-exported from the wire contract).
EVENTS_HEADER = wire.EVENTS_HEADER
#: The headers of an events stream's 200.
EVENTS_HEADERS = wire.EVENTS_RESPONSE_HEADERS
#: The answer to an events request where a stream would take a worker's only thread (a
#: gunicorn sync worker, a gthread worker of fewer than 4 threads, a single-threaded WSGI
#: server). A 204 tells an EventSource to stop reconnecting; the pool falls back to in-band
#: headers and readiness probes.
EVENTS_OFF = Response(204, ((EVENTS_HEADER, wire.EVENTS_OFF), ("Cache-Control", "no-store")), b"")

#: Methods reject mode never rejects (nginx's non-idempotent set): a proxy does not re-send them
#: after a 503 (without ``proxy_next_upstream ... non_idempotent``), so they are served.
NEVER_REJECTED = frozenset({"POST", "PATCH", "LOCK"})


def rejection(delay: float) -> Response:
    """The answer to a new request while draining in reject mode (``reject_when_draining``).

    ``Retry-After`` is the drain delay rounded up (at least 1 s): the time load balancers are
    given to take the node out, so a retry after it lands elsewhere. ``Graceful-Rejected: 1``
    says the app never saw the request (see :data:`REJECTED_HEADER`). Adapters add
    ``Connection: close`` where the server lets them.
    """
    body = b"draining: retry on another node\n"
    headers = (
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        (wire.RETRY_AFTER_HEADER, wire.retry_after(delay)),
        (wire.STATE_HEADER, wire.STATE_DRAINING),
        (REJECTED_HEADER, wire.REJECTED_VALUE),
    )
    return Response(503, headers, body)


class QueryError(GracefulError, ValueError):
    """A control route's query string that the route does not take (answered with 400)."""


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("", "1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise QueryError(f"query parameter {name!r} must be 1 or 0, not {value[:40]!r}")


def _parse_seconds(name: str, value: str) -> float:
    try:
        seconds = parse_seconds(value)
    except ValueError:  # a ConfigError
        seconds = math.nan
    if not 0 < seconds <= MAX_WAIT:  # NaN fails too
        raise QueryError(f"query parameter {name!r} must be seconds in (0, {MAX_WAIT:g}]")
    return seconds


class Surface:
    def __init__(self, lifecycle: SurfaceLifecycle) -> None:
        config = lifecycle.config
        self.lifecycle = lifecycle
        self.prefix = config.control_prefix
        self._under_prefix = config.control_prefix + "/"
        self._token = None if config.token is None else config.token.encode()
        self.routes = {
            config.livez_path: Route.LIVEZ,
            config.readyz_path: Route.READYZ,
            wire.control_path(wire.STATUS, self.prefix): Route.STATUS,
            wire.control_path(wire.DRAIN, self.prefix): Route.DRAIN,
            wire.control_path(wire.RESUME, self.prefix): Route.RESUME,
            wire.control_path(wire.EVENTS, self.prefix): Route.EVENTS,
        }
        #: What a new request gets while announcing, or None to serve it (the default).
        self.rejection = rejection(config.delay) if config.reject_when_draining else None

    def match(self, path: str) -> Route | None:
        route = self.routes.get(path)
        if (
            route is None
            and path.startswith(self.prefix)
            and (path == self.prefix or path.startswith(self._under_prefix))
        ):
            return Route.UNKNOWN
        return route

    def authorized(self, authorization: bytes | None) -> bool:
        """Constant-time check of ``Authorization: Bearer <token>``."""
        if self._token is None or authorization is None:
            return False
        scheme, _, credentials = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(credentials.strip(), self._token)

    def handle(self, route: Route, method: str, query: str, authorization: bytes | None) -> Outcome:
        """The answer to a probe or control request.

        ``authorization`` is the raw header value, or None when absent or sent more than once.
        """
        head = method == "HEAD"  # whatever the answer, a HEAD gets no body
        if route is Route.UNKNOWN or (route in _NEEDS_TOKEN and self._token is None):
            return _fail(404, "not found", head=head)
        if route in _NEEDS_TOKEN and not self.authorized(authorization):
            return _fail(
                401,
                "missing or wrong bearer token",
                extra=(("WWW-Authenticate", 'Bearer realm="graceful"'),),
                head=head,
            )
        allowed = _METHODS[route]
        if method not in allowed:
            return _fail(
                405,
                f"method {method[:20]!r} not allowed",
                extra=(("Allow", ", ".join(allowed)),),
                head=head,
            )
        lifecycle = self.lifecycle
        if route is Route.LIVEZ:
            phase = lifecycle.phase
            alive = phase != Phase.STOPPED
            body = wire.health("pass" if alive else "fail", phase=phase.value)
            return _json(200 if alive else 503, body, head=head)
        if route is Route.READYZ:
            if lifecycle.phase == Phase.SERVING and lifecycle.config.checks:
                return RunChecks(head)
            return self.readiness([], head=head)
        if route is Route.STATUS:
            return _json(200, lifecycle.snapshot(), wire.JSON, head=head)
        if route is Route.EVENTS:
            return OpenEvents()  # the adapter admits it, or answers EVENTS_OFF or EVENTS_FULL
        try:
            params = self._params(route, query)
        except QueryError as exc:
            return _fail(400, str(exc))
        if route is Route.RESUME:
            return self._change(lifecycle.resume, "resumed by control route")
        answer = self._change(lifecycle.drain, "drained by control route")
        if answer.status == 200 and params.get("wait"):
            # Bounded like an explicit ?timeout= (huge settings would overflow the wait).
            default = min(lifecycle.config.delay + lifecycle.config.drain_timeout, MAX_WAIT)
            return WaitDrained(params.get("timeout", default))
        return answer

    def _params(self, route: Route, query: str) -> dict[str, Any]:
        if not query:
            return {}
        try:
            pairs = urllib.parse.parse_qsl(
                query, keep_blank_values=True, strict_parsing=True, max_num_fields=10
            )
        except ValueError:
            raise QueryError("malformed query string") from None
        allowed = ("wait", "timeout") if route is Route.DRAIN else ()
        params: dict[str, Any] = {}
        for name, value in pairs:
            if name not in allowed:
                listed = ", ".join(allowed) or "none"
                raise QueryError(f"unknown query parameter {name[:40]!r}; allowed: {listed}")
            if name in params:
                raise QueryError(f"query parameter {name!r} given twice")
            params[name] = (
                _parse_bool(name, value) if name == "wait" else _parse_seconds(name, value)
            )
        if "timeout" in params and not params.get("wait"):
            raise QueryError("timeout applies only with wait=1")
        return params

    def _change(self, action: Callable[[str], None], reason: str) -> Response:
        try:
            action(reason)
        except LifecycleError as exc:
            body = wire.health("fail", str(exc), phase=exc.phase.value)
            return _json(409, body, wire.JSON)
        return _json(200, self.lifecycle.snapshot(), wire.JSON)

    def readiness(self, outcomes: Sequence[CheckResult], *, head: bool) -> Response:
        lifecycle = self.lifecycle
        phase = lifecycle.phase
        body: dict[str, Any] = {"phase": phase.value}
        if outcomes:
            body["checks"] = {
                o.name: [{"status": "pass" if o.ok else "fail", "output": o.output}]
                for o in outcomes
            }
        failed = [o for o in outcomes if not o.ok]
        if phase != Phase.SERVING:
            body.update(status="fail", output=phase.value, notes=[lifecycle.reason])
        elif failed:
            body.update(status="fail", output=failed[0].output)
        else:
            body.update(status="pass", output="serving")
        return _json(200 if body["status"] == "pass" else 503, body, head=head)

    def drain_waited(self, drained: bool) -> Response:
        """200 once drained; 202 when the wait ended first (the drain goes on)."""
        snapshot = self.lifecycle.snapshot()
        return _json(200 if drained else 202, snapshot, wire.JSON)

"""The wire contract between a node and what talks to it: one definition of each header, path,
document and stream encoding, used by the middlewares, the client, the command line, rollout
and metrics.

Pure: no I/O, no clock. The decoders are incremental (fed bytes as they arrive) and bounded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Literal, TypedDict

from .errors import GracefulError

__all__ = [
    "CONTROL_PREFIX",
    "DRAIN",
    "EVENTS",
    "EVENTS_CONTENT_TYPE",
    "EVENTS_FULL_RETRY_AFTER",
    "EVENTS_HEADER",
    "EVENTS_OFF",
    "EVENTS_RESPONSE_HEADERS",
    "EVENT_RETRY",
    "HEALTH_JSON",
    "JSON",
    "LIVEZ_PATH",
    "MAX_EVENT",
    "MAX_LINE",
    "MAX_WAIT",
    "PROBE_COMMENT",
    "READYZ_PATH",
    "REJECTED_HEADER",
    "REJECTED_VALUE",
    "RESUME",
    "RETRY_AFTER_HEADER",
    "STATE_DRAINING",
    "STATE_HEADER",
    "STATUS",
    "EventDecoder",
    "EventStreamError",
    "Health",
    "Notice",
    "ProtocolError",
    "Status",
    "control_path",
    "encode_json",
    "format_comment",
    "format_event",
    "health",
    "is_draining",
    "is_rejected",
    "retry_after",
]

# -- headers ----------------------------------------------------------------------------------

#: On every response a node sends while it announces a drain: ``Graceful-State: draining``.
STATE_HEADER = "Graceful-State"
STATE_DRAINING = "draining"

#: The mark on the middleware's own rejection (reject mode), and only there: the middlewares
#: remove it from any 503 the app produced, so it tells "the app never saw this request".
REJECTED_HEADER = "Graceful-Rejected"
REJECTED_VALUE = "1"

#: ``Graceful-Events: off`` on the 204 that refuses an events stream where a stream would take
#: a worker's only thread.
EVENTS_HEADER = "Graceful-Events"
EVENTS_OFF = "off"

#: On a rejection (the drain delay, rounded up) and on a full events stream (this many seconds).
RETRY_AFTER_HEADER = "Retry-After"
EVENTS_FULL_RETRY_AFTER = 5

HEALTH_JSON = "application/health+json"
JSON = "application/json"
EVENTS_CONTENT_TYPE = "text/event-stream; charset=utf-8"
EVENTS_RESPONSE_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Type", EVENTS_CONTENT_TYPE),
    ("Cache-Control", "no-store"),
    ("X-Accel-Buffering", "no"),
)


def retry_after(delay: float) -> str:
    """The ``Retry-After`` of a rejection: the drain delay rounded up, at least 1 s (the time
    load balancers are given to take the node out, so a retry after it lands elsewhere)."""
    return str(max(1, math.ceil(delay)))


def is_draining(headers: Mapping[str, str]) -> bool:
    """Whether a response says its node is draining (case-insensitive mapping, like requests')."""
    return headers.get(STATE_HEADER, "").strip().lower() == STATE_DRAINING


def is_rejected(headers: Mapping[str, str]) -> bool:
    """Whether a response is the middleware's own rejection: the app never saw the request."""
    return headers.get(REJECTED_HEADER, "").strip() == REJECTED_VALUE


# -- paths ------------------------------------------------------------------------------------

LIVEZ_PATH = "/livez"
READYZ_PATH = "/readyz"
CONTROL_PREFIX = "/-/graceful"
#: The routes under the control prefix.
STATUS: Final = "status"
DRAIN: Final = "drain"
RESUME: Final = "resume"
EVENTS: Final = "events"

ControlRoute = Literal["status", "drain", "resume", "events"]


#: The longest ``POST drain?wait=1`` waits (``?timeout=``); the command line refuses more.
MAX_WAIT = 3600.0


def control_path(name: ControlRoute, prefix: str = CONTROL_PREFIX) -> str:
    """``/-/graceful/status`` and the like, under ``prefix``."""
    return f"{prefix}/{name}"


# -- documents --------------------------------------------------------------------------------


class ProtocolError(GracefulError, ValueError):
    """A document or stream that does not follow the contract."""


def encode_json(body: Mapping[str, Any]) -> bytes:
    """A JSON body as the node sends it: compact, sorted keys, one trailing newline."""
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode() + b"\n"


HealthStatus = Literal["pass", "fail"]


class Health(TypedDict, total=False):
    """An ``application/health+json`` body (probes, and the failures of control routes)."""

    status: HealthStatus
    output: str
    phase: str
    notes: list[str]
    checks: dict[str, list[dict[str, str]]]


def health(status: HealthStatus, output: str | None = None, **extra: Any) -> Health:
    body: dict[str, Any] = {"status": status}
    if output is not None:
        body["output"] = output
    body.update(extra)
    return body  # type: ignore[return-value]  # TypedDict from keyword arguments


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Status:
    """The document ``GET /-/graceful/status`` answers (and ``drain``/``resume`` on success).

    :meth:`from_json` is tolerant (unknown keys are ignored, newer optional ones may be
    missing) but refuses a document without a phase and an in-flight count of the right types.
    """

    phase: str
    inflight: int
    reason: str = ""
    in_phase_for: float = 0.0
    inflight_by_worker: dict[str, int] = field(default_factory=dict)
    websockets: int = 0
    oldest_request_age: float | None = None
    delay_remaining: float | None = None
    drain_deadline_in: float | None = None
    events_subscribers: int = 0
    final: bool = False
    pid: int | None = None
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return encode_json(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> Status:
        """Parse a status document (bytes, text, or a decoded object); :class:`ProtocolError`
        names what is wrong with it."""
        if isinstance(data, (bytes, str)):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ProtocolError(f"a status document must be JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise ProtocolError(
                f"a status document must be a JSON object, not {type(data).__name__}"
            )
        phase, inflight = data.get("phase"), data.get("inflight")
        if not isinstance(phase, str) or not phase:
            raise ProtocolError(f"a status document needs a 'phase' string, got {phase!r:.60}")
        if not isinstance(inflight, int) or isinstance(inflight, bool):
            raise ProtocolError(
                f"a status document needs an integer 'inflight', got {inflight!r:.60}"
            )
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in known or value is None:
                continue
            if not _fits(name, value):
                raise ProtocolError(f"status field {name!r} has a wrong value: {value!r:.60}")
            values[name] = value
        return cls(**values)


_STRINGS = frozenset({"phase", "reason", "version"})
_INTS = frozenset({"inflight", "websockets", "events_subscribers", "pid"})


def _fits(name: str, value: Any) -> bool:
    if name in _STRINGS:
        return isinstance(value, str)
    if name in _INTS:
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "final":
        return isinstance(value, bool)
    if name == "inflight_by_worker":
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, int) for k, v in value.items()
        )
    return _number(value)


# -- the events stream ------------------------------------------------------------------------


class Notice(TypedDict):
    """One phase notice of the events stream (the ``data:`` of an ``event: phase``)."""

    id: int
    phase: str
    reason: str
    retry_after: int


#: The first bytes of every stream: how long an EventSource waits before it reconnects (ms).
EVENT_RETRY = b"retry: 2000\n\n"
#: An empty comment, written where a stream has no other way to find that its client has gone.
PROBE_COMMENT = b":\n\n"


def format_event(notice: Mapping[str, Any]) -> bytes:
    data = json.dumps(notice, separators=(",", ":"), sort_keys=True)
    return f"id: {notice['id']}\nevent: phase\ndata: {data}\n\n".encode()


def format_comment(text: str) -> bytes:
    return f": {text}\n\n".encode()


#: Limits on an events stream: a longer line, or event, is a broken stream, never a notice.
MAX_LINE = 16 * 1024
MAX_EVENT = 64 * 1024


class EventStreamError(ProtocolError):
    """An events stream a reader stops reading: past :data:`MAX_LINE` or :data:`MAX_EVENT`."""


class EventDecoder:
    """The JSON object notices of a server-sent-event stream, fed bytes as they arrive.

    Holds at most :data:`MAX_LINE` bytes of an unfinished line and :data:`MAX_EVENT` of an
    unfinished event (past either: :class:`EventStreamError`, raised before the bytes are
    copied). Comments (heartbeats), ``id:``, ``event:`` and ``retry:`` lines are skipped; an
    event whose data is not a JSON object is dropped.
    """

    def __init__(self, *, max_line: int = MAX_LINE, max_event: int = MAX_EVENT) -> None:
        self.max_line = max_line
        self.max_event = max_event
        self._pending = bytearray()
        self._data: list[bytes] = []
        self._size = 0
        #: The longest unfinished line held so far, and the notices decoded (for diagnostics).
        self.largest_pending = 0
        self.notices = 0

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """The notices ``chunk`` completes, in order."""
        notices: list[dict[str, Any]] = []
        pending = self._pending
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._hold(end - start)
            pending += chunk[start:end]
            line = bytes(pending)
            pending.clear()
            notice = self._line(line[:-1] if line.endswith(b"\r") else line)
            if notice is not None:
                notices.append(notice)
            start = end + 1
        self._hold(len(chunk) - start)
        pending += chunk[start:]
        return notices

    def _hold(self, more: int) -> None:
        held = len(self._pending) + more
        if held > self.max_line:
            raise EventStreamError(f"a line longer than {self.max_line} bytes")
        self.largest_pending = max(self.largest_pending, held)

    def _line(self, line: bytes) -> dict[str, Any] | None:
        if not line:  # a blank line ends an event
            data, self._data, self._size = self._data, [], 0
            notice = _decode(data)
            if notice is not None:
                self.notices += 1
            return notice
        if line.startswith(b"data:"):
            value = line[6:] if line.startswith(b"data: ") else line[5:]
            self._size += len(value) + 1
            if self._size > self.max_event:
                raise EventStreamError(f"an event longer than {self.max_event} bytes")
            self._data.append(value)
        return None


def _decode(data: Iterable[bytes]) -> dict[str, Any] | None:
    """The notice an event's data lines carry, or None (no data, not a JSON object)."""
    lines = list(data)
    if not lines:
        return None
    try:
        notice = json.loads(b"\n".join(lines))
    except ValueError:
        return None
    return notice if isinstance(notice, dict) else None

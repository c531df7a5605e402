"""The live-drain harness: bounded load on a server from N threads, a signal mid-load, and a
ledger of every request: what was sent, answered and failed, and how the process exited.

The callers act like a load balancer's: each keeps one keep-alive connection to 127.0.0.1,
never retries, and all stop at the first failed readiness probe after the signal (the probe
runs every ``probe_interval`` on a fresh connection, as a health check does).
"""

from __future__ import annotations

import collections
import dataclasses
import http.client
import select
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ._procs import Process
from ._wait import LOCALHOST, get, wait_answering

__all__ = [
    "Call",
    "DrainResult",
    "Exchange",
    "Load",
    "drain_under_load",
    "failure_kind",
    "send_call",
    "sigterm_under_load",
]

MAX_CALLERS = 256


@dataclasses.dataclass(frozen=True)
class Call:
    """One request the callers send; ``expect`` is the status it must get (None: any below
    500)."""

    method: str = "GET"
    path: str = "/"
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    expect: int | None = None

    def accepts(self, status: int) -> bool:
        return status < 500 if self.expect is None else status == self.expect


@dataclasses.dataclass(frozen=True)
class Load:
    """What to put on the server, bounded in callers, requests and time.

    ``call`` is one :class:`Call` for every request, or a function of (caller number,
    request number) that makes each. The signal goes after ``seconds`` under load; the whole
    run ends within ``max_seconds``.
    """

    call: Call | Callable[[int, int], Call] = Call()
    callers: int = 4
    seconds: float = 1.0
    max_requests: int = 50_000
    max_seconds: float = 60.0
    request_timeout: float = 15.0
    ready_path: str = "/readyz"
    live_path: str | None = None
    probe_interval: float = 0.1
    probe_timeout: float = 2.0
    signum: int = signal.SIGTERM

    def __post_init__(self) -> None:
        if not 1 <= self.callers <= MAX_CALLERS:
            raise ValueError(f"callers must be 1 to {MAX_CALLERS}, not {self.callers}")
        if self.max_requests < 1:
            raise ValueError(f"max_requests must be 1 or more, not {self.max_requests}")
        for name in ("max_seconds", "request_timeout", "probe_interval", "probe_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be more than 0 seconds, not {getattr(self, name)}")
        if not 0 <= self.seconds < self.max_seconds:
            raise ValueError(
                f"seconds ({self.seconds}) must be 0 or more and below max_seconds "
                f"({self.max_seconds}): the signal goes within the run"
            )

    def call_for(self, caller: int, number: int) -> Call:
        return self.call if isinstance(self.call, Call) else self.call(caller, number)


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One request of the ledger: which caller sent it, when (``time.monotonic()``); its status
    and when its answer was read whole (None: no answer); the kind of its failure (``"status
    503"``, ``"connection refused"``, ...; None when it got what it expected) and the error's
    text."""

    caller: int
    call: Call
    sent_at: float
    status: int | None = None
    answered_at: float | None = None
    failure: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclasses.dataclass
class DrainResult:
    """The ledger of one run, and what the process and the probes did."""

    exchanges: list[Exchange]
    signal_at: float
    exit_code: int | None
    """The exit status (None: still running at the end of the run)."""
    exited_at: float | None
    ready_failed_at: float | None
    """The first failed readiness probe after the signal (its answer or error arrived)."""
    ready_failed_with: str | None
    ready_failures_before_signal: int
    ready_ok_after_failure: int
    """Readiness probes that passed after the first failed one (a node ready again)."""
    live_ok_until: float | None
    live_failed_at: float | None
    live_failed_with: str | None
    output: str
    """The server's output, when the harness started it."""

    @property
    def sent(self) -> int:
        return len(self.exchanges)

    @property
    def sent_after_signal(self) -> int:
        return sum(e.sent_at >= self.signal_at for e in self.exchanges)

    @property
    def answered(self) -> int:
        """Requests that got the answer they expected."""
        return sum(e.ok for e in self.exchanges)

    @property
    def failures(self) -> list[str]:
        """``"METHOD path: kind: detail"`` for each request that failed, in order."""
        return [
            f"{e.call.method} {e.call.path}: {e.failure}" + (f": {e.detail}" if e.detail else "")
            for e in self.exchanges
            if e.failure is not None
        ]

    @property
    def failures_by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(e.failure for e in self.exchanges if e.failure))

    @property
    def lost(self) -> int:
        return len(self.exchanges) - self.answered

    @property
    def last_answer_at(self) -> float | None:
        times = [e.answered_at for e in self.exchanges if e.answered_at is not None]
        return max(times) if times else None

    @property
    def drain_time(self) -> float | None:
        """Last answer read to the process's exit, in seconds."""
        last = self.last_answer_at
        return None if self.exited_at is None or last is None else self.exited_at - last

    @property
    def exit_after_signal(self) -> float | None:
        return None if self.exited_at is None else self.exited_at - self.signal_at

    @property
    def ready_failed_after(self) -> float | None:
        """Signal to the first failed readiness probe, in seconds (up to one probe interval
        and a round trip later than the server's own reaction)."""
        return None if self.ready_failed_at is None else self.ready_failed_at - self.signal_at

    def summary(self) -> str:
        """A few lines for an assertion message: counts, times from the signal, failures."""

        def rel(at: float | None) -> str:
            return "never" if at is None else f"{at - self.signal_at:+.3f}s"

        lines = [
            f"sent {self.sent} ({self.sent_after_signal} after the signal), answered "
            f"{self.answered}, lost {self.lost} {self.failures_by_kind or ''}".rstrip(),
            f"from the signal: ready failed {rel(self.ready_failed_at)} "
            f"({self.ready_failed_with}), last answer {rel(self.last_answer_at)}, exited "
            f"{rel(self.exited_at)} with {self.exit_code}",
            *(f"  {failure}" for failure in self.failures[:20]),
        ]
        if self.output:
            lines += ["--- server output (last 3000 characters):", self.output[-3000:]]
        return "\n".join(lines)


#: Each kind of failure, and the words of an error (or the errors it wraps) that name it.
_KINDS = {
    "connection refused": ("refused",),
    "connection reset": ("reset by peer", "ConnectionResetError"),
    "closed without an answer": ("RemoteDisconnected",),
    "broken pipe": ("BrokenPipe",),
    "incomplete answer": ("IncompleteRead",),
    "timed out": ("timed out", "Timeout"),
}


def failure_kind(exc: BaseException) -> str:
    """What kind of failure ``exc`` is (``"connection refused"``, ``"timed out"``, ...), read
    from its text and the errors it wraps; its type's name when none fits."""
    names: list[str] = []
    chain: BaseException | None = exc
    while chain is not None and len(names) < 10:
        names.append(f"{type(chain).__name__} {chain}")
        chain = chain.__cause__ or chain.__context__
    return kind_in(" ".join(names), type(exc).__name__)


def kind_in(text: str, otherwise: str) -> str:
    """The first kind of failure named in ``text``; ``otherwise`` when none is."""
    return next(
        (kind for kind, words in _KINDS.items() if any(w in text for w in words)), otherwise
    )


class _Run:
    """The shared state of one run; its methods are the threads' bodies."""

    def __init__(self, process: Process, port: int, load: Load) -> None:
        self.process, self.port, self.load = process, port, load
        self.deadline = time.monotonic() + load.max_seconds
        self.lock = threading.Lock()
        self.exchanges: list[Exchange] = []
        self.tickets = 0
        self.signal_at: float | None = None
        self.stop_sending = threading.Event()
        self.done = threading.Event()
        self.ready_failed_at: float | None = None
        self.ready_failed_with: str | None = None
        self.ready_failures_before = 0
        self.ready_ok_after = 0
        self.live_ok_until: float | None = None
        self.live_failed_at: float | None = None
        self.live_failed_with: str | None = None

    def ticket(self) -> bool:
        """May a caller send one more request? Counts it if so."""
        with self.lock:
            if self.stop_sending.is_set():
                return False
            if self.tickets >= self.load.max_requests or time.monotonic() >= self.deadline:
                self.stop_sending.set()  # nothing more to send: no need to wait for it
                return False
            self.tickets += 1
            return True

    def caller(self, number: int) -> None:
        connection: http.client.HTTPConnection | None = None
        sequence = 0
        try:
            while self.ticket():
                call = self.load.call_for(number, sequence)
                sequence += 1
                connection = self.send(connection, number, call)
        finally:
            if connection is not None:
                connection.close()

    def send(
        self, connection: http.client.HTTPConnection | None, number: int, call: Call
    ) -> http.client.HTTPConnection | None:
        """One request on the caller's keep-alive connection; the connection to use next."""
        exchange, connection = send_call(
            connection, self.port, number, call, self.load.request_timeout
        )
        self.record(exchange)
        return connection

    def record(self, exchange: Exchange) -> None:
        with self.lock:
            self.exchanges.append(exchange)

    def probe(self) -> None:
        """Probe readiness (and liveness) every ``probe_interval`` until the run is over."""
        next_tick = time.monotonic()
        while not self.done.is_set():
            ready, how = self.probe_once(self.load.ready_path)
            seen = time.monotonic()
            if not ready and self.signal_at is None:
                self.ready_failures_before += 1
            elif not ready and self.ready_failed_at is None:
                self.ready_failed_at, self.ready_failed_with = seen, how
                self.stop_sending.set()  # the load balancer takes the node out
            elif ready and self.ready_failed_at is not None:
                self.ready_ok_after += 1
            if self.load.live_path is not None:
                alive, how = self.probe_once(self.load.live_path)
                seen = time.monotonic()
                if alive:
                    self.live_ok_until = seen
                elif self.live_failed_at is None:
                    self.live_failed_at, self.live_failed_with = seen, how
            next_tick = max(next_tick + self.load.probe_interval, time.monotonic())
            # The probe interval IS the behaviour (a load balancer's health check period).
            self.done.wait(next_tick - time.monotonic())

    def probe_once(self, path: str) -> tuple[bool, str]:
        status, how = get(self.port, path, timeout=self.load.probe_timeout)
        return status == 200, how if status else kind_in(how, how.split(":")[0])

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def send_call(
    connection: http.client.HTTPConnection | None,
    port: int,
    caller: int,
    call: Call,
    timeout: float,
) -> tuple[Exchange, http.client.HTTPConnection | None]:
    """``call`` on ``connection`` (a keep-alive one to 127.0.0.1:``port``; None or dropped by
    the server: a new one, as a proxy opens) and what came of it; never retried. Returns the
    exchange and the connection to use next (None when it was closed)."""
    if connection is not None and _dropped(connection):
        connection.close()  # the server closed it while idle: a new one, as a proxy does
        connection = None
    if connection is None:
        connection = http.client.HTTPConnection(LOCALHOST, port, timeout=timeout)
    sent_at = time.monotonic()
    try:
        connection.request(call.method, call.path, call.body or None, dict(call.headers))
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        text = f"{type(exc).__name__}: {exc}"[:200]
        return Exchange(caller, call, sent_at, None, None, failure_kind(exc), text), None
    answered_at = time.monotonic()
    status = response.status
    failure = None if call.accepts(status) else f"status {status}"
    detail = "" if failure is None else repr(body[:80])
    exchange = Exchange(caller, call, sent_at, status, answered_at, failure, detail)
    if response.will_close:
        connection.close()
        return exchange, None
    return exchange, connection


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection the server has closed (it reads as ready: EOF)."""
    sock = connection.sock
    return sock is not None and bool(select.select([sock], [], [], 0)[0])


def sigterm_under_load(
    process: Process,
    port: int,
    load: Load = Load(),
    *,
    before_signal: Callable[[], object] | None = None,
) -> DrainResult:
    """Put ``load`` on the ready server ``process`` listens for on 127.0.0.1:``port``, send it
    ``load.signum`` mid-load, and return the ledger once the callers are done and the process
    has exited (or ``load.max_seconds`` are over). ``before_signal`` runs just before the
    signal (to start slow requests, say). The process is left as it is: stop it after.
    """
    run = _Run(process, port, load)
    watch = process.exit_watch()
    prober = threading.Thread(target=run.probe, name="drain-probe", daemon=True)
    callers = [
        threading.Thread(target=run.caller, args=(n,), name=f"drain-caller-{n}", daemon=True)
        for n in range(load.callers)
    ]
    for thread in [prober, *callers]:
        thread.start()
    run.stop_sending.wait(load.seconds)  # the load before the signal IS the scenario
    if before_signal is not None:
        before_signal()
    run.signal_at = time.monotonic()
    process.send_signal(load.signum)
    while not run.stop_sending.wait(min(0.05, run.left())):  # bounded by the deadline
        if watch.wait(0) is not None or run.left() == 0:
            break
    run.stop_sending.set()
    for thread in callers:
        thread.join(run.left() + load.request_timeout)
    watch.wait(run.left())
    run.done.set()
    prober.join(2 * load.probe_timeout + 1.0)
    with run.lock:
        exchanges = list(run.exchanges)
    return DrainResult(
        exchanges=exchanges,
        signal_at=run.signal_at,
        exit_code=process.popen.poll(),
        exited_at=watch.exited_at,
        ready_failed_at=run.ready_failed_at,
        ready_failed_with=run.ready_failed_with,
        ready_failures_before_signal=run.ready_failures_before,
        ready_ok_after_failure=run.ready_ok_after,
        live_ok_until=run.live_ok_until,
        live_failed_at=run.live_failed_at,
        live_failed_with=run.live_failed_with,
        output=process.output(),
    )


def drain_under_load(
    argv: Sequence[str],
    port: int,
    load: Load = Load(),
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    log: Path | None = None,
    ready_path: str = "/readyz",
    startup_timeout: float = 30.0,
) -> DrainResult:
    """Start ``argv`` (a server that will listen on 127.0.0.1:``port``) in its own process
    group, wait until ``GET ready_path`` answers 200, then :func:`sigterm_under_load`; the
    process group is ended on the way out, whatever happened."""
    with Process(argv, log, env=env, cwd=cwd) as process:
        wait_answering(port, ready_path, timeout=startup_timeout, process=process)
        return sigterm_under_load(process, port, load)

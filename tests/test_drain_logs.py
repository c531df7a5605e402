"""The drain in the log (issue 10, item 19): one line per step, through the server's logger.

Each phase change is one line with its reason; the end of the delay says how much is still in
flight and how long it is waited for; drained and stopping say how long after the drain
started. A process that only follows another's drain (a gunicorn worker) logs at DEBUG, so the
server's log shows each step once. Under a server, graceful's records go through the server's
own logger (its handlers, its format, its level) unless graceful's logger is handled already.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator

import pytest

from graceful import Config, Lifecycle
from graceful._runtime.shutdown import StopSequence, log_through
from graceful._servers.node_shm import SharedNode, SlotView, WorkerFollower
from graceful.pytest_plugin import FakeClock

TOKEN = "s3cret-Token-never-logged-either"


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "graceful" and r.levelno >= level]


def test_a_drain_is_logged_step_by_step(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="graceful")
    clock = FakeClock()
    lc = Lifecycle(Config(delay=2.0, drain_timeout=25.0, token=TOKEN), clock=clock)
    lc.mark_ready()
    token = lc.requests.begin("GET", "/slow", clock())
    lc.drain("SIGTERM")
    clock.advance(2.0)
    lc.tick()
    clock.advance(1.5)
    lc.requests.end(token)
    lc.stop("SIGTERM: drained")
    logged = lines(caplog)
    assert logged[1:] == [
        "phase serving -> draining (SIGTERM), 1 in flight; drain started: readiness fails, "
        "requests are served through the 2s delay",
        "delay over (2s): 1 in flight, waiting up to 25s for it",
        "phase draining -> drained (drained), 0 in flight; 3.5s after the drain started",
        "phase drained -> stopping (SIGTERM: drained), 0 in flight; 3.5s after the drain started",
    ], logged
    assert all(TOKEN not in line for line in logged)


def test_the_end_of_the_delay_with_nothing_in_flight_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="graceful")
    clock = FakeClock()
    lc = Lifecycle(Config(delay=1.0), clock=clock)
    lc.mark_ready()
    lc.drain("drained by control route")
    clock.advance(1.0)
    lc.tick()
    assert "delay over (1s): nothing in flight" in lines(caplog)


def test_a_stop_that_joins_a_drain_under_way_says_how_long_the_node_has_drained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="graceful")
    lc = Lifecycle(Config(delay=0.0, drain_timeout=5.0))
    lc.mark_ready()
    lc.drain("drained by control route")
    sequence = StopSequence(lc, lambda: None)
    name = sequence.signal(signal.SIGTERM)
    assert name is not None
    sequence.run(name)
    joined = [line for line in lines(caplog) if line.startswith("SIGTERM: ")]
    assert len(joined) == 1, lines(caplog)
    assert "already drained" in joined[0] and "drained by control route" in joined[0], joined


def test_a_worker_that_follows_the_masters_drain_logs_it_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="graceful")
    clock = FakeClock()
    shared = SharedNode(slots=2)
    master = Lifecycle(Config(delay=1.0), clock=clock)
    master.mark_ready()
    master.node = SlotView(shared, None)
    index = shared.claim()
    assert index is not None
    worker = Lifecycle(Config(delay=1.0), clock=clock)
    worker.mark_ready()
    view = SlotView(shared, index)
    worker.node = view
    follower = WorkerFollower(worker, view, lambda _lc: None)
    caplog.clear()
    master.drain("SIGTERM", final=True)
    follower.sync()
    clock.advance(1.0)
    master.tick()
    worker.tick()
    worker.stop("server shutting down")  # the worker's own exit, once gunicorn stops it
    info = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert [text.split(",")[0] for _level, text in info] == [
        "phase serving -> draining (SIGTERM)",
        "delay over (1s): nothing in flight",
        "phase draining -> drained (drained)",
    ], info
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(line.startswith("phase serving -> draining (SIGTERM)") for line in debug), debug
    assert any("-> stopping (server shutting down)" in line for line in debug), debug


# -- through the server's logger -------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def unhandled_graceful_logger() -> Iterator[logging.Logger]:
    """graceful's logger as a server finds it: no handler of its own, none above it (cut off
    from the root logger, where pytest captures; pytest also attaches its handlers to loggers
    that do not propagate, when the test starts, hence ``cut_off`` in the test itself)."""
    ours = logging.getLogger("graceful")
    saved = ours.handlers[:], ours.level, ours.propagate
    try:
        yield ours
    finally:
        ours.handlers[:], ours.level, ours.propagate = saved


def cut_off(ours: logging.Logger) -> None:
    ours.handlers.clear()
    ours.setLevel(logging.NOTSET)
    ours.propagate = False


def server_logger(name: str, level: int) -> tuple[logging.Logger, ListHandler]:
    server = logging.getLogger(name)
    server.setLevel(level)
    server.propagate = False
    handler = ListHandler()
    server.handlers[:] = [handler]
    return server, handler


def test_graceful_logs_through_the_servers_logger_at_its_level(
    unhandled_graceful_logger: logging.Logger,
) -> None:
    cut_off(unhandled_graceful_logger)
    _server, handler = server_logger("test.server.error", logging.INFO)
    log_through("test.server.error")
    log_through("test.server.error")  # once only
    assert len(unhandled_graceful_logger.handlers) == 1
    unhandled_graceful_logger.info("drain started")
    unhandled_graceful_logger.debug("not at info")
    assert [r.getMessage() for r in handler.records] == ["drain started"]
    assert handler.records[0].levelno == logging.INFO


def test_a_server_at_warning_keeps_graceful_info_lines_out(
    unhandled_graceful_logger: logging.Logger,
) -> None:
    cut_off(unhandled_graceful_logger)
    _server, handler = server_logger("test.quiet.error", logging.WARNING)
    log_through("test.quiet.error")
    unhandled_graceful_logger.info("drain started")
    unhandled_graceful_logger.warning("stuck")
    assert [r.getMessage() for r in handler.records] == ["stuck"]


def test_a_graceful_logger_configured_by_the_user_is_left_alone(
    unhandled_graceful_logger: logging.Logger,
) -> None:
    cut_off(unhandled_graceful_logger)
    own = ListHandler()
    unhandled_graceful_logger.addHandler(own)
    _server, handler = server_logger("test.other.error", logging.INFO)
    log_through("test.other.error")
    assert unhandled_graceful_logger.handlers == [own]
    unhandled_graceful_logger.warning("mine")
    assert handler.records == [] and len(own.records) == 1

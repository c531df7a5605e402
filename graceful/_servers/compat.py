"""Every private attribute of a server that graceful still touches, in one place.

Each entry names the server versions it was checked against and fails with a clear error
(naming the server, its version and what to do) when the installed version lacks it. Anything
a server offers publicly (an ASGI message, a documented hook or setting) is used directly by
its adapter instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import inspect
import re
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from .._core.errors import GracefulError

# -- uvicorn -----------------------------------------------------------------------------------

#: The uvicorn releases every accessor below was read against: the floor pinned in
#: tests/floors/constraints.txt, and the newest one tested (0.35, 0.40, 0.45, 0.50 and 0.51 in
#: between). Open-ended HTTP streams are ended through ASGI (the middleware's goodbye), not
#: through uvicorn's connections: nothing below touches a connection or its protocol (they
#: are only counted).
UVICORN_CHECKED = ("0.30.0", "0.55.0")

#: The oldest uvicorn that can drain. Before 0.29 uvicorn installs its signal handlers with
#: ``loop.add_signal_handler``, where there is no handler to find and take over (SIGTERM then
#: stops it at once); before 0.30 its supervisor (``--workers``) stops one worker after the
#: other, each after its whole drain, so the others stay ready.
UVICORN_FLOOR = (0, 30)


class UvicornVersionError(GracefulError, ImportError):
    """The installed uvicorn is older than :data:`UVICORN_FLOOR`."""


class UvicornInternalsError(GracefulError, RuntimeError):
    """The installed uvicorn lacks an internal that ``graceful.uvicorn`` relies on."""


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_uvicorn_version(version: str) -> None:
    """Refuse a uvicorn older than the floor, naming it and what to do."""
    if _release(version) < UVICORN_FLOOR:
        floor = ".".join(map(str, UVICORN_FLOOR))
        raise UvicornVersionError(
            f"graceful.uvicorn needs uvicorn >= {floor}, and {version} is installed: "
            "upgrade it with: pip install -U 'graceful-drain[uvicorn]'"
        )


def _uvicorn_lacks(what: str) -> UvicornInternalsError:
    import uvicorn

    first, last = UVICORN_CHECKED
    return UvicornInternalsError(
        f"graceful.uvicorn needs {what}, which uvicorn {uvicorn.__version__} does not have "
        f"(it was checked against uvicorn {first} to {last}): install a uvicorn in that range "
        f"(pip install 'uvicorn>={first},<={last}'), or a graceful-drain release that supports "
        f"uvicorn {uvicorn.__version__}"
    )


def _need(owner: Any, name: str, where: str) -> Any:
    try:
        return getattr(owner, name)
    except AttributeError:
        raise _uvicorn_lacks(f"{where}.{name}") from None


def server_of_handler(handler: Any, server_class: type[Any]) -> Any | None:
    """The ``uvicorn.Server`` whose ``handle_exit`` is ``handler`` (the SIGTERM handler it
    installs with ``signal.signal`` in ``Server.capture_signals``, 0.29 on), or None."""
    owner = getattr(handler, "__self__", None)
    if isinstance(owner, server_class) and getattr(handler, "__name__", "") == "handle_exit":
        return owner
    return None


def check_server(server: Any) -> None:
    """Fail at start-up, with what to do, rather than mid-drain: the ``Server`` attributes
    graceful sets (``should_exit``, ``force_exit``: read by its main loop and its shutdown)
    and its ``capture_signals`` (overridden by ``graceful.uvicorn.Server``) are there."""
    for name in ("should_exit", "force_exit", "capture_signals", "config"):
        _need(server, name, "Server")


def request_exit(server: Any) -> None:
    """Have the server shut down as usual (its main loop reads ``should_exit``)."""
    _need(server, "should_exit", "Server")
    server.should_exit = True


def force_exit(server: Any) -> None:
    """Have the server shut down without waiting for connections or tasks."""
    _need(server, "force_exit", "Server")
    server.force_exit = True
    server.should_exit = True


def forcing_exit(server: Any) -> bool:
    """Whether the server was told to shut down without waiting (``force_exit``)."""
    return bool(_need(server, "force_exit", "Server"))


def set_shutdown_timeout(config: Any, seconds: float | None) -> None:
    """How long the server's shutdown waits for connections (``timeout_graceful_shutdown``,
    a documented setting, read only when the shutdown starts, so it can change until then)."""
    _need(config, "timeout_graceful_shutdown", "Config")
    config.timeout_graceful_shutdown = seconds


def own_listeners(server: Any) -> list[Any]:
    """The listening sockets of a ``uvicorn.Server`` that this process alone holds: those of
    ``Server.servers`` (its asyncio servers, set by ``startup``) when uvicorn bound them
    itself. None when it was handed them (``--fd``, a supervisor's worker under
    ``--workers`` or ``--reload``, ``Server.serve(sockets=...)`` flagged by
    ``graceful.uvicorn.Server``): another process keeps those open, and a filter attached to
    one would outlive this server (see :mod:`graceful._servers.backlog`). A program that hands
    a plain ``uvicorn.Server`` sockets it keeps using after the stop is not told apart."""
    config = _need(server, "config", "Server")
    handed = getattr(server, "graceful_sockets_handed", False)
    if handed or config.fd is not None or config.workers > 1 or config.reload:
        return []
    return [sock for each in getattr(server, "servers", ()) for sock in each.sockets or ()]


def listening_sockets(server: Any) -> list[Any]:
    """The listening sockets of a ``uvicorn.Server``'s asyncio servers (``Server.servers``,
    set by ``startup``), however it got them."""
    return [sock for each in getattr(server, "servers", ()) for sock in each.sockets or ()]


def open_connections(server: Any) -> int:
    """How many connections the server has open (``Server.server_state.connections``, which
    each protocol joins when it is made and leaves when its connection is lost): counted,
    never touched."""
    state = _need(server, "server_state", "Server")
    return len(_need(state, "connections", "ServerState"))


def close_listeners(server: Any) -> None:
    """Stop the server's asyncio servers listening now (``asyncio.Server.close``; uvicorn's
    own shutdown closes them again, which does nothing, up to a tick of its main loop later)."""
    for each in getattr(server, "servers", ()):
        each.close()


@contextlib.contextmanager
def uvicorn_command_running(run: Callable[..., None]) -> Iterator[Any]:
    """uvicorn's command line (``uvicorn.main``, a click command), whose options end in a call
    of ``run`` instead of ``uvicorn.run``: the command calls the ``run`` of its own module
    (``uvicorn.main``, shadowed in the package by the command), which is swapped meanwhile."""
    import uvicorn

    module: Any = importlib.import_module("uvicorn.main")
    command = uvicorn.main
    if not callable(getattr(command, "main", None)) or not callable(getattr(module, "run", None)):
        raise _uvicorn_lacks("the click command uvicorn.main calling uvicorn.main.run")
    original = module.run
    module.run = run
    try:
        yield command
    finally:
        module.run = original


def new_supervisor(config: Any, sockets: list[Any]) -> Any:
    """uvicorn's ``Multiprocess`` supervisor (0.30 to 0.50 take the workers' entry point,
    0.51 on make each worker's server themselves)."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    supervisor: Any = Multiprocess  # typed after the installed uvicorn; both forms are used
    if "target" in inspect.signature(Multiprocess).parameters:
        return supervisor(config, target=uvicorn.Server(config).run, sockets=sockets)
    return supervisor(config, sockets=sockets)


def supervisor_parts(supervisor: Any) -> tuple[Any, Any] | None:
    """A supervisor's ``processes`` (its workers) and ``signal_queue`` (what its main loop
    acts on, 0.30 on), or None for a supervisor graceful does not know."""
    processes = getattr(supervisor, "processes", None)
    queue = getattr(supervisor, "signal_queue", None)
    if processes is None or queue is None:
        return None
    return processes, queue


def live_pid(worker: Any) -> int | None:
    """The pid of a supervisor's worker that has not exited: ``worker.process`` is its
    multiprocessing process in every checked version (``Process.exitcode`` from 0.50 on)."""
    process = _need(worker, "process", "supervisors.multiprocess.Process")
    pid: int | None = process.pid
    return pid if getattr(process, "exitcode", None) is None else None


# -- gunicorn ----------------------------------------------------------------------------------

#: The gunicorn releases every accessor below was read against: the floor pinned in
#: tests/floors/constraints.txt and the newest one tested.
GUNICORN_CHECKED = ("22.0.0", "27.0.1")

#: What graceful uses of gunicorn's ``Arbiter`` (the ``server`` its hooks get) beyond the
#: documented hooks and settings, and what for:
#:
#: - ``handle_term``, ``handle_int``, ``handle_quit``: the main loop looks each up on the
#:   instance as it handles SIGTERM, SIGINT, SIGQUIT, so the instance's can be replaced; the
#:   originals stop the master by raising ``StopIteration`` (there is no hook before a stop);
#: - ``signal(signum, frame)``: its signal handler, which queues a signal for the main loop and
#:   wakes it (22.0: a list and a pipe; 27.0: a ``SimpleQueue``), called from a thread;
#: - ``WORKERS`` (pid to worker), ``kill_workers(signum)``, ``reap_workers()``: to stop the
#:   workers and reap each the moment it exits;
#: - ``num_workers``: lowered for a worker retired during a drain, so it is not replaced;
#: - ``worker_class``: whether the workers are sync workers;
#: - ``LISTENERS``, ``reexec_pid``, ``master_pid``, ``systemd``: the listening sockets, and
#:   whether another process holds them too (what ``Arbiter.stop`` looks at before it
#:   unlinks a UNIX socket).
_ARBITER_ATTRIBUTES = (
    "handle_term",
    "handle_int",
    "handle_quit",
    "signal",
    "WORKERS",
    "kill_workers",
    "reap_workers",
    "num_workers",
    "worker_class",
    "LISTENERS",
    "reexec_pid",
    "master_pid",
    "systemd",
)


class GunicornInternalsError(GracefulError, RuntimeError):
    """The installed gunicorn lacks an internal that graceful's gunicorn hooks rely on."""


def gunicorn_version() -> str:
    try:
        return importlib.metadata.version("gunicorn")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _gunicorn_lacks(what: str) -> GunicornInternalsError:
    version = gunicorn_version()
    first, last = GUNICORN_CHECKED
    return GunicornInternalsError(
        f"graceful's gunicorn hooks need {what}, which gunicorn {version} does not have "
        f"(they were checked against gunicorn {first} to {last}): install a gunicorn in that "
        f"range (pip install 'gunicorn>={first},<={last}'), or a graceful-drain release that "
        f"supports gunicorn {version}"
    )


def check_arbiter(arbiter: Any) -> None:
    """Fail at start-up, with what to do, rather than mid-drain: every ``Arbiter`` attribute
    graceful uses is there."""
    for name in _ARBITER_ATTRIBUTES:
        if not hasattr(arbiter, name):
            raise _gunicorn_lacks(f"Arbiter.{name}")


def _arbiter(arbiter: Any, name: str) -> Any:
    try:
        return getattr(arbiter, name)
    except AttributeError:
        raise _gunicorn_lacks(f"Arbiter.{name}") from None


def take_over_stop_handlers(
    arbiter: Any, on_term: Callable[[], None], on_int: Callable[[], None]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Route the master's SIGTERM and SIGINT to ``on_term`` and ``on_int``; answer gunicorn's
    own graceful stop and quick stop (``handle_term``, ``handle_quit``: each raises
    ``StopIteration``, which the main loop turns into its halt)."""
    originals = _arbiter(arbiter, "handle_term"), _arbiter(arbiter, "handle_quit")
    _arbiter(arbiter, "handle_int")
    arbiter.handle_term = on_term
    arbiter.handle_int = on_int
    return originals


def queue_signal(arbiter: Any, signum: int) -> None:
    """Have the master's main loop handle ``signum`` (from any thread) as if it had arrived."""
    _arbiter(arbiter, "signal")(signum, None)


def worker_pids(arbiter: Any) -> list[int]:
    """The pids of the master's live workers."""
    return list(_arbiter(arbiter, "WORKERS"))


def signal_workers(arbiter: Any, signum: int) -> None:
    _arbiter(arbiter, "kill_workers")(signum)


def reap_workers(arbiter: Any) -> None:
    """Reap every worker that has exited (gunicorn calls ``child_exit`` for each)."""
    _arbiter(arbiter, "reap_workers")()


def forget_worker(arbiter: Any) -> None:
    """One worker fewer to keep alive: one that exits now is not replaced."""
    arbiter.num_workers = _arbiter(arbiter, "num_workers") - 1


def worker_class_names(arbiter: Any) -> set[str]:
    """The class names in the MRO of the master's worker class."""
    worker_class = _arbiter(arbiter, "worker_class")
    return {cls.__name__ for cls in getattr(worker_class, "__mro__", ())}


def listeners(arbiter: Any) -> list[Any]:
    """The master's listening sockets (gunicorn's wrappers: ``.fileno()`` gives the socket)."""
    return list(_arbiter(arbiter, "LISTENERS") or [])


def holds_listeners_alone(arbiter: Any) -> bool:
    """Whether no other process keeps this master's listening sockets: not after a USR2
    re-exec (``reexec_pid``: a new master was started; ``master_pid``: this is that new master
    and the old one lives), not under systemd socket activation (``systemd``), not with a
    socket handed down by a supervisor (``--bind fd://N``)."""
    binds = getattr(getattr(arbiter, "cfg", None), "bind", None) or []
    return (
        _arbiter(arbiter, "reexec_pid") == 0
        and _arbiter(arbiter, "master_pid") == 0
        and _arbiter(arbiter, "systemd") is False
        and not any(str(bind).startswith("fd://") for bind in binds)
    )


def successor_pid(arbiter: Any) -> int | None:
    """The new master a USR2 started from this one (``reexec_pid``), while it lives: it
    accepts on the same listening sockets. None without one."""
    pid = _arbiter(arbiter, "reexec_pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else pid


def pidfile_name(arbiter: Any) -> str | None:
    """The ``--pid`` file this master's configuration names (the base name: a master started
    by USR2 writes ``NAME.2`` until its parent exits)."""
    name = getattr(_arbiter(arbiter, "cfg"), "pidfile", None)
    return str(name) if name else None


def close_after_response(request: Any) -> None:
    """Have gunicorn close the connection after this request's response (a request's
    ``must_close``, which its ``should_close()`` reads)."""
    if not hasattr(request, "must_close"):
        raise _gunicorn_lacks("Request.must_close")
    request.must_close = True


def is_uvicorn_worker(worker: Any) -> bool:
    return any(cls.__name__ == "UvicornWorker" for cls in type(worker).__mro__)


def replace_uvicorn_worker_quit(worker: Any, handler: Callable[[int, Any], None]) -> None:
    """uvicorn-worker (0.2.0 to 0.4.0) routes a worker's SIGQUIT to gunicorn's
    ``Worker.handle_exit``, looked up when its event loop starts: replace it on the worker
    (in ``post_fork``, before the loop starts)."""
    if not hasattr(worker, "handle_exit"):
        raise _gunicorn_lacks("Worker.handle_exit")
    worker.handle_exit = handler


#: gunicorn's gthread worker before 24.0 (a ``ThreadWorker`` without ``set_accept_enabled``)
#: ends its loop at SIGTERM and closes every connection it holds but is not answering: ones
#: it accepted but has not read yet, and kept-alive ones a request may be arriving on. 24.0
#: stops accepting first and serves those. graceful gives the older worker that stop (see
#: :mod:`graceful._servers.gunicorn_gthread`) through these attributes, read against gunicorn
#: 22.0.0 and 23.0.0: ``poller`` (the loop's selector; a registered key's ``data`` is the
#: callback the loop calls with the key's file object), ``_lock`` (guards the poller),
#: ``sockets`` (the listeners), ``nr_conns`` (connections open), ``alive`` (the loop's flag).
_GTHREAD_ATTRIBUTES = ("poller", "_lock", "sockets", "nr_conns", "alive")


def gthread_stops_abruptly(worker: Any) -> bool:
    """Whether ``worker`` is a gthread worker of a gunicorn before 24.0."""
    thread_worker = any(cls.__name__ == "ThreadWorker" for cls in type(worker).__mro__)
    return thread_worker and not hasattr(worker, "set_accept_enabled")


def check_gthread_worker(worker: Any) -> None:
    for name in _GTHREAD_ATTRIBUTES:
        if not hasattr(worker, name):
            raise _gunicorn_lacks(f"ThreadWorker.{name}")


def gthread_add_waker(worker: Any) -> Callable[[], None]:
    """A call that wakes the worker's loop from its ``poller.select`` (up to 1 s otherwise):
    one end of a socket pair, registered in the poller, drained by the loop."""
    import selectors
    import socket

    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)

    def drain(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.recv(64)

    with worker._lock:
        worker.poller.register(reader, selectors.EVENT_READ, drain)

    def wake() -> None:
        with contextlib.suppress(OSError):  # a full pipe is already a wake-up
            writer.send(b"w")

    return wake


def gthread_stop_accepting(worker: Any) -> None:
    """Take the listeners out of the worker's loop; they stay open (the other workers, or the
    new master of an in-place restart, accept on them)."""
    with worker._lock:
        for sock in worker.sockets:
            with contextlib.suppress(KeyError, ValueError):
                worker.poller.unregister(sock)


def gthread_open_connections(worker: Any) -> int:
    return int(worker.nr_conns)


def gthread_end_loop(worker: Any) -> None:
    """What gunicorn's own SIGTERM handler does: the loop ends at its next turn."""
    worker.alive = False


# -- hypercorn ---------------------------------------------------------------------------------

#: The Hypercorn releases every accessor below was read against: the floor pinned in
#: tests/floors/constraints.txt and the newest one tested. What ``graceful.hypercorn`` uses
#: beyond ``hypercorn.config.Config``:
#:
#: - ``hypercorn.__main__``: ``main(args)`` parses Hypercorn's command line into a ``Config``
#:   and calls the module's ``run(config)``, which the runner swaps for its own;
#: - ``hypercorn.asyncio.run.worker_serve(app, config, sockets=, shutdown_trigger=)``: what the
#:   public ``hypercorn.asyncio.serve`` calls, taking the supervisor's sockets as well;
#: - ``hypercorn.utils.load_application(path, wsgi_max_body_size)``: the app, as a worker
#:   loads it (an ASGI or WSGI wrapper);
#: - ``hypercorn.protocol.h2.H2Protocol``, each HTTP/2 connection: ``__init__`` (to know them),
#:   ``stream_send`` given ``hypercorn.protocol.events.StreamClosed`` (a stream ended),
#:   ``_handle_events`` (the ``h2`` events of what arrived), ``_create_stream`` (a stream the
#:   app will run), ``idle``, ``closed``, ``connection`` (its ``h2.connection.H2Connection``)
#:   and ``send``, which writes raw bytes (``hypercorn.events.RawData``) under the
#:   connection's send lock.
HYPERCORN_CHECKED = ("0.17.0", "0.18.0")


class HypercornInternalsError(GracefulError, RuntimeError):
    """The installed Hypercorn lacks an internal that ``graceful.hypercorn`` relies on."""


def _hypercorn_lacks(what: str) -> HypercornInternalsError:
    return _lacking(HypercornInternalsError, "Hypercorn", "hypercorn", HYPERCORN_CHECKED, what)


_Lacking = TypeVar("_Lacking", bound=GracefulError)


def _lacking(
    error: type[_Lacking], name: str, package: str, checked: tuple[str, str], what: str
) -> _Lacking:
    """The error for an internal ``what`` of server ``name`` that its installed release lacks:
    the range graceful was checked against, and what to install."""
    version = importlib.metadata.version(package)
    first, last = checked
    return error(
        f"graceful needs {what}, which {name} {version} does not have (it was checked against "
        f"{name} {first} to {last}): install one in that range (pip install "
        f"'{package}>={first},<={last}'), or a graceful-drain release that supports {name} "
        f"{version}"
    )


def _hypercorn_part(module_name: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        raise _hypercorn_lacks(f"{module_name}.{name}") from None


@contextlib.contextmanager
def hypercorn_command_running(run: Callable[[Any], int]) -> Iterator[Callable[..., int]]:
    """Hypercorn's command line (``hypercorn.__main__.main``), ending in ``run(config)``."""
    module: Any = importlib.import_module("hypercorn.__main__")
    command = _hypercorn_part("hypercorn.__main__", "main")
    original = _hypercorn_part("hypercorn.__main__", "run")
    module.run = run
    try:
        yield command
    finally:
        module.run = original


def hypercorn_run(config: Any) -> int:
    """Hypercorn's own ``run(config)``: its supervisor and workers, as they are."""
    run: Callable[[Any], int] = _hypercorn_part("hypercorn.run", "run")
    return run(config)


def hypercorn_worker_serve(app: Any, config: Any, sockets: Any, trigger: Any) -> Any:
    """A worker's server, until ``trigger()`` returns (then Hypercorn's own stop)."""
    serve = _hypercorn_part("hypercorn.asyncio.run", "worker_serve")
    return serve(app, config, sockets=sockets, shutdown_trigger=trigger)


def hypercorn_load_app(config: Any) -> Any:
    load = _hypercorn_part("hypercorn.utils", "load_application")
    return load(config.application_path, config.wsgi_max_body_size)


#: Set on an HTTP/2 connection once graceful sent its GOAWAY: the last stream id it carried.
_GOAWAY_LAST_STREAM = "_graceful_goaway_last_stream"
#: On an HTTP/2 connection: the highest stream id Hypercorn started (gave to the app) so far.
_STARTED_STREAM = "_graceful_started_stream"
#: The first half of graceful's PING payload; the second half is the stream id it asks about.
_PING_MARK = b"gdrn"


def track_hypercorn_h2(
    connections: Any,
    after_stream_closed: Callable[[Any], Awaitable[None]],
    after_ping_ack: Callable[[Any, bytes], Awaitable[None]],
) -> None:
    """Add every HTTP/2 connection Hypercorn makes from now on to ``connections`` (a
    ``WeakSet``), await ``after_stream_closed(connection)`` each time one of its streams has
    closed (``H2Protocol.stream_send`` given a ``StreamClosed``) and ``after_ping_ack(connection,
    payload)`` when its client acknowledged a PING, note the highest stream id each starts
    (``H2Protocol._create_stream``) and ignore the streams opened above the last stream id of
    graceful's GOAWAY (``H2Protocol._handle_events``). Once per process."""
    import h2.events

    protocol = _hypercorn_part("hypercorn.protocol.h2", "H2Protocol")
    stream_closed = _hypercorn_part("hypercorn.protocol.events", "StreamClosed")
    if getattr(protocol, "_graceful_tracked", False):
        return
    original_init, original_stream_send = protocol.__init__, protocol.stream_send
    original_handle_events = getattr(protocol, "_handle_events", None)
    original_create_stream = getattr(protocol, "_create_stream", None)
    if original_handle_events is None:
        raise _hypercorn_lacks("hypercorn.protocol.h2.H2Protocol._handle_events")
    if original_create_stream is None:
        raise _hypercorn_lacks("hypercorn.protocol.h2.H2Protocol._create_stream")

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        connections.add(self)

    async def stream_send(self: Any, event: Any) -> None:
        await original_stream_send(self, event)
        if isinstance(event, stream_closed):
            await after_stream_closed(self)

    async def create_stream(self: Any, request: Any) -> None:
        started = max(getattr(self, _STARTED_STREAM, 0), request.stream_id)
        setattr(self, _STARTED_STREAM, started)
        await original_create_stream(self, request)

    async def handle_events(self: Any, events: list[Any]) -> None:
        if getattr(self, _GOAWAY_LAST_STREAM, None) is None and len(events) < 2:
            await original_handle_events(self, events)
        else:
            # One at a time: graceful's GOAWAY may go out while Hypercorn awaits on an
            # earlier event of the batch, and no stream above its last stream id may start.
            for event in events:
                last = getattr(self, _GOAWAY_LAST_STREAM, None)
                if last is None or not _ignored(self, event, last):
                    await original_handle_events(self, [event])
        for event in events:
            if isinstance(event, h2.events.PingAckReceived):
                await after_ping_ack(self, bytes(event.ping_data))

    protocol.__init__ = init
    protocol.stream_send = stream_send
    protocol._create_stream = create_stream
    protocol._handle_events = handle_events
    protocol._graceful_tracked = True


def _ignored(connection: Any, event: Any, last: int) -> bool:
    """RFC 9113, 6.8: after its GOAWAY a server ignores what comes on a stream above the last
    stream id (unprocessed: the client sends it again on another connection). No
    ``RST_STREAM`` either: a client on the ``h2`` library fails on any frame after a GOAWAY."""
    stream_id = getattr(event, "stream_id", None)
    if not stream_id or stream_id <= last:
        return False
    length = getattr(event, "flow_controlled_length", None)
    if length:  # the connection's flow-control window is given back all the same
        connection.connection.acknowledge_received_data(length, stream_id)
    return True


def hypercorn_h2_open(connection: Any) -> bool:
    """Whether an HTTP/2 connection is open and has had no GOAWAY."""
    import h2.connection

    if connection.closed or getattr(connection, _GOAWAY_LAST_STREAM, None) is not None:
        return False
    return connection.connection.state_machine.state is not h2.connection.ConnectionState.CLOSED


async def hypercorn_h2_goaway_if_idle(connection: Any) -> bool:
    """Begin the GOAWAY of an HTTP/2 connection that has no open stream: a PING naming the
    last stream id it started (``hypercorn_h2_goaway_after_ping`` sends the GOAWAY when the
    client acknowledges it). False when the connection is busy, closed, or has had its GOAWAY.

    Why not the GOAWAY at once: its client must have read every answer before it. httpcore
    fails each stream at or below a GOAWAY's last stream id whose task waits to read after
    the GOAWAY was read, even when the stream's whole answer came in the same read
    (``AsyncHTTP2Connection._receive_events`` looks at the GOAWAY first; httpcore 1.0.8 and
    1.0.9). A client acknowledges a PING once it has read all that came before it."""
    if not hypercorn_h2_open(connection) or not connection.idle:
        return False
    started: int = getattr(connection, _STARTED_STREAM, 0)
    connection.connection.ping(_PING_MARK + struct.pack("!L", started))
    raw_data = _hypercorn_part("hypercorn.events", "RawData")
    await connection.send(raw_data(data=connection.connection.data_to_send()))
    return True


async def hypercorn_h2_goaway_after_ping(connection: Any, payload: bytes) -> bool:
    """Send the GOAWAY that graceful's PING (``payload``, acknowledged) asked about, with its
    last stream id: a stream opened after it is ignored, unprocessed, and the client sends it
    again elsewhere; the connection stays open, and Hypercorn's own GOAWAY follows at its
    stop. False (nothing sent) for another PING, or when the connection has started a stream
    since (the next PING goes when it is idle again), is busy, closed or had its GOAWAY."""
    if len(payload) != 8 or payload[:4] != _PING_MARK:
        return False
    (last,) = struct.unpack("!L", payload[4:])
    if not hypercorn_h2_open(connection) or not connection.idle:
        return False
    if getattr(connection, _STARTED_STREAM, 0) != last:
        return False
    setattr(connection, _GOAWAY_LAST_STREAM, last)
    frame = struct.pack("!HBBBLLL", 0, 8, 0x7, 0, 0, last & 0x7FFFFFFF, 0)
    raw_data = _hypercorn_part("hypercorn.events", "RawData")
    await connection.send(raw_data(data=frame))
    return True


# -- granian -----------------------------------------------------------------------------------

#: The Granian releases the accessors below were read against: the floor pinned in
#: tests/floors/constraints.txt and the newest one tested. ``granian._signals``'
#: ``set_loop_signals(loop)`` (an ASGI or RSGI worker's SIGINT and SIGTERM handlers on its loop)
#: and ``set_sync_signals()`` (a WSGI worker's, with ``signal.signal``) each return the
#: worker's stop signal, whose ``set()`` stops its Rust server; a worker imports them from the
#: module when it starts (``granian.server.mp``, process workers), after loading the app (2.3
#: on: 2.0 to 2.2 import them first, so the app's graceful comes too late to wrap them); on
#: Linux a worker then builds a listening socket of its own (``SO_REUSEPORT``), which its Rust
#: server closes as it stops (``granian._granian.ListenerSpec``, read in 2.8.9). The
#: floor is 2.8.9: with 2.3 to 2.8.7 the end-to-end tests fail (a websocket's 1012 close frame
#: lost at the stop, an ended event stream kept in flight, and before 2.8 a WSGI request that
#: waits behind another).
GRANIAN_CHECKED = ("2.8.9", "2.8.9")


class GranianInternalsError(GracefulError, RuntimeError):
    """The installed Granian lacks an internal that graceful relies on under Granian."""


def wrap_granian_signal_installers(
    on_loop: Callable[[Any, Any], None], on_sync: Callable[[Any], None]
) -> None:
    """After Granian's own installer ran in a worker: ``on_loop(loop, stop_signal)`` (ASGI) or
    ``on_sync(stop_signal)`` (WSGI), in the worker's main thread. Once per process."""
    module: Any = importlib.import_module("granian._signals")
    if getattr(module, "_graceful_wrapped", False):
        return
    loop_installer = getattr(module, "set_loop_signals", None)
    sync_installer = getattr(module, "set_sync_signals", None)
    if loop_installer is None or sync_installer is None:
        what = "granian._signals.set_loop_signals and set_sync_signals"
        raise _lacking(GranianInternalsError, "Granian", "granian", GRANIAN_CHECKED, what)

    def set_loop_signals(loop: Any) -> Any:
        stop_signal = loop_installer(loop)
        on_loop(loop, stop_signal)
        return stop_signal

    def set_sync_signals() -> Any:
        stop_signal = sync_installer()
        on_sync(stop_signal)
        return stop_signal

    module.set_loop_signals = set_loop_signals
    module.set_sync_signals = set_sync_signals
    module._graceful_wrapped = True


# -- daphne (Twisted's asyncio reactor) --------------------------------------------------------

#: The Daphne and Twisted releases the accessors below were read against: the floors pinned in
#: tests/floors/constraints.txt and the newest tested. Public Twisted is used where it exists
#: (``reactor.callWhenRunning``, ``getReaders``, ``stop``, ``tcp.Port.stopListening``); beyond
#: it: ``AsyncioSelectorReactor._asyncioEventloop`` (the reactor's asyncio loop, which Daphne
#: itself reads), ``tcp.Port._shouldShutdown`` (False for a listener adopted from a file
#: descriptor), the reactor's ``sigTerm`` method as its installed SIGTERM handler, and a
#: websocket's ASGI ``send``, ``functools.partial(server.handle_reply, protocol)``, whose
#: autobahn protocol has ``sendCloseFrame(code, reasonUtf8, isReply)``.
DAPHNE_CHECKED = ("4.1.2", "4.2.3")
TWISTED_CHECKED = ("23.10.0", "26.10.0")


class DaphneInternalsError(GracefulError, RuntimeError):
    """The installed Twisted lacks an internal that graceful relies on under Daphne."""


def daphne_reactor() -> Any | None:
    """The reactor Daphne runs on, in a Daphne process (``daphne.server`` imported), else
    None. Importing ``daphne.server`` installs Twisted's asyncio reactor."""
    if "daphne.server" not in sys.modules:
        return None
    reactor = sys.modules.get("twisted.internet.reactor")
    asyncioreactor = sys.modules.get("twisted.internet.asyncioreactor")
    if reactor is None or asyncioreactor is None:
        return None
    return reactor if isinstance(reactor, asyncioreactor.AsyncioSelectorReactor) else None


def is_reactor_handler(handler: Any, reactor: Any) -> bool:
    """Whether ``handler`` (SIGTERM's) is the one the reactor installed as it started."""
    return getattr(handler, "__self__", None) is reactor and (
        getattr(handler, "__name__", None) == "sigTerm"
    )


def reactor_loop(reactor: Any) -> Any:
    loop = getattr(reactor, "_asyncioEventloop", None)
    if loop is None:
        raise _lacking(
            DaphneInternalsError, "Twisted", "twisted", TWISTED_CHECKED, "reactor._asyncioEventloop"
        )
    return loop


def reactor_listeners(reactor: Any) -> tuple[list[Any], list[Any]]:
    """The reactor's listening ports: those it bound itself, and those adopted from a file
    descriptor (which other processes may hold)."""
    from twisted.internet import tcp

    ports = [reader for reader in reactor.getReaders() if isinstance(reader, tcp.Port)]
    adopted = [port for port in ports if getattr(port, "_shouldShutdown", True) is False]
    return [port for port in ports if port not in adopted], adopted


def daphne_websocket(send: Any) -> Any | None:
    """The autobahn protocol behind a websocket's ASGI ``send`` under Daphne, or None."""
    if not isinstance(send, functools.partial) or not send.args:
        return None
    if getattr(send.func, "__name__", None) != "handle_reply":
        return None
    protocol = send.args[0]
    return protocol if callable(getattr(protocol, "sendCloseFrame", None)) else None

"""``graceful demo --via grpc``: the nodes are gRPC servers, the callers one gRPC channel.

A node (``python -m graceful._tools.demo_grpc PORT [--plain]``) serves ``demo.Items`` over raw
bytes (no generated code): ``Get`` and ``Create``, each a few milliseconds of work
(:data:`graceful._tools.demo_app.WORK`). With the library it runs ``graceful.grpc.serve`` and
its interceptor (SIGTERM drains); ``--plain``: ``server.start(); server.wait_for_termination()``
(SIGTERM kills it, as a plain grpcio server does).

The naive round calls the nodes through a plain channel with gRPC's own round robin; the
graceful round through :func:`graceful.grpc.channel` (round robin, health checking, retries
only where safe). Needs ``pip install 'graceful-drain[grpc]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

SERVICE = "demo.Items"
#: The naive round's channel: gRPC's round robin, nothing else.
PLAIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
CALL_TIMEOUT = 10.0


def argv(python: str, port: int, graceful: bool) -> list[str]:
    """The command of one node."""
    command = [python, "-m", "graceful._tools.demo_grpc", str(port)]
    return command if graceful else [*command, "--plain"]


def _handlers() -> Any:
    import grpc

    from .demo_app import WORK

    def get(request: bytes, context: Any) -> bytes:
        time.sleep(WORK)  # the call's work
        return b"item %s %d" % (request, os.getpid())

    def create(request: bytes, context: Any) -> bytes:
        time.sleep(WORK)
        return b"created " + request

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Get": grpc.unary_unary_rpc_method_handler(get),
            "Create": grpc.unary_unary_rpc_method_handler(create),
        },
    )


def serve(port: int, plain: bool) -> None:
    import grpc

    from .._servers.grpc import Interceptor
    from .._servers.grpc import serve as serve_draining

    interceptors = [] if plain else [Interceptor()]
    server = grpc.server(futures.ThreadPoolExecutor(16), interceptors=interceptors)
    server.add_generic_rpc_handlers([_handlers()])
    server.add_insecure_port(f"127.0.0.1:{port}")
    if plain:
        server.start()
        server.wait_for_termination()
    else:
        serve_draining(server)


def ready(port: int) -> bool:
    """Whether the node at ``port`` answers a call."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        get: Any = channel.unary_unary(f"/{SERVICE}/Get")
        try:
            answer: bytes = get(b"ready", timeout=2.0)
            return answer.startswith(b"item ready ")
        except grpc.RpcError:
            return False


class Answer:
    """What the demo's load reads of an answer (as of an HTTP response)."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code

    def close(self) -> None:
        return None


class Seen:
    """The processes whose ``Get`` answered, as the load's calls go."""

    def __init__(self) -> None:
        self._pids: set[int] = set()
        self._lock = threading.Lock()

    def add(self, answer: bytes) -> None:
        pid = answer.rpartition(b" ")[2]
        if pid.isdigit():
            with self._lock:
                self._pids.add(int(pid))

    def __contains__(self, pid: object) -> bool:
        with self._lock:
            return pid in self._pids


def caller(
    ports: Sequence[int], graceful: bool
) -> tuple[Callable[[str, str, dict[str, Any]], Answer], Callable[[], None], Seen]:
    """The load's call (``GET`` is ``Get``, ``POST`` is ``Create``) over one channel to every
    node, what closes the channel, and the processes the calls reached (a restarted node is
    back in the channel's rotation once its new process answered one)."""
    import grpc

    from .._client.grpc import channel as draining_channel

    nodes = [f"127.0.0.1:{port}" for port in ports]
    if graceful:
        channel = draining_channel(nodes, idempotent_methods=[f"/{SERVICE}/Get"])
    else:
        options = [("grpc.service_config", PLAIN_CONFIG), ("grpc.enable_http_proxy", 0)]
        channel = grpc.insecure_channel("ipv4:" + ",".join(nodes), options=options)
    get: Any = channel.unary_unary(f"/{SERVICE}/Get")
    create: Any = channel.unary_unary(f"/{SERVICE}/Create")
    seen = Seen()

    def call(method: str, path: str, kwargs: dict[str, Any]) -> Answer:
        if method == "POST":
            create(str(kwargs["data"]["id"]).encode(), timeout=CALL_TIMEOUT)
            return Answer(201)
        seen.add(get(path.encode(), timeout=CALL_TIMEOUT))
        return Answer(200)

    return call, channel.close, seen


def failure_kind(exc: BaseException) -> str | None:
    """A failed call's kind (``gRPC UNAVAILABLE``...); None for another exception."""
    code = getattr(exc, "code", None)
    if type(exc).__module__.startswith("grpc") and callable(code):
        return f"gRPC {code().name}"
    return None


def main(args: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m graceful._tools.demo_grpc")
    parser.add_argument("port", type=int)
    parser.add_argument("--plain", action="store_true", help="without the library")
    options = parser.parse_args(args)
    serve(options.port, options.plain)


if __name__ == "__main__":
    main()

"""A gRPC server keeping a ledger of every ``Create`` it ran, for ``test_grpc_e2e.py``::

    python grpc_ledger_server.py PORT sync|aio [--plain] [--control-port N]

Generic handlers over raw bytes (no protobuf, no generated code), service ``ledger.Orders``:

- ``Create`` (unary, not idempotent): appends the request (an order id) as one line to
  ``$LEDGER_DIR/<pid>.ran`` first (the ledger is what the server ran), works a little, answers
  ``created <id>``;
- ``List`` (server streaming): :data:`CHUNKS` messages, a short pause before each;
- ``Ping`` (unary): ``pong``, nothing written.

``sync`` serves with ``grpc.server``, ``aio`` with ``grpc.aio.server``. With graceful (the
default) through ``graceful.grpc.serve`` / ``serve_async`` and its interceptor; ``--plain``:
``server.start(); server.wait_for_termination()`` and nothing else (SIGTERM kills it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio

import graceful.grpc
from graceful.testing import append_line

SERVICE = "ledger.Orders"
CHUNKS = 8
PAUSE = 0.02  # seconds of "work" in each handler step: RPCs are in flight when a signal comes


def ledger(order: bytes) -> None:
    append_line(os.path.join(os.environ["LEDGER_DIR"], f"{os.getpid()}.ran"), order.decode())


def create(request: bytes, context: Any) -> bytes:
    ledger(request)
    time.sleep(PAUSE)
    return b"created " + request


def listing(request: bytes, context: Any) -> Iterator[bytes]:
    for index in range(CHUNKS):
        time.sleep(PAUSE)
        yield b"%d" % index


async def create_async(request: bytes, context: Any) -> bytes:
    ledger(request)
    await asyncio.sleep(PAUSE)
    return b"created " + request


async def listing_async(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for index in range(CHUNKS):
        await asyncio.sleep(PAUSE)
        yield b"%d" % index


def ping(request: bytes, context: Any) -> bytes:
    return b"pong"


def handlers(aio: bool) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Create": grpc.unary_unary_rpc_method_handler(create_async if aio else create),
            "List": grpc.unary_stream_rpc_method_handler(listing_async if aio else listing),
            "Ping": grpc.unary_unary_rpc_method_handler(ping),
        },
    )


def serve_sync(port: int, plain: bool, control_port: int | None) -> None:
    interceptors: list[Any] = [] if plain else [graceful.grpc.Interceptor()]
    server = grpc.server(futures.ThreadPoolExecutor(32), interceptors=interceptors)
    server.add_generic_rpc_handlers([handlers(aio=False)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    if plain:
        server.start()
        server.wait_for_termination()
    else:
        graceful.grpc.serve(server, control_port=control_port, control_host="127.0.0.1")


async def serve_aio(port: int, plain: bool, control_port: int | None) -> None:
    interceptors: list[Any] = [] if plain else [graceful.grpc.AsyncInterceptor()]
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers([handlers(aio=True)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    if plain:
        await server.start()
        await server.wait_for_termination()
    else:
        await graceful.grpc.serve_async(server, control_port=control_port, control_host="127.0.0.1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("mode", choices=["sync", "aio"])
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--control-port", type=int)
    args = parser.parse_args()
    if args.mode == "sync":
        serve_sync(args.port, args.plain, args.control_port)
    else:
        asyncio.run(serve_aio(args.port, args.plain, args.control_port))


if __name__ == "__main__":
    main()

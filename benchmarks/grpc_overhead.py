"""Per-call cost of ``graceful.grpc.channel`` against a plain gRPC channel, in one run; and of
``graceful.grpc.Interceptor`` on the server against none.

Two local servers, each in its own process on 127.0.0.1: a sync ``grpc.server`` answering one
unary method over raw bytes (a generic handler, no protobuf) with ``pong``. The graceful one has
``graceful.grpc.Interceptor()`` and is served by ``graceful.grpc.serve`` (so the standard
health service runs, and clients ``Watch`` it); the plain one has no interceptor and is served
by ``server.start(); server.wait_for_termination()``. Three ways to call, each keeping its
connection throughout: a plain ``grpc.insecure_channel`` to the graceful server,
``graceful.grpc.channel([node])`` to it (round robin, client-side health checking, retries on),
and a plain channel to the plain server. Each round makes N calls each way, interleaved call
by call (the order turns each call, so a noisy neighbour hits all ways alike), and takes each
way's median time per call. The figure is graceful channel over plain channel (same server),
median of the per-round ratios; goal <= 1.05. The interceptor's figure, plain channel to the
graceful server over plain channel to the plain server, is given beside it (no goal).

    python benchmarks/grpc_overhead.py [--requests N] [--rounds R]

``--serve PORT`` / ``--serve-plain PORT`` run a server itself (the benchmark starts them).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

import graceful.grpc
from graceful.testing import Process, child_env, free_port, wait_listening

GOAL = 1.05
METHOD = "/bench.Echo/Ping"
#: Both servers' processes: no drain delay, so stopping them at the end takes no time.
SERVER_ENV = {"GRACEFUL_DELAY": "0"}
#: Every channel, plain or not: never through a proxy of the environment (127.0.0.1 only).
NO_PROXY = [("grpc.enable_http_proxy", 0)]
RATIOS = {
    "channel": ("plain channel", "graceful channel"),
    "interceptor": ("plain server", "plain channel"),
}


# -- the servers -------------------------------------------------------------------------------


def ping(request: bytes, context: Any) -> bytes:
    return b"pong"


def serve(port: int, plain: bool) -> None:
    interceptors: list[Any] = [] if plain else [graceful.grpc.Interceptor()]
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=interceptors)
    service, _, name = METHOD.strip("/").partition("/")
    handler = grpc.unary_unary_rpc_method_handler(ping)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {name: handler})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    if plain:
        server.start()
        server.wait_for_termination()
    else:
        graceful.grpc.serve(server, control_host="127.0.0.1")


@contextlib.contextmanager
def server(plain: bool) -> Iterator[str]:
    """A server process; its ``127.0.0.1:port`` once it answers a call."""
    port = free_port()
    flag = "--serve-plain" if plain else "--serve"
    argv = [sys.executable, __file__, flag, str(port)]
    with Process(argv, env=child_env(SERVER_ENV)) as proc:
        # a refused connection would put a channel in gRPC's reconnect backoff (1 s): wait for
        # the port first, then for one call to be answered
        wait_listening("127.0.0.1", port, 15, process=proc)
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address, options=NO_PROXY) as probe:
            answer = probe.unary_unary(METHOD)(b"ping", timeout=15, wait_for_ready=True)
            if answer != b"pong":
                raise RuntimeError(f"{address}: unexpected answer {answer!r}")
        yield address


# -- the ways to call them ---------------------------------------------------------------------


def time_round(calls: dict[str, Callable[[bytes], Any]], n: int) -> dict[str, float]:
    """N calls each way, interleaved call by call (a noisy neighbour hits all ways alike); each
    way's median time per call."""
    times: dict[str, list[float]] = {key: [] for key in calls}
    ways = list(calls.items())
    clock = time.perf_counter
    for i in range(n):
        for key, call in ways[i % len(ways) :] + ways[: i % len(ways)]:
            started = clock()
            answer = call(b"ping")
            times[key].append(clock() - started)
            if answer != b"pong":
                raise RuntimeError(f"{key}: unexpected answer {answer!r}")
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-plain", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve or args.serve_plain:
        serve(args.serve or args.serve_plain, plain=not args.serve)
        return 0

    with server(plain=False) as node, server(plain=True) as bare, contextlib.ExitStack() as stack:
        channels = {
            "plain channel": grpc.insecure_channel(node, options=NO_PROXY),
            "graceful channel": graceful.grpc.channel([node], options=NO_PROXY),
            "plain server": grpc.insecure_channel(bare, options=NO_PROXY),
        }
        for channel in channels.values():
            stack.enter_context(channel)
        calls = {key: channel.unary_unary(METHOD) for key, channel in channels.items()}
        for call in calls.values():  # each channel connected (the graceful one: node healthy)
            call(b"ping", timeout=15, wait_for_ready=True)
        time_round(calls, max(1, args.requests // 10))  # warm-up
        samples: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(args.rounds):
            for key, value in time_round(calls, args.requests).items():
                samples[key].append(value)

    medians = {key: statistics.median(values) * 1e6 for key, values in samples.items()}
    print(
        f"per call: plain channel {medians['plain channel']:.1f} us, graceful channel "
        f"{medians['graceful channel']:.1f} us (added "
        f"{medians['graceful channel'] - medians['plain channel']:.1f} us); plain server "
        f"{medians['plain server']:.1f} us, with Interceptor {medians['plain channel']:.1f} us "
        f"(added {medians['plain channel'] - medians['plain server']:.1f} us)"
    )
    ratios = {
        what: statistics.median(p / b for p, b in zip(samples[pooled], samples[base], strict=True))
        for what, (base, pooled) in RATIOS.items()
    }
    verdict = "met" if ratios["channel"] <= GOAL else "NOT met"
    print(
        f"grpc channel vs plain channel per call: {ratios['channel']:.3f}x (goal <= {GOAL}x: "
        f"{verdict}); server Interceptor vs none: {ratios['interceptor']:.3f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

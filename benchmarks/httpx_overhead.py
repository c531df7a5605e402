"""Per-request cost of ``graceful.httpx``'s transports against plain httpx clients, in one run.

One local node: the one ``client_pool_overhead.py`` starts (a threaded ``http.server`` in its
own process on 127.0.0.1, answering ``GET /ping`` with 200 over keep-alive connections, holding
``/-/graceful/events`` open after a first ``serving`` notice, as a graceful node does). Four
ways to call it, each keeping its connection throughout: a plain ``httpx.AsyncClient`` with the
node as its base URL, an ``httpx.AsyncClient`` over ``AsyncPoolTransport([node])`` (base URL
``http://svc``: the host only names the service), and the sync twins (``httpx.Client``, and
``httpx.Client`` over ``PoolTransport([node])``). Both transports watch the node (their events
stream open, waited for before timing). Each round makes N GETs each way, interleaved call by
call in one event loop (the order turns each call, so a noisy neighbour hits all ways alike),
and takes each way's median time per call. The figures are the ratios of the per-call times,
transport over plain client (async and sync apart), median over rounds; goal <= 1.05.

    python benchmarks/httpx_overhead.py [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import httpx
from client_pool_overhead import node  # benchmarks/ is on the path: this script's folder

from graceful.httpx import AsyncPoolTransport, PoolTransport
from graceful.testing import poll_until_async

GOAL = 1.05
SERVICE = "http://svc"
#: Each way: a call made from the event loop (a sync one is called, an async one awaited).
Way = Callable[[], "httpx.Response | Awaitable[httpx.Response]"]
PAIRS = {"async": ("async plain", "async transport"), "sync": ("sync plain", "sync transport")}


async def time_round(calls: dict[str, Way], n: int) -> dict[str, float]:
    """N calls each way, interleaved call by call (a noisy neighbour hits all ways alike); each
    way's median time per call."""
    times: dict[str, list[float]] = {key: [] for key in calls}
    ways = list(calls.items())
    clock = time.perf_counter
    for i in range(n):
        for key, call in ways[i % len(ways) :] + ways[: i % len(ways)]:
            started = clock()
            answer = call()
            response = answer if isinstance(answer, httpx.Response) else await answer
            times[key].append(clock() - started)
            if response.status_code != 200:
                raise RuntimeError(f"{key}: unexpected answer {response.status_code}")
    return {key: statistics.median(values) for key, values in times.items()}


def streaming(*transports: PoolTransport | AsyncPoolTransport) -> bool:
    """Every transport's watcher reads its node's events stream."""
    return all(w.mode == "streaming" for t in transports for w in t._watches.values())


async def measure(url: str, requests: int, rounds: int) -> dict[str, list[float]]:
    """Each way's median time per call, one per round."""
    async_transport = AsyncPoolTransport([url])
    sync_transport = PoolTransport([url])
    async with (
        httpx.AsyncClient(base_url=url) as async_plain,
        httpx.AsyncClient(transport=async_transport, base_url=SERVICE) as async_pooled,
    ):
        with (
            httpx.Client(base_url=url) as sync_plain,
            httpx.Client(transport=sync_transport, base_url=SERVICE) as sync_pooled,
        ):
            calls: dict[str, Way] = {
                "async plain": lambda: async_plain.get("/ping"),
                "async transport": lambda: async_pooled.get("/ping"),
                "sync plain": lambda: sync_plain.get("/ping"),
                "sync transport": lambda: sync_pooled.get("/ping"),
            }
            await time_round(calls, max(1, requests // 10))  # warm-up: connections made
            await poll_until_async(
                lambda: streaming(async_transport, sync_transport),
                10,
                message="both transports' events streams to open",
            )
            samples: dict[str, list[float]] = {key: [] for key in calls}
            for _ in range(rounds):
                for key, value in (await time_round(calls, requests)).items():
                    samples[key].append(value)
            transports = (async_transport, sync_transport)
            bad = [n for t in transports for n in t.nodes if n.state.value != "in service"]
            if bad or not streaming(*transports):
                raise RuntimeError(f"the node left rotation or a stream ended: {bad}")
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args(argv)

    with node() as url:
        samples = asyncio.run(measure(url, args.requests, args.rounds))

    medians = {key: statistics.median(values) * 1e6 for key, values in samples.items()}
    ratios: dict[str, float] = {}
    for kind, (plain, pooled) in PAIRS.items():
        per_round = [p / b for p, b in zip(samples[pooled], samples[plain], strict=True)]
        ratios[kind] = statistics.median(per_round)
        print(
            f"per request ({kind}): plain {medians[plain]:.1f} us, transport "
            f"{medians[pooled]:.1f} us (added {medians[pooled] - medians[plain]:.1f} us)"
        )
    verdict = "met" if max(ratios.values()) <= GOAL else "NOT met"
    print(
        f"httpx transport vs plain client per request: AsyncPoolTransport {ratios['async']:.3f}x, "
        f"PoolTransport {ratios['sync']:.3f}x (goal <= {GOAL}x: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

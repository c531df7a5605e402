"""Every benchmark still runs to its figure: each script in ``benchmarks/`` with its smallest
options (a smoke run: the figures themselves mean nothing here; the real ones are recorded in
``benchmarks/README.md``), exit status 0, its figure line printed last.

The benchmarks run through ``benchmarks/run_all.py``'s own runner, as the full suite does, each
in its own process group (killed when it overruns its timeout).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import run_all  # noqa: E402 - benchmarks/ is not a package

pytestmark = pytest.mark.e2e  # most of them start servers on 127.0.0.1

#: Per benchmark: its smallest options, how its figure line begins, and a timeout (seconds).
SMOKE: dict[str, tuple[tuple[str, ...], str, float]] = {
    "middleware_overhead": (
        ("--requests", "200", "--rounds", "1"),
        "added cost vs the floor: ",
        60,
    ),
    "throughput": (
        ("--rounds", "1", "--seconds", "0.1", "--connections", "1", "--idle-seconds", "1"),
        "throughput with graceful vs plain ",
        60,
    ),
    "shutdown_overhead": (("--rounds", "1", "--slow", "0.2"), "shutdown overhead with shims: ", 60),
    "rollout_failures": (
        ("--warm-up", "1", "--calls-between", "10", "--parts", "pool"),
        "failed requests during a rolling restart: ",
        150,
    ),
    "scale": (("--inflight", "10", "--counts", "10", "--rounds", "1"), "scale: ", 60),
    "client_pool_overhead": (
        ("--requests", "50", "--rounds", "1"),
        "Pool vs requests.Session per request: ",
        60,
    ),
    "httpx_overhead": (
        ("--requests", "20", "--rounds", "1"),
        "httpx transport vs plain client per request: ",
        60,
    ),
    "grpc_overhead": (
        ("--requests", "20", "--rounds", "1"),
        "grpc channel vs plain channel per call: ",
        60,
    ),
    "reload_restart": (
        ("--restarts", "1", "--callers", "2", "--steady", "0.5", "--between", "0"),
        "in-place restart (gunicorn gthread, ",
        90,
    ),
}


def test_every_benchmark_has_a_smoke_run() -> None:
    assert set(run_all.discover()) == set(SMOKE)


@pytest.mark.parametrize("name", list(SMOKE))
def test_the_benchmark_runs_with_its_smallest_options_and_prints_its_figure_last(
    name: str,
) -> None:
    options, figure_start, timeout = SMOKE[name]
    outcome = run_all.run(name, quick=False, timeout=timeout, options=options)
    assert outcome.returncode == 0, outcome.output
    assert outcome.figure.startswith(figure_start), outcome.output
    assert "(goal " in outcome.figure, outcome.figure


def test_throughput_floors_measure_the_floor_and_the_pass_through_under_each_server() -> None:
    options = ("--rounds", "1", "--seconds", "0.1", "--connections", "1", "--idle-seconds", "0")
    outcome = run_all.run("throughput", quick=False, timeout=90, options=(*options, "--floors"))
    assert outcome.returncode == 0, outcome.output
    assert outcome.figure.startswith("throughput with graceful vs plain "), outcome.output
    floors = "the floor and the pass-through under the same servers (req/s; CPU per request): "
    assert floors + "uvicorn floor " in outcome.output, outcome.output
    for label in ("uvicorn pass", "gunicorn-gthread floor", "gunicorn-gthread pass"):
        assert f"{label} " in outcome.output.split(floors, 1)[1], outcome.output

"""graceful's Prometheus metrics scraped from a real two-worker gunicorn match the node's state.

The app (``tests/e2e/apps/prometheus_app.py``) serves the metrics at ``/metrics``; each scrape
lands on whichever worker accepts it, and must report the node's figures all the same.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
SLOW = 5.0  # seconds each held request lasts: long enough to scrape both workers meanwhile
TOKEN = "prometheus-e2e-token-0123"
SERVED = "graceful_requests_while_draining_total"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> tuple[str, Samples]:
    """(pid of the worker that answered, every sample by name and sorted labels)."""
    response = requests.get(url + "/metrics", timeout=5)  # a fresh connection each time
    response.raise_for_status()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return response.headers["X-Worker-Pid"], samples


def inflight(samples: Samples) -> float:
    return samples[("graceful_inflight", ())]


def by_worker(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["pid"]: value
        for (name, labels), value in samples.items()
        if name == "graceful_inflight_by_worker"
    }


def phase(samples: Samples) -> str:
    (current,) = [
        dict(labels)["phase"]
        for (name, labels), value in samples.items()
        if name == "graceful_phase" and value == 1
    ]
    return current


def start_gunicorn(
    spawn: Spawn, tmp_path: Path, port: int, wait_until: WaitUntil, **env: str
) -> Proc:
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:graceful.gunicorn"]
    argv += ["--bind", f"127.0.0.1:{port}", "--workers", "2", "-k", "gthread", "--threads", "4"]
    argv += ["--chdir", str(APPS), "prometheus_app:app"]
    env = {
        "GRACEFUL_DELAY": "1",
        "GRACEFUL_DRAIN_TIMEOUT": "10",
        "LOAD_RECORD_DIR": str(tmp_path),
        **env,
    }
    proc = spawn(argv, env=env, name="gunicorn-prometheus")
    url = f"http://127.0.0.1:{port}"
    wait_until(
        lambda: len({scrape(url)[0] for _ in range(12)}) == 2,
        timeout=30,
        message=lambda: f"both workers answering /metrics:\n{proc.output()}",
    )
    return proc


def test_every_worker_reports_the_node_inflight_total_and_the_drain(
    spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil
) -> None:
    url = f"http://127.0.0.1:{free_port}"
    proc = start_gunicorn(spawn, tmp_path, free_port, wait_until)
    assert inflight(scrape(url)[1]) == 0

    statuses: list[int] = []
    held = [
        threading.Thread(
            target=lambda: statuses.append(
                requests.get(f"{url}/slow?seconds={SLOW:g}", timeout=SLOW + 10).status_code
            ),
            daemon=True,
        )
        for _ in range(3)
    ]
    for thread in held:
        thread.start()
    wait_until(lambda: inflight(scrape(url)[1]) == 3, timeout=1.5, message="3 in flight")

    # Scrape until each worker has answered at least twice: every answer says 3.
    answered: dict[str, list[Samples]] = {}

    def both_workers_answered_twice() -> bool:
        pid, samples = scrape(url)
        answered.setdefault(pid, []).append(samples)
        return len(answered) == 2 and all(len(seen) >= 2 for seen in answered.values())

    wait_until(both_workers_answered_twice, timeout=2.0, message=lambda: f"{answered}")
    for pid, seen in answered.items():
        for samples in seen:
            assert inflight(samples) == 3, (pid, samples)
            workers = by_worker(samples)
            assert set(workers) == set(answered) and sum(workers.values()) == 3, (pid, workers)
            assert phase(samples) == "serving"

    for thread in held:
        thread.join(SLOW + 15)
    assert statuses == [200, 200, 200]
    wait_until(lambda: inflight(scrape(url)[1]) == 0, timeout=5, message="nothing in flight")

    proc.send_signal(signal.SIGTERM)
    drained: set[str] = set()

    def both_workers_report_the_drain() -> bool:
        pid, samples = scrape(url)
        draining = phase(samples) in ("draining", "drained")  # drained: the delay is over
        if draining and samples[("graceful_drains_total", ())] == 1:
            drained.add(pid)
        return len(drained) == 2

    # The delay (1 s) keeps the workers serving: both must report it before it ends.
    wait_until(both_workers_report_the_drain, timeout=0.9, message="the drain on both workers")
    assert proc.wait(15) == 0


def until_both_workers_report(
    url: str, wait_until: WaitUntil, wanted: Callable[[Samples], bool], what: str
) -> set[str]:
    """Scrape until two workers have each answered ``wanted`` (their last answer); their pids."""
    last: dict[str, Samples] = {}

    def both() -> bool:
        pid, samples = scrape(url)
        last[pid] = samples
        return len([p for p, seen in last.items() if wanted(seen)]) >= 2

    wait_until(both, timeout=10, message=lambda: f"{what} on both workers: {last}")
    return {pid for pid, seen in last.items() if wanted(seen)}


def test_requests_served_while_draining_are_counted_node_wide_and_kept_when_a_worker_exits(
    spawn: Spawn, tmp_path: Path, free_port: int, wait_until: WaitUntil
) -> None:
    url = f"http://127.0.0.1:{free_port}"
    start_gunicorn(spawn, tmp_path, free_port, wait_until, GRACEFUL_TOKEN=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # A drain without SIGTERM (no deadline): one worker takes the request, both follow.
    assert requests.post(f"{url}/-/graceful/drain", headers=auth, timeout=5).status_code == 200
    until_both_workers_report(
        url, wait_until, lambda s: phase(s) in ("draining", "drained"), "the drain"
    )

    def serve(count: int) -> Counter[int]:
        """``count`` requests on fresh connections: how many each worker served."""
        pids = [requests.get(f"{url}/version", timeout=5).json()["pid"] for _ in range(count)]
        return Counter(pids)

    served = serve(6)
    until_both_workers_report(url, wait_until, lambda s: s[(SERVED, ())] == 6, "6 served")

    # The worker that served the most is killed; the master clears its slot and forks another.
    killed, share = served.most_common(1)[0]
    assert share > 0
    os.kill(killed, signal.SIGKILL)
    until_both_workers_report(
        url, wait_until, lambda s: str(killed) not in by_worker(s), "a replaced worker"
    )
    # Every answer, the survivor's and the newcomer's: the killed worker's share is kept.
    answers: dict[str, list[float]] = {}

    def each_worker_answered_twice() -> bool:
        pid, samples = scrape(url)
        answers.setdefault(pid, []).append(samples[(SERVED, ())])
        return len(answers) == 2 and all(len(seen) >= 2 for seen in answers.values())

    wait_until(each_worker_answered_twice, timeout=10, message=lambda: f"{answers}")
    assert str(killed) not in answers
    assert {pid: set(seen) for pid, seen in answers.items()} == {pid: {6} for pid in answers}

    serve(2)  # the newcomer follows the drain, and counts from there
    until_both_workers_report(url, wait_until, lambda s: s[(SERVED, ())] == 8, "8 served")

"""Watch a node drain: SIGTERM under load, naive against graceful, on 127.0.0.1.

    python examples/drain_demo.py

For each mode it starts examples/plain/app.py on a free port, keeps 8 callers busy (plus two
2-second requests), lets a load-balancer-like poller watch /readyz every 100 ms and stop new
traffic once it fails, sends SIGTERM, and counts what failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

APP = Path(__file__).with_name("plain") / "app.py"
CALLERS = 8
MAX_REQUESTS = 20_000
MAX_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)  # polling interval, not synchronisation
    raise RuntimeError(f"{url} did not turn ready within {timeout}s")


def run(mode: str) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "GRACEFUL_DELAY": "1", "GRACEFUL_DRAIN_TIMEOUT": "10"}
    if mode == "naive":
        env["PLAIN_NAIVE"] = "1"
    node = subprocess.Popen(
        [sys.executable, str(APP), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    counts = {"sent": 0, "failed": 0}
    lock = threading.Lock()
    in_rotation = threading.Event()
    in_rotation.set()
    stop = threading.Event()
    try:
        wait_ready(url, 15)
        started = time.monotonic()

        def call(path: str) -> None:
            try:
                ok = requests.get(url + path, timeout=15).status_code == 200
            except requests.RequestException:
                ok = False
            with lock:
                counts["sent"] += 1
                counts["failed"] += not ok

        def caller() -> None:
            session_deadline = started + MAX_SECONDS
            while not stop.is_set() and time.monotonic() < session_deadline:
                if in_rotation.is_set() and counts["sent"] < MAX_REQUESTS:
                    call("/")
                else:
                    stop.wait(0.05)

        def balancer() -> None:  # polls like a load balancer's health check
            while not stop.is_set():
                try:
                    ready = requests.get(url + "/readyz", timeout=1).status_code == 200
                except requests.RequestException:
                    ready = False
                if not ready:
                    in_rotation.clear()
                stop.wait(0.1)

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        threads += [threading.Thread(target=call, args=("/slow?s=2",)) for _ in range(2)]
        threads.append(threading.Thread(target=balancer))
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # let load build up before the signal: part of the scenario
        sigterm_at = time.monotonic()
        node.send_signal(signal.SIGTERM)
        exit_code = node.wait(timeout=30)
        exited_after = time.monotonic() - sigterm_at
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
        return {"mode": mode, **counts, "exit": exit_code, "exit_after": exited_after}
    finally:
        stop.set()
        if node.poll() is None:
            node.kill()
            node.wait()


def main() -> int:
    rows = [run("naive"), run("graceful")]
    print(f"{'mode':<10}{'sent':>8}{'failed':>8}{'exit code':>11}{'exit after':>12}")
    for row in rows:
        print(
            f"{row['mode']:<10}{row['sent']:>8}{row['failed']:>8}{row['exit']:>11}"
            f"{row['exit_after']:>11.2f}s"
        )
    graceful_failed = rows[1]["failed"]
    naive_failed = rows[0]["failed"]
    print(f"graceful drain lost {graceful_failed} requests; a naive SIGTERM lost {naive_failed}")
    return 0 if graceful_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

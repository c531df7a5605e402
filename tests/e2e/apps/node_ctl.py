"""Start and restart the nodes of a rollout test, the way a deploy script would.

The rollout harness (``tests/e2e/rollout_harness.py``) describes each node in
``STATE/node<INDEX>.json``::

    {"argv": [...], "env": {...}, "cwd": "...", "port": 8001, "pidfile": "...", "log": "...",
     "version": "v1"}

and this script runs them::

    python node_ctl.py --state STATE start INDEX     # start version "v1"
    python node_ctl.py --state STATE restart INDEX   # SIGTERM, wait for the exit, start "v2"

``restart`` sends SIGTERM to the pid in the node's pidfile, waits (bounded by ``--stop-timeout``)
until that process has exited, then starts the command again with ``APP_VERSION`` set to the next
version (``v1`` -> ``v2``), detached (its own session, output appended to the node's log file),
writes ``PID START_TIME`` to the pidfile and exits 0 at once: whoever called it waits for readiness
itself. It does the same whatever the node runs (with or without the library); SIGTERM is all
a plain restart does.

Every process started is also appended to ``STATE/pids`` as ``PID START_TIME`` (the start time
from ``/proc/PID/stat``), so that a test's teardown can kill every node it ever started, and
only those (a recycled pid has another start time): see :func:`kill_recorded`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: How often the exit of a process that is not our child is looked at without a pidfd.
POLL = 0.02


def load(state: Path, index: int) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((state / f"node{index}.json").read_text())
    return spec


def save(state: Path, index: int, spec: dict[str, Any]) -> None:
    path = state / f"node{index}.json"
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(spec, indent=2))
    os.replace(temp, path)


def start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/PID/stat`` (clock ticks since boot), None when there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def running(pid: int, started: str | None = None) -> bool:
    """Alive and not a zombie (and, if ``started`` is given, the same process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] not in ("Z", "X") and (started is None or fields[19] == started)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` (not necessarily our child) has exited; False when ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while running(pid):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], min(left, 0.5))  # readable once it exited
            else:
                time.sleep(min(left, POLL))  # the poll interval, bounded by the deadline
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def next_version(version: str) -> str:
    return f"v{int(version.lstrip('v')) + 1}"


def launch(state: Path, index: int, spec: dict[str, Any]) -> int:
    """Start the node's command detached, record its pid; the pid."""
    env = dict(os.environ)
    env.update(spec.get("env", {}))
    env["APP_VERSION"] = spec["version"]
    with open(spec["log"], "ab") as log:
        log.write(f"--- node{index} {spec['version']}: {spec['argv']}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            spec["argv"],
            cwd=spec.get("cwd"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # detached: outlives this script, its own process group
        )
    record = f"{proc.pid} {start_time(proc.pid)}\n"
    with open(state / "pids", "a") as pids:
        pids.write(record)
    Path(spec["pidfile"]).write_text(record)
    return proc.pid


def current_pid(spec: dict[str, Any]) -> int | None:
    """The pid in the node's pidfile (``PID START_TIME``), if that process still runs."""
    try:
        pid_text, started = Path(spec["pidfile"]).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if running(pid, started) else None


def start(state: Path, index: int) -> int:
    spec = load(state, index)
    pid = launch(state, index, spec)
    print(f"node{index}: started {spec['version']} as pid {pid}", flush=True)
    return 0


def restart(state: Path, index: int, stop_timeout: float) -> int:
    spec = load(state, index)
    old = current_pid(spec)
    if old is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGTERM)
        if not wait_gone(old, stop_timeout):
            print(f"node{index}: pid {old} still running {stop_timeout:g}s after SIGTERM")
            return 1
    spec["version"] = next_version(spec["version"])
    save(state, index, spec)
    pid = launch(state, index, spec)
    print(f"node{index}: pid {old} stopped, started {spec['version']} as pid {pid}", flush=True)
    return 0


def kill_recorded(state: Path, signum: int = signal.SIGKILL) -> list[int]:
    """Signal the process group of every process recorded in ``STATE/pids``; the pids signalled.

    A group is signalled when its leader still runs (same start time), and also when the leader
    is gone (its children may not be: a SIGKILLed gunicorn master leaves its workers): no new
    process can lead a group of that id while the id is unused. Skipped only when the pid now
    belongs to another process (another start time).
    """
    try:
        lines = (state / "pids").read_text().splitlines()
    except FileNotFoundError:
        return []
    hit = []
    for line in lines:
        pid_text, _, started = line.partition(" ")
        pid = int(pid_text)
        now = start_time(pid)
        if now is not None and started and now != started:
            continue  # a recycled pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)  # the node and its children (gunicorn's workers)
            hit.append(pid)
    return hit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--state", type=Path, required=True, help="the harness's state dir")
    parser.add_argument("--stop-timeout", type=float, default=60.0)
    parser.add_argument("verb", choices=["start", "restart"])
    parser.add_argument("index", type=int)
    args = parser.parse_args(argv)
    if args.verb == "start":
        return start(args.state, args.index)
    return restart(args.state, args.index, args.stop_timeout)


if __name__ == "__main__":
    sys.exit(main())

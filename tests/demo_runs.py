"""Running ``graceful demo`` as a subprocess in a test, and finding every process it started.

Each run is marked with a variable of its own in its environment (the nodes inherit it) and a
``TMPDIR`` of its own (nginx's command line names its folder there: nginx writes its process
title over its environment), so :meth:`Marked.pids` finds every process of the run through
``/proc``. The ``marked`` fixture (``conftest.py``) kills whatever is left at teardown, also
when the test failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import child_env

if TYPE_CHECKING:
    from conftest import WaitUntil

__all__ = ["MARK", "Marked", "bounded", "demo_argv", "run_demo"]

#: The mark's variable. The demo scrubs GRACEFUL_* from its nodes' environment: not one of those.
MARK = "DEMO_TEST_MARK"


@dataclasses.dataclass(frozen=True)
class Marked:
    """One demo run's mark and its ``TMPDIR``."""

    mark: str
    folder: Path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The run's environment: the test's, marked, ``extra`` added."""
        return child_env({MARK: self.mark, "TMPDIR": str(self.folder), **(extra or {})})

    def pids(self, groups: Collection[int] = ()) -> set[int]:
        """Live processes of the run: their environment carries the mark, their command line
        names the run's folder (nginx's master), or they are in the process group of one of
        those or in ``groups`` (nginx's workers). Zombies are not counted: they are gone."""
        needle = f"{MARK}={self.mark}".encode()
        folder = str(self.folder).encode()
        found: set[int] = set()
        group_of: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                state, _parent, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if state == "Z":
                    continue
                pid = int(entry.name)
                group_of[pid] = int(group)
                environ = (entry / "environ").read_bytes().split(b"\0")
                if needle in environ or folder in (entry / "cmdline").read_bytes():
                    found.add(pid)
        wanted = {group_of[pid] for pid in found} | set(groups)
        return found | {pid for pid, group in group_of.items() if group in wanted}

    def groups(self) -> set[int]:
        """The process groups of the run's live processes."""
        groups: set[int] = set()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(pid))
        return groups

    def kill_all(self) -> None:
        """SIGKILL to every live process of the run (each by its pid)."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def none_left(self, wait_until: WaitUntil, timeout: float = 10.0) -> None:
        """Wait until no process of the run is alive; fail naming those left."""
        wait_until(
            lambda: not self.pids(),
            timeout=timeout,
            message=lambda: f"processes of the demo left: {self.pids()}",
        )


def demo_argv(*options: str) -> list[str]:
    """``graceful demo OPTIONS`` as a user runs it, with this Python."""
    return [sys.executable, "-m", "graceful", "demo", *options]


def bounded(
    argv: Sequence[str], timeout: float, env: Mapping[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``argv`` in a session of its own, bounded by ``timeout``; its process group killed
    afterwards (on a timeout or an interruption, and whatever it left in its group)."""
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        cwd=cwd,
        env=dict(env),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group of the process this test started
        if proc.returncode is None:
            proc.wait(10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_demo(
    marked: Marked,
    *options: str,
    timeout: float = 120.0,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``graceful demo OPTIONS``, marked, from ``cwd``, ``env`` added, bounded by ``timeout``."""
    return bounded(demo_argv(*options), timeout, marked.env(env), cwd)

"""Child processes that never outlive a test: each in its own session (its own process group),
its output in a file, ended by its own pid and group, also when the test fails."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from ._errors import ProcessExited, WaitTimeout

__all__ = ["ExitWatch", "Process", "Processes", "child_env"]

#: Settings of the test run's own environment that must not leak into a child's.
_SCRUBBED_PREFIXES = ("GRACEFUL_",)
_SCRUBBED = frozenset({"KUBERNETES_SERVICE_HOST"})


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without ``GRACEFUL_*`` settings, unbuffered, no proxy for 127.0.0.1,
    plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SCRUBBED and not key.startswith(_SCRUBBED_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


class ExitWatch:
    """The moment a process exits, to the millisecond: a thread waits on its pidfd (it polls
    every 2 ms where there is none). It does not reap the process."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.exited_at: float | None = None
        self._exited = threading.Event()
        self._closing = threading.Event()
        self._fd: int | None = None
        if popen.returncode is not None:  # already reaped: as close as we can tell
            self._seen()
            return
        with contextlib.suppress(AttributeError, OSError):  # no pidfd: not Linux, or too old
            self._fd = os.pidfd_open(popen.pid)
        self._thread = threading.Thread(target=self._watch, name="exit-watch", daemon=True)
        self._thread.start()

    def _seen(self) -> None:
        self.exited_at = time.monotonic()
        self._exited.set()

    def _watch(self) -> None:
        while not self._closing.is_set():
            if self._fd is not None:
                if select.select([self._fd], [], [], 0.2)[0]:
                    self._seen()
                    return
            elif self._popen.poll() is not None:
                self._seen()
                return
            else:
                self._closing.wait(0.002)  # the fallback poll interval, bounded by close()

    def wait(self, timeout: float) -> float | None:
        """When the process exited (``time.monotonic()``); None if it runs on past ``timeout``."""
        self._exited.wait(max(0.0, timeout))
        return self.exited_at

    def close(self) -> None:
        self._closing.set()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(1.0)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _EndsOnExit:
    """Leaving the ``with`` block calls ``end()``, whatever happened inside."""

    def end(self) -> None:
        raise NotImplementedError

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.end()


class Process(_EndsOnExit):
    """A child process in its own session, its stdout and stderr in one file.

    ``log`` is a path (kept after the process), or None for a temporary file; ``env`` is the
    whole environment (None: this one; :func:`child_env` makes a clean one). As a context
    manager, it is stopped on the way out, whatever happened inside::

        with Process([sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)]) as proc:
            wait_answering(port, "/readyz", process=proc)
    """

    def __init__(
        self,
        argv: Sequence[str],
        log: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log
        # closed in stop(); a temporary file is read back with pread until then
        self._log: IO[bytes] = log.open("wb") if log is not None else tempfile.TemporaryFile()  # noqa: SIM115
        self._final: str | None = None
        self._watch: ExitWatch | None = None
        self.popen = subprocess.Popen(  # noqa: S603 - the caller's own command
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,  # its own process group: stop() ends its children too
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def output(self) -> str:
        """Everything it wrote so far (stdout and stderr)."""
        if self._final is not None:
            return self._final
        if self.log_path is not None:
            return self.log_path.read_text(errors="replace")
        fd = self._log.fileno()
        # pread: the child shares the file's offset, which a seek would move under it
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        return data.decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_running(self) -> None:
        """Raise :class:`ProcessExited` (with the output) if the process has exited."""
        if self.popen.poll() is not None:
            raise ProcessExited(
                f"{self.argv[:4]} exited with {self.popen.returncode}; output:\n"
                + self.output()[-3000:]
            )

    def send_signal(self, signum: int) -> None:
        """Signal the process itself (a server's master), not its group."""
        self.popen.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """Signal its whole process group (workers too); nothing when it is gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit status; :class:`WaitTimeout` (with the output) when still running."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(
                f"{self.argv[:4]} still running after {timeout:g}s; output:\n{self.output()}"
            ) from None

    def exit_watch(self) -> ExitWatch:
        """An :class:`ExitWatch` on this process (one, made on first use)."""
        if self._watch is None:
            self._watch = ExitWatch(self.popen)
        return self._watch

    def stop(self, grace: float = 3.0) -> int | None:
        """SIGTERM the process group, SIGKILL whatever is left after ``grace`` seconds (at once
        with ``grace=0``), reap it; its exit status."""
        try:
            if grace > 0 and self.alive():
                self.signal_group(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(grace)
            self.signal_group(signal.SIGKILL)  # children that outlived their parent, too
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(max(grace, 5.0))
        finally:
            if self._watch is not None:
                self._watch.close()
            if self._final is None and self.log_path is None:
                self._final = self.output()
            self._log.close()
        return self.popen.returncode

    def __enter__(self) -> Process:
        return self

    def end(self) -> None:
        self.stop()


class Processes(_EndsOnExit):
    """Several :class:`Process` started by one test, all stopped by :meth:`stop_all` (or on
    leaving the ``with`` block); logs in ``folder`` as ``<name>-<n>.log`` (temporary without)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.started: list[Process] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str = "proc",
    ) -> Process:
        log = None if self.folder is None else self.log_for(name)
        return self.adopt(Process(argv, log, env=env, cwd=cwd))

    def log_for(self, name: str) -> Path:
        """Where the next process called ``name`` logs (inside ``folder``)."""
        if self.folder is None:
            raise ValueError("Processes(folder=None) keeps no log files: give it a folder")
        return self.folder / f"{name}-{len(self.started)}.log"

    def adopt(self, process: Process) -> Process:
        """Stop ``process`` with the others."""
        self.started.append(process)
        return process

    def stop_all(self, grace: float = 3.0) -> None:
        for process in self.started:
            process.stop(grace)

    def __iter__(self) -> Iterator[Process]:
        return iter(list(self.started))

    def __enter__(self) -> Processes:
        return self

    def end(self) -> None:
        self.stop_all()

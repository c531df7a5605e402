"""Pid files a node writes for ``graceful reload``: ``NAME`` (the running master), ``NAME.2``
(a successor started by USR2 while its parent lives: gunicorn's names) and ``NAME.ready`` (the
pid of the last master whose workers all serve). Each is replaced whole (a temporary file in
the same directory, then a rename): a reader sees the old content or the new, never a part.
"""

from __future__ import annotations

import contextlib
import logging
import os

from .._runtime.files import replace_whole

__all__ = ["read_pid", "remove_if_mine", "write_pid"]

logger = logging.getLogger("graceful")


def write_pid(path: str, pid: int) -> bool:
    """Replace ``path`` by ``pid``; False (logged) when it cannot be written."""
    try:
        replace_whole(path, f"{pid}\n".encode())
    except OSError as exc:
        logger.error("graceful: could not write the pid file %s: %s", path, exc)
        return False
    return True


def remove_if_mine(path: str, pid: int) -> None:
    """Remove ``path`` if it still holds ``pid`` (a successor may have written its own)."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as handle:
            if int(handle.read().strip() or 0) != pid:
                return
        os.unlink(path)


def read_pid(path: str) -> int | None:
    """The pid ``path`` holds, or None (no such file, or not a plain positive pid)."""
    try:
        with open(path) as handle:
            text = handle.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 2**22 else None

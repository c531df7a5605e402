"""Files replaced whole: a reader sees the old content or the new, never a part.

Used for pid files (``graceful reload``), nginx's upstream file and ``graceful demo --report``'s
page.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["replace_whole"]


def replace_whole(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int | None = None,
    owner: tuple[int, int] | None = None,
    durable: bool = False,
) -> None:
    """Replace ``path`` by ``data``: a temporary file in the same folder, then a rename.

    The temporary file is created exclusively (never through a link, mkstemp's mode 0600
    unless ``mode``; ``owner``: its uid and gid), and the rename replaces whatever is at
    ``path`` (a symbolic link included) without following it. ``durable``: the file and then
    its folder are synced. ``OSError`` as raised, no temporary file left behind."""
    directory, name = os.path.split(os.fspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory or ".", prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if durable:
        with contextlib.suppress(OSError):  # the rename is done; make it durable where possible
            folder = os.open(directory or ".", os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

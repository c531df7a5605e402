"""Take a server out of an nginx upstream and put it back, safely (open-source nginx).

nginx cannot poll a readiness route, so a node leaves rotation by a ``down`` on its ``server``
line and a reload. :class:`UpstreamController` edits one upstream in a file of its own (the
file your ``http {}`` block includes) and only touches its ``server`` lines::

    ctl = UpstreamController("/etc/nginx/app-upstream.conf", "app", conf="/etc/nginx/nginx.conf")
    ctl.down("10.0.0.5:8000")   # or "http://10.0.0.5:8000"
    ctl.up("10.0.0.5:8000")
    ctl.status()                # [Server(address='10.0.0.5:8000', params=(...), ...), ...]

Every edit, under an exclusive ``flock`` on ``FILE.lock`` (removed when the edit ends): read and
parse the file (a regular file of at most :data:`MAX_FILE_BYTES`, parsed by a small, strict
parser that refuses anything it does not understand), refuse to take the last server that is
up out unless ``force``, ask ``nginx -T`` whether the file is part of nginx's configuration
(and where the master's pid file is), check that the pid names the nginx master of that
configuration (its process title and executable), save the current content to ``FILE.prev``,
write the new content atomically (a temporary file in the same directory, fsync,
``os.replace``; none of these files is ever opened through a symbolic link), run ``nginx -t``,
send the master SIGHUP (what ``nginx -s reload`` does, but to the process just checked), then
wait until the master has started new worker processes and every old one is gone or shutting
down: the new upstream is then what new connections get. Errors say what is wrong and what to
do; whatever fails, the file is byte for byte what it was before the edit (after a failure once
the reload was sent, nginx is asked to reload the restored file too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from .._core.errors import GracefulError
from .._runtime.files import replace_whole

__all__ = [
    "MAX_FILE_BYTES",
    "Change",
    "LastServerError",
    "LockTimeoutError",
    "NginxError",
    "NotIncludedError",
    "ReloadError",
    "ReloadTimeoutError",
    "Server",
    "ServerMark",
    "UnknownServerError",
    "UnknownUpstreamError",
    "Upstream",
    "UpstreamController",
    "UpstreamFileError",
    "ValidationError",
    "parse_upstreams",
    "set_down",
]

#: Parameters of a ``server`` line the parser accepts: flags, and ``key=value`` keys.
SERVER_FLAGS = frozenset({"backup", "down", "resolve", "drain"})
SERVER_KEYS = frozenset(
    {"weight", "max_conns", "max_fails", "fail_timeout", "slow_start", "route", "service"}
)
#: Directives besides ``server`` allowed inside the upstream block (kept as they are).
UPSTREAM_DIRECTIVES = frozenset(
    {
        "hash",
        "ip_hash",
        "keepalive",
        "keepalive_requests",
        "keepalive_time",
        "keepalive_timeout",
        "least_conn",
        "ntlm",
        "random",
        "zone",
    }
)

POLL_INTERVAL = 0.02
#: A server line is ``down`` (it carries the ``down`` flag) or ``up``.
ServerMark = Literal["up", "down"]
#: The largest upstream file (or pid file) the controller reads: far more than any upstream
#: needs, and a bound on what a wrong path (``/dev/zero``, a huge log) can cost.
MAX_FILE_BYTES = 1 << 20
#: How nginx titles its master process (``ps``, ``/proc/PID/cmdline``).
MASTER_TITLE = "nginx: master process"


class NginxError(GracefulError):
    """Something went wrong managing the upstream; the message says what and what to do."""


class UpstreamFileError(NginxError, ValueError):
    """The upstream file cannot be read, or holds something the parser does not understand."""


class NotIncludedError(UpstreamFileError):
    """``nginx -T`` does not list the file: an edit there would change nothing nginx serves."""


class LastServerError(NginxError, ValueError):
    """The edit would leave the upstream with no server up; pass ``force=True`` to make it."""


class UnknownUpstreamError(NginxError, ValueError):
    """The file has no upstream of that name."""


class UnknownServerError(NginxError, ValueError):
    """The upstream has no server with that address."""


class ValidationError(NginxError):
    """``nginx -t`` rejected the edited configuration; the file was restored."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


class ReloadError(NginxError):
    """nginx could not be run or reloaded (no master running, ``-s reload`` failed)."""


class ReloadTimeoutError(NginxError, TimeoutError):
    """The reload was sent but nginx did not replace its workers within the timeout."""


class LockTimeoutError(NginxError, TimeoutError):
    """Another edit held the lock for longer than the timeout."""


# --- the parser ----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"(?P<space>\s+)|(?P<comment>\#[^\n]*)|(?P<punct>[{};])|(?P<word>[^\s{};#\"'\\]+)"
)


@dataclasses.dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int
    line: int


@dataclasses.dataclass(frozen=True)
class Server:
    """One ``server`` line of an upstream."""

    address: str
    params: tuple[str, ...]
    line: int
    _insert_at: int = dataclasses.field(repr=False, compare=False, default=0)
    _down_span: tuple[int, int] | None = dataclasses.field(repr=False, compare=False, default=None)

    @property
    def down(self) -> bool:
        return "down" in self.params

    @property
    def state(self) -> ServerMark:
        return "down" if self.down else "up"


@dataclasses.dataclass(frozen=True)
class Upstream:
    name: str
    servers: tuple[Server, ...]
    line: int

    def server(self, name: str, source: str = "the file") -> Server:
        address = server_address(name)
        for server in self.servers:
            if server.address == address:
                return server
        known = ", ".join(s.address for s in self.servers) or "none"
        raise UnknownServerError(
            f"upstream {self.name!r} in {source} has no server {address!r} (servers: {known}); "
            "give the address exactly as on its server line"
        )


def server_address(name: str) -> str:
    """``http://10.0.0.5:8000/`` -> ``10.0.0.5:8000``; anything else as it is."""
    if "://" in name:
        return urllib.parse.urlsplit(name).netloc
    return name.strip()


def _tokens(text: str, source: str) -> Iterator[_Token]:
    pos, line = 0, 1
    previous: _Token | None = None
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise UpstreamFileError(
                f"{source}:{line}: unsupported character {text[pos]!r} (quotes and escapes are "
                "not allowed in a managed upstream file)"
            )
        kind = match.lastgroup or ""
        token = _Token(kind, match.group(), pos, match.end(), line)
        if kind == "comment" and previous is not None and previous.kind == "word":
            raise UpstreamFileError(f"{source}:{line}: '#' inside a word; put a space before it")
        line += token.text.count("\n")
        pos = match.end()
        previous = token
        if kind not in ("space", "comment"):
            yield token


def _statements(text: str, source: str) -> Iterator[tuple[list[_Token], _Token]]:
    """Each statement: its words and the token that ends it (``;``, ``{`` or ``}``)."""
    words: list[_Token] = []
    for token in _tokens(text, source):
        if token.kind == "word":
            words.append(token)
        else:
            yield words, token
            words = []
    if words:
        raise UpstreamFileError(
            f"{source}:{words[0].line}: {words[0].text!r} is not ended by ';' before the end of "
            "the file"
        )


def _parse_server(words: list[_Token], end: _Token, source: str) -> Server:
    where = f"{source}:{words[0].line}"
    if len(words) < 2:
        raise UpstreamFileError(f"{where}: a server line needs an address")
    address, params = words[1], words[2:]
    if "=" in address.text or address.text in SERVER_FLAGS:
        raise UpstreamFileError(f"{where}: {address.text!r} is not a server address")
    down_span: tuple[int, int] | None = None
    seen: set[str] = set()
    for index, param in enumerate(params, start=2):
        key, has_value, value = param.text.partition("=")
        if has_value:
            if key not in SERVER_KEYS or not value:
                raise UpstreamFileError(
                    f"{where}: unknown server parameter {param.text!r} "
                    f"(known: {', '.join(sorted(SERVER_KEYS))}=...)"
                )
        elif key not in SERVER_FLAGS:
            raise UpstreamFileError(
                f"{where}: unknown server parameter {param.text!r} "
                f"(known flags: {', '.join(sorted(SERVER_FLAGS))})"
            )
        if key in seen:
            raise UpstreamFileError(f"{where}: server parameter {key!r} given twice")
        seen.add(key)
        if param.text == "down":
            before = words[index - 1]
            down_span = (before.end, param.end)
    return Server(
        address=address.text,
        params=tuple(p.text for p in params),
        line=words[0].line,
        _insert_at=words[-1].end,
        _down_span=down_span,
    )


def parse_upstreams(text: str, source: str = "<text>") -> dict[str, Upstream]:
    """Every ``upstream NAME { ... }`` block of ``text``; raises :class:`UpstreamFileError`.

    Only upstream blocks and comments may appear at the top level; inside a block only
    ``server`` lines and the simple directives in :data:`UPSTREAM_DIRECTIVES`.
    """
    upstreams: dict[str, Upstream] = {}
    current: tuple[str, int] | None = None
    servers: list[Server] = []
    for words, end in _statements(text, source):
        line = words[0].line if words else end.line
        where = f"{source}:{line}"
        if current is None:
            if end.text == "{" and len(words) == 2 and words[0].text == "upstream":
                name = words[1].text
                if name in upstreams:
                    raise UpstreamFileError(f"{where}: upstream {name!r} is defined twice")
                current, servers = (name, line), []
                continue
            found = " ".join(w.text for w in words) + end.text
            raise UpstreamFileError(
                f"{where}: expected 'upstream NAME {{', found {found!r}; a managed upstream "
                "file holds upstream blocks only"
            )
        if end.text == "}":
            if words:
                raise UpstreamFileError(f"{where}: missing ';' after {words[-1].text!r}")
            upstreams[current[0]] = Upstream(current[0], tuple(servers), current[1])
            current = None
            continue
        if end.text == "{" or not words:
            raise UpstreamFileError(
                f"{where}: unexpected {end.text!r} inside upstream {current[0]!r}"
            )
        directive = words[0].text
        if directive == "server":
            server = _parse_server(words, end, source)
            if any(s.address == server.address for s in servers):
                raise UpstreamFileError(
                    f"{where}: server {server.address!r} appears twice in upstream {current[0]!r}"
                )
            servers.append(server)
        elif directive not in UPSTREAM_DIRECTIVES:
            raise UpstreamFileError(
                f"{where}: directive {directive!r} is not supported in a managed upstream "
                f"(supported: server, {', '.join(sorted(UPSTREAM_DIRECTIVES))})"
            )
    if current is not None:
        raise UpstreamFileError(f"{source}: upstream {current[0]!r} is not closed by '}}'")
    if not upstreams:
        raise UpstreamFileError(f"{source}: no upstream block found")
    return upstreams


def find_upstream(upstreams: dict[str, Upstream], name: str, source: str) -> Upstream:
    try:
        return upstreams[name]
    except KeyError:
        raise UnknownUpstreamError(
            f"{source} has no upstream {name!r} (upstreams: {', '.join(upstreams)})"
        ) from None


def set_down(text: str, upstream: str, server: str, down: bool, source: str = "<text>") -> str:
    """``text`` with the server's ``down`` flag added or removed; nothing else changes."""
    found = find_upstream(parse_upstreams(text, source), upstream, source).server(server, source)
    if found.down == down:
        return text
    if down:
        return text[: found._insert_at] + " down" + text[found._insert_at :]
    start, end = found._down_span or (found._insert_at, found._insert_at)
    gap = text[start : end - len("down")]
    if "\n" in gap or "#" in gap:  # keep line breaks and comments: drop the word alone
        start = end - len("down")
    return text[:start] + text[end:]


# --- files and processes ------------------------------------------------------------------------


def _read_regular(
    path: Path, what: str, limit: int = MAX_FILE_BYTES, *, follow: bool = False
) -> bytes:
    """The bytes of ``path``: a regular file of at most ``limit`` bytes, not read through a
    symbolic link unless ``follow``. A FIFO or a device is refused before it is opened."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise UpstreamFileError(f"{what} {path} is not a regular file; give the file itself")
        fd = os.open(path, flags)
    except OSError as exc:
        raise UpstreamFileError(
            f"cannot read the {what} {path}: {_link_or(exc)}; check the path and its permissions"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the check above
            raise UpstreamFileError(f"{what} {path} is not a regular file; give the file itself")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise UpstreamFileError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise UpstreamFileError(
            f"the {what} {path} is larger than {_size(limit)}; is it the right file?"
        )
    return b"".join(chunks)


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"


def _link_or(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "it is a symbolic link"
    return str(exc.strerror or exc)


def _write_atomic(path: Path, data: bytes, like: os.stat_result | None) -> None:
    """Replace ``path`` by ``data`` whole and durably (:func:`replace_whole`: never through a
    link, a symbolic link at ``path`` replaced, not followed), with ``like``'s mode (and owner,
    as root)."""
    mode = None if like is None else stat.S_IMODE(like.st_mode)
    owner = None if like is None or os.geteuid() != 0 else (like.st_uid, like.st_gid)
    try:
        replace_whole(path, data, mode=mode, owner=owner, durable=True)
    except OSError as exc:
        raise UpstreamFileError(f"cannot write {path}: {exc.strerror or exc}") from None


def _children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return {int(child) for child in text.split()}
    except OSError:
        pass
    children = set()
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                children.add(int(entry.name))
        return children
    listing = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid="],  # noqa: S607 (no /proc: ask ps, found on PATH)
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for row in listing.splitlines():
        child, _, parent = row.strip().partition(" ")
        if parent.strip() == str(pid):
            children.add(int(child))
    return children


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _quitting(pid: int) -> bool:
    """True when the process is gone or is an nginx worker that is shutting down."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True
    except OSError:
        return not _alive(pid)
    return not title or b"shutting down" in title


def _title(pid: int) -> str | None:
    """The process title (what ``ps`` shows; nginx writes ``nginx: master process ...``)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None if Path("/proc/self").exists() else _ps_title(pid)
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def _ps_title(pid: int) -> str | None:
    try:
        listing = subprocess.run(  # noqa: S603 (a pid, no shell)
            ["ps", "-o", "command=", "-p", str(pid)],  # noqa: S607 (no /proc: ask ps)
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return listing.stdout.strip() or None


def _executable(pid: int) -> str | None:
    """The program the process runs (``/proc/PID/exe``), or None where that cannot be read."""
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return target.removesuffix(" (deleted)")  # a binary replaced by an upgrade


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _option(words: Sequence[str], flag: str) -> str | None:
    """The value of ``-c FILE`` (or ``-cFILE``) in an nginx command line."""
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(flag) and len(word) > len(flag):
            return word[len(flag) :]
    return None


# ``nginx -T``: each file of the configuration, after a ``# configuration file PATH:`` line.
_DUMP_HEADER = re.compile(r"^# configuration file (.+):$", re.MULTILINE)
_DUMP_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<punct>[{};])|(?P<quoted>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')"""
    r"""|(?P<word>[^\s{};"'#]+)"""
)


@dataclasses.dataclass(frozen=True)
class _Dump:
    """What ``nginx -T`` says about the configuration: its files, main file first."""

    files: tuple[str, ...]
    pid: str | None  # the ``pid`` directive, as written

    @classmethod
    def parse(cls, output: str) -> _Dump:
        headers = list(_DUMP_HEADER.finditer(output))
        files = tuple(match.group(1) for match in headers)
        pid = None
        for index, match in enumerate(headers):
            end = headers[index + 1].start() if index + 1 < len(headers) else len(output)
            pid = pid or _top_level_pid(output[match.end() : end])
        return cls(files, pid)


def _top_level_pid(text: str) -> str | None:
    """The argument of a ``pid`` directive outside any block of ``text`` (one file)."""
    depth, words = 0, []
    pos = 0
    while pos < len(text):
        match = _DUMP_TOKEN.match(text, pos)
        if match is None:
            return None  # an unclosed quote: nginx -t passed, so this is no directive of ours
        pos = match.end()
        if match.lastgroup in ("word", "quoted"):
            words.append(match.group().strip("\"'"))
        elif match.lastgroup == "punct":
            punct = match.group()
            if punct == ";" and depth == 0 and len(words) == 2 and words[0] == "pid":
                return words[1]
            depth += {"{": 1, "}": -1}.get(punct, 0)
            words = []
    return None


@dataclasses.dataclass(frozen=True)
class Change:
    """What an edit did: the server as it now stands, and whether the file and nginx changed."""

    upstream: str
    server: Server
    changed: bool
    seconds: float


class UpstreamController:
    """Edits the ``server`` lines of ``upstream`` in the file ``path`` and reloads nginx.

    ``nginx_bin``, ``conf`` (``-c``) and ``prefix`` (``-p``) are passed to ``nginx -T`` and
    ``nginx -t``. The master's pid comes from ``pid_file`` or, when not given, from the ``pid``
    directive of the configuration (else nginx's built-in default). ``timeout`` bounds each nginx
    command and the wait for the new workers; ``lock_timeout`` the wait for another edit.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        upstream: str,
        *,
        nginx_bin: str = "nginx",
        conf: str | os.PathLike[str] | None = None,
        prefix: str | os.PathLike[str] | None = None,
        pid_file: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        lock_timeout: float = 30.0,
    ) -> None:
        self.path = Path(os.path.realpath(path))
        self.upstream = upstream
        self.nginx_bin = nginx_bin
        self.conf = None if conf is None else Path(conf)
        self.prefix = None if prefix is None else Path(prefix)
        self.pid_file = None if pid_file is None else Path(pid_file)
        self.timeout = timeout
        self.lock_timeout = lock_timeout

    @property
    def prev_path(self) -> Path:
        return self.path.with_name(self.path.name + ".prev")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    def status(self) -> list[Server]:
        """The servers of the upstream, as the file has them (nginx is not asked)."""
        return list(self._upstream(self._read()).servers)

    def down(self, server: str, *, force: bool = False) -> Change:
        """Mark ``server`` down and reload; nothing happens when it already is.

        Refused (:class:`LastServerError`) when no other server of the upstream would be left
        up, unless ``force``: nginx would then answer 502 to every request."""
        return self._edit(server, down=True, force=force)

    def up(self, server: str) -> Change:
        """Remove ``down`` from ``server`` and reload; nothing happens when it is up."""
        return self._edit(server, down=False, force=False)

    # -- internals

    def _read(self) -> str:
        data = _read_regular(self.path, "upstream file")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise UpstreamFileError(f"{self.path} is not UTF-8 text") from None

    def _upstream(self, text: str) -> Upstream:
        return find_upstream(parse_upstreams(text, str(self.path)), self.upstream, str(self.path))

    def _edit(self, name: str, *, down: bool, force: bool) -> Change:
        started = time.monotonic()
        self._read()  # a file that is not one (a FIFO, a device, too big): refused, no lock made
        with self._locked():
            before = self._read()
            current = self._upstream(before)
            current.server(name, str(self.path))  # unknown names: nothing touched
            after = set_down(before, self.upstream, name, down, str(self.path))
            if after == before:
                server = current.server(name, str(self.path))
                return Change(self.upstream, server, False, time.monotonic() - started)
            if down and not force:
                self._refuse_last(self._upstream(after), name)
            dump = self._dump()
            master = self._master(dump)
            like = self.path.stat()
            _write_atomic(self.prev_path, before.encode(), like)
            _write_atomic(self.path, after.encode(), like)
            signalled = False
            try:
                self._test()
                workers = _children(master)
                self._signal(master, dump)
                signalled = True
                self._confirm(master, workers)
            except BaseException:
                _write_atomic(self.path, before.encode(), like)
                if signalled:  # nginx may load the edit late: have it load the restored file
                    with contextlib.suppress(NginxError, OSError):
                        self._signal(master, dump)
                raise
            server = self._upstream(after).server(name, str(self.path))
            return Change(self.upstream, server, True, time.monotonic() - started)

    def _refuse_last(self, edited: Upstream, name: str) -> None:
        if any(not server.down for server in edited.servers):
            return
        raise LastServerError(
            f"{server_address(name)} is the last server of upstream {self.upstream!r} in "
            f"{self.path} that is up: with it down nginx answers 502 to every request; bring "
            "another server up first, or pass --force (force=True) to take it out anyway"
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on ``FILE.lock``, a file that exists only while an edit runs."""
        deadline = time.monotonic() + self.lock_timeout
        while True:
            fd = self._open_lock()
            try:
                self._wait_for_lock(fd, deadline)
                if self._still_the_lock_file(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the previous holder removed it: lock the one at the path now
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            os.close(fd)  # releases the lock

    def _open_lock(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.lock_path, flags, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UpstreamFileError(
                    f"the lock file {self.lock_path} is a symbolic link; the controller never "
                    "follows one: remove it"
                ) from None
            raise UpstreamFileError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror or exc}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UpstreamFileError(
                f"the lock file {self.lock_path} is not a regular file: remove it"
            )
        return fd

    def _wait_for_lock(self, fd: int, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"another edit of {self.path} held {self.lock_path} for more than "
                    f"{self.lock_timeout:g}s; retry once it is done"
                )
            time.sleep(POLL_INTERVAL)  # poll the lock, bounded by the deadline above

    def _still_the_lock_file(self, fd: int) -> bool:
        try:
            at_path = os.stat(self.lock_path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)

    def _args(self) -> list[str]:
        args = [self.nginx_bin]
        if self.prefix is not None:
            args += ["-p", str(self.prefix)]
        if self.conf is not None:
            args += ["-c", str(self.conf)]
        return args

    def _run(self, extra: Sequence[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(  # noqa: S603 (the operator's nginx binary and paths)
                [*self._args(), *extra],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise ReloadError(
                f"cannot run {self.nginx_bin!r}: no such file; pass the nginx binary "
                f"(nginx_bin=, --nginx-bin); {self.path} was not changed"
            ) from None
        except subprocess.TimeoutExpired:
            raise ReloadError(
                f"{' '.join([*self._args(), *extra])} did not finish within {self.timeout:g}s"
            ) from None

    def _dump(self) -> _Dump:
        """``nginx -T`` on the configuration as it is: it must pass and include the file."""
        result = self._run(["-T", "-q"])
        if result.returncode != 0:
            output = result.stderr.strip() or f"exit status {result.returncode}"
            raise ValidationError(
                f"nginx -T rejects the configuration before any edit ({self.path} was not "
                f"changed): fix it first; nginx said: {output}",
                output,
            )
        dump = _Dump.parse(result.stdout)
        if not any(_same_file(str(self.path), path) for path in dump.files):
            main = dump.files[0] if dump.files else "nginx's configuration"
            raise NotIncludedError(
                f"{self.path} is not part of nginx's configuration ({main}): nginx -T does not "
                f"list it, so marking a server down there would change nothing nginx serves; "
                f"include it from the http block, or give the configuration that does "
                f"(--nginx-conf, --nginx-prefix)"
            )
        return dump

    def _test(self) -> None:
        result = self._run(["-t", "-q"])
        if result.returncode != 0:
            output = (result.stderr + result.stdout).strip()
            raise ValidationError(
                f"nginx -t rejected the edited {self.path}, which was restored as it was; "
                f"nginx said: {output or f'exit status {result.returncode}'}",
                output,
            )

    def _built_in(self, option: str) -> str | None:
        """A ``--option=value`` nginx was built with (from ``nginx -V``)."""
        output = self._run(["-V"])
        match = re.search(rf"--{option}=(\S+)", output.stderr + output.stdout)
        return match.group(1) if match else None

    def _under_prefix(self, path: str) -> Path:
        found = Path(path)
        if found.is_absolute():
            return found
        prefix = self.prefix or Path(self._built_in("prefix") or "/usr/local/nginx")
        return prefix / found

    def _find_pid_file(self, dump: _Dump) -> Path:
        if self.pid_file is not None:
            return self.pid_file
        return self._under_prefix(dump.pid or self._built_in("pid-path") or "/run/nginx.pid")

    def _master(self, dump: _Dump) -> int:
        """The pid of the running nginx master of this configuration; nothing is signalled."""
        pid_file = self._find_pid_file(dump)
        try:
            text = _read_regular(pid_file, "pid file", limit=64, follow=True).decode("ascii")
            pid = int(text.strip())
        except (UpstreamFileError, UnicodeDecodeError, ValueError):
            pid = 0
        if pid <= 0:
            raise ReloadError(
                f"no nginx master to reload: cannot read a pid from {pid_file}; start nginx, or "
                f"give its pid file (pid_file=, --pid-file); {self.path} was not changed"
            )
        if not _alive(pid):
            raise ReloadError(
                f"no nginx master to reload: process {pid} from {pid_file} is not running; "
                f"{self.path} was not changed"
            )
        self._check_master(pid, pid_file, dump)
        return pid

    def _check_master(self, pid: int, pid_file: Path, dump: _Dump) -> None:
        """Refuse a pid that is not the nginx master of this configuration (a stale pid file
        now naming another process, the master of another nginx)."""
        where = f"process {pid} (from {pid_file})"
        unchanged = f"nothing was signalled and {self.path} was not changed"
        title = _title(pid)
        if title is not None and not title.startswith(MASTER_TITLE):
            raise ReloadError(
                f"{where} is not an nginx master (it is {title[:80]!r}): the pid file is stale "
                f"or not nginx's; {unchanged}; give the running master's pid file (--pid-file)"
            )
        program = _executable(pid)
        binary = shutil.which(self.nginx_bin)
        if program is not None and binary is not None and not _same_file(program, binary):
            raise ReloadError(
                f"{where} runs {program}, not {binary}: it is not the nginx this controller "
                f"runs; {unchanged}; give the right binary (--nginx-bin) or pid file (--pid-file)"
            )
        runs = self._master_conf(title or "")
        ours = dump.files[0] if dump.files else None
        if runs is not None and ours is not None and not _same_file(runs, ours):
            raise ReloadError(
                f"{where} runs {runs}, not {ours}: it is the master of another nginx; "
                f"{unchanged}; give that nginx's configuration (--nginx-conf, --nginx-prefix) "
                "or the right pid file (--pid-file)"
            )

    def _master_conf(self, title: str) -> str | None:
        """The configuration file a master runs, from its title, where that can be told."""
        words = title.removeprefix(MASTER_TITLE).split()
        conf, prefix = _option(words, "-c"), _option(words, "-p")
        if conf is None:
            conf = self._built_in("conf-path")
            prefix = prefix or self._built_in("prefix")
        if conf is None or os.path.isabs(conf):
            return conf
        return None if prefix is None or not os.path.isabs(prefix) else os.path.join(prefix, conf)

    def _signal(self, pid: int, dump: _Dump) -> None:
        """SIGHUP to the master, checked again just before (through a pidfd where the system
        has them, so the check and the signal are about the same process)."""
        pid_file = self._find_pid_file(dump)
        try:
            handle = os.pidfd_open(pid)
        except (AttributeError, OSError):
            handle = None
        try:
            self._check_master(pid, pid_file, dump)
            if handle is not None:
                signal.pidfd_send_signal(handle, signal.SIGHUP)
            else:
                os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise ReloadError(
                f"the nginx master {pid} exited before the reload; {self.path} was restored"
            ) from None
        except PermissionError:
            raise ReloadError(
                f"not allowed to signal the nginx master {pid} (run as its user or root); "
                f"{self.path} was restored"
            ) from None
        finally:
            if handle is not None:
                os.close(handle)

    def _confirm(self, master: int, old_workers: set[int]) -> None:
        """Wait until the master runs new workers and every old one is gone or quitting."""
        deadline = time.monotonic() + self.timeout
        while True:
            if not _alive(master):
                raise ReloadError(
                    f"the nginx master {master} exited during the reload; {self.path} was "
                    "restored: check nginx's error log, then start nginx"
                )
            new = _children(master) - old_workers
            if new and all(_quitting(pid) for pid in old_workers):
                return
            if time.monotonic() >= deadline:
                raise ReloadTimeoutError(
                    f"nginx (master {master}) did not start new workers within "
                    f"{self.timeout:g}s of the reload; {self.path} was restored and nginx asked "
                    "to reload it: check nginx's error log (it may have refused the "
                    "configuration)"
                )
            time.sleep(POLL_INTERVAL)  # poll the process table, bounded by the deadline above

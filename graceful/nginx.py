"""Take a server out of an nginx upstream and put it back, safely (open-source nginx).

nginx cannot poll a readiness route, so a node leaves rotation by a ``down`` on its ``server``
line and a reload. :class:`UpstreamController` edits one upstream in a file of its own (the
file your ``http {}`` block includes) and only touches its ``server`` lines::

    ctl = UpstreamController("/etc/nginx/app-upstream.conf", "app", conf="/etc/nginx/nginx.conf")
    ctl.down("10.0.0.5:8000")   # or "http://10.0.0.5:8000"
    ctl.up("10.0.0.5:8000")
    ctl.status()                # [Server(address='10.0.0.5:8000', params=(...), ...), ...]

Every edit, under an exclusive ``flock`` on ``FILE.lock``: read and parse the file (a small,
strict parser that refuses anything it does not understand), check that the nginx master runs,
save the current content to ``FILE.prev``, write the new content atomically (a temporary file
in the same directory, fsync, ``os.replace``), run ``nginx -t`` (rolling the file back and
raising :class:`ValidationError` with nginx's message when it fails), ``nginx -s reload``
(rolled back as well when that fails), then wait until the master has started new worker
processes and every old one is gone or shutting down: the new upstream is then what new
connections get. Errors say what is wrong and what to do; when one is raised before the reload,
the file is byte for byte what it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import stat
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "Change",
    "LockTimeoutError",
    "NginxError",
    "ReloadError",
    "ReloadTimeoutError",
    "Server",
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


class NginxError(Exception):
    """Something went wrong managing the upstream; the message says what and what to do."""


class UpstreamFileError(NginxError, ValueError):
    """The upstream file cannot be read, or holds something the parser does not understand."""


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
    def state(self) -> str:
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


def _write_atomic(path: Path, data: bytes, like: os.stat_result | None) -> None:
    """Replace ``path`` by ``data``: a temporary file in the same directory, fsync, rename."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UpstreamFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if like is not None:
            os.chmod(tmp, stat.S_IMODE(like.st_mode))
            if os.geteuid() == 0:
                os.chown(tmp, like.st_uid, like.st_gid)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise UpstreamFileError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
    with contextlib.suppress(OSError):  # the rename is done; make it durable where possible
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _quitting(pid: int) -> bool:
    """True when the process is gone or is an nginx worker that is shutting down."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True
    except OSError:
        return not _alive(pid)
    return not title or b"shutting down" in title


@dataclasses.dataclass(frozen=True)
class Change:
    """What an edit did: the server as it now stands, and whether the file and nginx changed."""

    upstream: str
    server: Server
    changed: bool
    seconds: float


class UpstreamController:
    """Edits the ``server`` lines of ``upstream`` in the file ``path`` and reloads nginx.

    ``nginx_bin``, ``conf`` (``-c``) and ``prefix`` (``-p``) are passed to ``nginx -t`` and
    ``nginx -s reload``. The master's pid comes from ``pid_file`` or, when not given, from the
    ``pid`` directive of ``conf`` (else nginx's built-in default). ``timeout`` bounds each nginx
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

    def down(self, server: str) -> Change:
        """Mark ``server`` down and reload; nothing happens when it already is."""
        return self._edit(server, down=True)

    def up(self, server: str) -> Change:
        """Remove ``down`` from ``server`` and reload; nothing happens when it is up."""
        return self._edit(server, down=False)

    # -- internals

    def _read(self) -> str:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise UpstreamFileError(
                f"cannot read the upstream file {self.path}: {exc.strerror or exc}; check the "
                "path (--upstream-file) and its permissions"
            ) from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise UpstreamFileError(f"{self.path} is not UTF-8 text") from None

    def _upstream(self, text: str) -> Upstream:
        return find_upstream(parse_upstreams(text, str(self.path)), self.upstream, str(self.path))

    def _edit(self, name: str, *, down: bool) -> Change:
        started = time.monotonic()
        with self._locked():
            before = self._read()
            self._upstream(before).server(name, str(self.path))  # unknown names: nothing touched
            after = set_down(before, self.upstream, name, down, str(self.path))
            if after == before:
                server = self._upstream(before).server(name, str(self.path))
                return Change(self.upstream, server, False, time.monotonic() - started)
            master = self._master_pid()
            like = self.path.stat()
            _write_atomic(self.prev_path, before.encode(), like)
            _write_atomic(self.path, after.encode(), like)
            try:
                self._test()
                workers = _children(master)
                self._reload()
            except BaseException:
                _write_atomic(self.path, before.encode(), like)
                raise
            self._confirm(master, workers)
            server = self._upstream(after).server(name, str(self.path))
            return Change(self.upstream, server, True, time.monotonic() - started)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UpstreamFileError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror or exc}"
            ) from None
        try:
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"another edit of {self.path} held {self.lock_path} for more than "
                        f"{self.lock_timeout:g}s; retry once it is done"
                    )
                time.sleep(POLL_INTERVAL)  # poll the lock, bounded by the deadline above
            yield
        finally:
            os.close(fd)  # releases the lock

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
                "(nginx_bin=, --nginx-bin)"
            ) from None
        except subprocess.TimeoutExpired:
            raise ReloadError(
                f"{' '.join([*self._args(), *extra])} did not finish within {self.timeout:g}s"
            ) from None

    def _test(self) -> None:
        result = self._run(["-t", "-q"])
        if result.returncode != 0:
            output = (result.stderr + result.stdout).strip()
            raise ValidationError(
                f"nginx -t rejected the edited {self.path}, which was restored as it was; "
                f"nginx said: {output or f'exit status {result.returncode}'}",
                output,
            )

    def _reload(self) -> None:
        result = self._run(["-s", "reload"])
        if result.returncode != 0:
            output = (result.stderr + result.stdout).strip()
            raise ReloadError(
                f"nginx -s reload failed, {self.path} was restored as it was; nginx said: "
                f"{output or f'exit status {result.returncode}'}"
            )

    def _built_in(self, option: str) -> str | None:
        """A ``--option=value`` nginx was built with (from ``nginx -V``)."""
        output = self._run(["-V"])
        match = re.search(rf"--{option}=(\S+)", output.stderr + output.stdout)
        return match.group(1) if match else None

    def _find_pid_file(self) -> Path:
        if self.pid_file is not None:
            return self.pid_file
        conf = self.conf or Path(self._built_in("conf-path") or "/etc/nginx/nginx.conf")
        found: str | None = None
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = re.sub(r"#[^\n]*", "", conf.read_text())
            match = re.search(r"(?:^|[;{}])\s*pid\s+([^\s;]+)\s*;", text)
            found = match.group(1) if match else None
        found = found or self._built_in("pid-path") or "/run/nginx.pid"
        path = Path(found)
        if not path.is_absolute():
            prefix = self.prefix or Path(self._built_in("prefix") or "/usr/local/nginx")
            path = prefix / path
        return path

    def _master_pid(self) -> int:
        pid_file = self._find_pid_file()
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            raise ReloadError(
                f"no nginx master to reload: cannot read a pid from {pid_file}; start nginx, or "
                f"give its pid file (pid_file=, --pid-file); {self.path} was not changed"
            ) from None
        if not _alive(pid):
            raise ReloadError(
                f"no nginx master to reload: process {pid} from {pid_file} is not running; "
                f"{self.path} was not changed"
            )
        return pid

    def _confirm(self, master: int, old_workers: set[int]) -> None:
        """Wait until the master runs new workers and every old one is gone or quitting."""
        deadline = time.monotonic() + self.timeout
        while True:
            if not _alive(master):
                raise ReloadError(f"the nginx master {master} exited during the reload")
            new = _children(master) - old_workers
            if new and all(_quitting(pid) for pid in old_workers):
                return
            if time.monotonic() >= deadline:
                raise ReloadTimeoutError(
                    f"nginx (master {master}) did not start new workers within "
                    f"{self.timeout:g}s of the reload; {self.path} keeps the edit: check "
                    "nginx's error log (it may have refused the configuration)"
                )
            time.sleep(POLL_INTERVAL)  # poll the process table, bounded by the deadline above

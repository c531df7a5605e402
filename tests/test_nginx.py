"""The nginx upstream controller without nginx: the parser, the editor, and the edit procedure
(lock, atomic write, ``nginx -T``, ``nginx -t``, the master's identity, reload, confirmation,
rollback) against a fake nginx.

The fake ``nginx`` is a shell script that records its arguments, dumps a configuration on ``-T``
(the upstream file included, unless told otherwise) and copies the upstream file as it saw it on
``-t``; toggle files make ``-T`` or ``-t`` fail. The fake master is a small Python process whose
title is an nginx master's (``nginx: master process ...``) and that answers SIGHUP like nginx
does: a new worker, the old one told to stop and reaped some time later (real nginx keeps old
workers alive while they finish). The real nginx is driven in
``tests/e2e/test_nginx_controller.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from graceful._balancers import nginx as nginx
from graceful.cli import main
from graceful.nginx import (
    LastServerError,
    LockTimeoutError,
    NotIncludedError,
    ReloadError,
    ReloadTimeoutError,
    UnknownServerError,
    UnknownUpstreamError,
    UpstreamController,
    UpstreamFileError,
    ValidationError,
    parse_upstreams,
    set_down,
)

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

UPSTREAM = """\
# managed by graceful nginx: only the server lines change
upstream app {
    keepalive 16;
    server 127.0.0.1:8001 max_fails=0 weight=2;  # node a
    server 127.0.0.1:8002;
    server 127.0.0.1:8003 down max_conns=10;
}

upstream other {
    server 10.0.0.9:80;
}
"""

FAKE_NGINX = """\
#!/bin/sh
here="$(dirname "$0")"
echo "$*" >> "$here/calls.log"
case "$*" in
  *"-T"*)
    if [ -e "$here/fail-dump" ]; then
      echo 'nginx: [emerg] unknown directive "bogus" in nginx.conf:3' >&2
      exit 1
    fi
    echo "# configuration file $here/nginx.conf:"
    [ -e "$here/nginx.conf" ] && cat "$here/nginx.conf"
    echo
    if [ ! -e "$here/not-included" ]; then
      echo "# configuration file $here/upstream.conf:"
      cat "$here/upstream.conf"
    fi ;;
  *"-t"*)
    cp "$here/upstream.conf" "$here/seen-by-test.conf"
    if [ -e "$here/fail-test" ]; then
      echo 'nginx: [emerg] invalid parameter "bogus" in upstream.conf:4' >&2
      echo 'nginx: configuration file nginx.conf test failed' >&2
      exit 1
    fi ;;
esac
"""

#: argv: the pid file, the site's directory. Old workers are told to stop and reaped only at
#: the next reload: until then they are still the master's children (zombies), as nginx's old
#: workers stay listed while they finish.
FAKE_MASTER = """\
import os, signal, subprocess, sys

pid_file, here = sys.argv[1], sys.argv[2]
workers, retired = [], []

def start_worker(*_):
    if os.path.exists(os.path.join(here, "ignore-reload")):
        return
    if os.path.exists(os.path.join(here, "die-on-reload")):
        os._exit(1)
    for old in retired:
        old.wait()
    retired.clear()
    workers.append(subprocess.Popen(["sleep", "60"]))
    while len(workers) > 1:
        old = workers.pop(0)
        old.terminate()
        retired.append(old)

start_worker()
signal.signal(signal.SIGHUP, start_worker)
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)
while True:
    signal.pause()
"""


@dataclass
class Site:
    dir: Path
    upstream: Path
    pid_file: Path

    def controller(self, **kwargs: object) -> UpstreamController:
        kwargs.setdefault("nginx_bin", str(self.dir / "nginx"))
        kwargs.setdefault("pid_file", self.pid_file)
        kwargs.setdefault("timeout", 5.0)
        return UpstreamController(self.upstream, "app", **kwargs)  # type: ignore[arg-type]

    def calls(self) -> list[str]:
        log = self.dir / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def cli(self, *argv: str) -> list[str]:
        return [
            *argv,
            "--upstream-file",
            str(self.upstream),
            "--upstream",
            "app",
            "--nginx-bin",
            str(self.dir / "nginx"),
            "--pid-file",
            str(self.pid_file),
        ]


def master_title(site_dir: Path, conf: Path | None = None) -> str:
    """An nginx master's process title, as nginx sets it: its binary and command line."""
    conf = site_dir / "nginx.conf" if conf is None else conf
    return f"nginx: master process {site_dir / 'nginx'} -p {site_dir} -c {conf}"


def start_master(spawn: Spawn, site: Site, wait_until: WaitUntil, title: str) -> Proc:
    """The fake master, titled ``title``, once its pid file is written."""
    script = site.dir / "master.py"
    script.write_text(FAKE_MASTER)
    argv = [sys.executable, str(script), str(site.pid_file), str(site.dir)]
    proc = spawn(["bash", "-c", 'exec -a "$0" "$@"', title, *argv], name="master")
    wait_until(site.pid_file.exists, timeout=10, message=proc.output)
    return proc


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A fake nginx and the upstream file, without a master (see ``master``)."""
    fake = tmp_path / "nginx"
    fake.write_text(FAKE_NGINX)
    fake.chmod(0o755)
    (tmp_path / "upstream.conf").write_text(UPSTREAM)
    (tmp_path / "logs").mkdir()
    return Site(tmp_path, tmp_path / "upstream.conf", tmp_path / "logs" / "nginx.pid")


@pytest.fixture
def master(site: Site, spawn: Spawn, wait_until: WaitUntil, monkeypatch: pytest.MonkeyPatch) -> int:
    """A fake nginx master on ``site``: its pid, once its pid file is written.

    It is a Python process, so its executable is Python's: the one thing faked here is that
    the controller sees the fake nginx binary as its executable (the real check runs against
    real nginx in ``tests/e2e/test_nginx_controller.py``)."""
    proc = start_master(spawn, site, wait_until, master_title(site.dir))
    real_executable = nginx._executable

    def executable(pid: int) -> str | None:
        return str(site.dir / "nginx") if pid == proc.pid else real_executable(pid)

    monkeypatch.setattr(nginx, "_executable", executable)
    return proc.pid


# -- the parser and the editor ----------------------------------------------------------------


def test_parser_lists_servers_with_their_state_and_parameters() -> None:
    upstreams = parse_upstreams(UPSTREAM)

    app = upstreams["app"]
    assert [(s.address, s.state, s.params) for s in app.servers] == [
        ("127.0.0.1:8001", "up", ("max_fails=0", "weight=2")),
        ("127.0.0.1:8002", "up", ()),
        ("127.0.0.1:8003", "down", ("down", "max_conns=10")),
    ]
    assert [s.line for s in app.servers] == [4, 5, 6]
    assert [s.address for s in upstreams["other"].servers] == ["10.0.0.9:80"]


def test_down_adds_only_the_word_down_and_up_restores_the_text_exactly() -> None:
    downed = set_down(UPSTREAM, "app", "127.0.0.1:8001", True)

    assert downed == UPSTREAM.replace("weight=2;", "weight=2 down;")
    assert set_down(downed, "app", "127.0.0.1:8001", False) == UPSTREAM


def test_up_removes_down_and_keeps_the_other_parameters() -> None:
    upped = set_down(UPSTREAM, "app", "127.0.0.1:8003", False)

    assert "    server 127.0.0.1:8003 max_conns=10;\n" in upped
    assert upped.replace("8003 max_conns", "8003 down max_conns") == UPSTREAM


def test_up_keeps_a_comment_and_line_break_before_down() -> None:
    text = "upstream app {\n    server 127.0.0.1:8001 # a\n        down;\n}\n"

    assert set_down(text, "app", "127.0.0.1:8001", False) == (
        "upstream app {\n    server 127.0.0.1:8001 # a\n        ;\n}\n"
    )


def test_a_server_can_be_named_by_its_url() -> None:
    downed = set_down(UPSTREAM, "app", "http://127.0.0.1:8002/", True)

    assert "server 127.0.0.1:8002 down;" in downed


def test_an_edit_that_changes_nothing_returns_the_same_text() -> None:
    assert set_down(UPSTREAM, "app", "127.0.0.1:8003", True) is UPSTREAM


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "no upstream block"),
        ("server 127.0.0.1:1;", "expected 'upstream NAME {'"),
        ("http {\n}", "expected 'upstream NAME {'"),
        ("upstream app {\n  server 127.0.0.1:1;\n", "not closed"),
        ("upstream app {\n  server 127.0.0.1:1\n}", ":2: missing ';'"),
        ("upstream app {\n  server 127.0.0.1:1 bogus;\n}", ":2: unknown server parameter 'bogus'"),
        ("upstream app {\n  server 127.0.0.1:1 weight;\n}", "unknown server parameter 'weight'"),
        ("upstream app {\n  server 127.0.0.1:1 colour=red;\n}", "unknown server parameter"),
        ("upstream app {\n  server 127.0.0.1:1 down down;\n}", "'down' given twice"),
        ("upstream app {\n  server;\n}", "needs an address"),
        ("upstream app {\n  server weight=1;\n}", "not a server address"),
        ('upstream app {\n  server "127.0.0.1:1";\n}', ":2: unsupported character '\"'"),
        ("upstream app {\n  server 127.0.0.1:1#x;\n}", "'#' inside a word"),
        ("upstream app {\n  proxy_pass http://x;\n}", "directive 'proxy_pass' is not supported"),
        ("upstream app {\n  if ($x) {\n  }\n}", "unexpected '{'"),
        ("upstream app {\n server 127.0.0.1:1;\n server 127.0.0.1:1;\n}", "appears twice"),
        ("upstream a {\n}\nupstream a {\n}", "upstream 'a' is defined twice"),
        ("upstream app {\n  server 127.0.0.1:1;\n}\nupstream", "not ended by ';'"),
    ],
)
def test_parser_refuses_what_it_does_not_understand(text: str, complaint: str) -> None:
    with pytest.raises(UpstreamFileError, match=r"^<text>") as caught:
        parse_upstreams(text)

    assert complaint in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_unknown_upstream_and_server_name_what_exists() -> None:
    with pytest.raises(UnknownUpstreamError, match=r"no upstream 'ap' \(upstreams: app, other\)"):
        set_down(UPSTREAM, "ap", "127.0.0.1:8001", True)
    with pytest.raises(UnknownServerError, match=r"no server '127.0.0.1:9' \(servers: 127"):
        set_down(UPSTREAM, "app", "127.0.0.1:9", True)


# -- the edit procedure against the fake nginx -------------------------------------------------


def test_down_writes_the_file_tests_it_reloads_and_waits_for_new_workers(
    site: Site, master: int
) -> None:
    workers = nginx._children(master)
    site.upstream.chmod(0o640)
    inode = site.upstream.stat().st_ino

    change = site.controller(conf=site.dir / "nginx.conf", prefix=site.dir).down("127.0.0.1:8002")

    assert change.changed
    assert change.server.down
    assert change.server.params == ("down",)
    assert site.upstream.read_text() == UPSTREAM.replace("8002;", "8002 down;")
    assert (site.dir / "upstream.conf.prev").read_text() == UPSTREAM
    assert (site.dir / "seen-by-test.conf").read_text() == site.upstream.read_text()
    assert stat.S_IMODE(site.upstream.stat().st_mode) == 0o640
    args = f"-p {site.dir} -c {site.dir / 'nginx.conf'}"
    assert site.calls() == [f"{args} -T -q", f"{args} -t -q"]
    # What the controller guarantees once down() returns: the master runs a new worker, and
    # every old one is gone or stopping (it may still be listed, as a zombie or shutting down).
    assert nginx._children(master) - workers
    assert all(nginx._quitting(pid) for pid in workers)
    assert not [p for p in site.dir.iterdir() if p.name.endswith(".tmp")]
    assert not (site.dir / "upstream.conf.lock").exists()
    assert site.upstream.stat().st_ino != inode  # replaced by a rename, never rewritten in place


def test_up_after_down_gives_back_the_original_bytes(site: Site, master: int) -> None:
    controller = site.controller()
    controller.down("127.0.0.1:8001")
    controller.up("127.0.0.1:8001")

    assert site.upstream.read_text() == UPSTREAM
    assert [s.state for s in controller.status()] == ["up", "up", "down"]


def test_the_pid_file_is_found_through_the_pid_directive_of_the_conf(
    site: Site, master: int
) -> None:
    conf = site.dir / "nginx.conf"
    conf.write_text("# pid /nowhere;\nworker_processes 1; pid logs/nginx.pid;\nevents {}\n")

    change = site.controller(conf=conf, prefix=site.dir, pid_file=None).down("127.0.0.1:8001")

    assert change.changed


def test_an_edit_that_changes_nothing_does_not_reload(site: Site, master: int) -> None:
    change = site.controller().down("127.0.0.1:8003")

    assert not change.changed
    assert site.calls() == []
    assert site.upstream.read_text() == UPSTREAM


def test_status_reads_the_file_only(site: Site) -> None:
    servers = site.controller(nginx_bin="/nonexistent/nginx").status()

    assert [(s.address, s.state) for s in servers] == [
        ("127.0.0.1:8001", "up"),
        ("127.0.0.1:8002", "up"),
        ("127.0.0.1:8003", "down"),
    ]


@pytest.mark.parametrize(
    ("upstream", "server", "error"),
    [
        ("nope", "127.0.0.1:8001", UnknownUpstreamError),
        ("app", "127.0.0.1:9999", UnknownServerError),
        ("app", "10.0.0.9:80", UnknownServerError),
    ],
)
def test_unknown_names_leave_the_file_untouched_and_nginx_alone(
    site: Site, master: int, upstream: str, server: str, error: type[Exception]
) -> None:
    before = site.upstream.read_bytes()
    controller = site.controller()
    controller.upstream = upstream

    with pytest.raises(error):
        controller.down(server)

    assert site.upstream.read_bytes() == before
    assert site.calls() == []
    assert not (site.dir / "upstream.conf.prev").exists()


def test_an_unsupported_file_is_refused_untouched(site: Site, master: int) -> None:
    site.upstream.write_text(UPSTREAM.replace("keepalive 16;", "proxy_pass http://x;"))
    before = site.upstream.read_bytes()

    with pytest.raises(UpstreamFileError, match=r"upstream.conf:3: directive 'proxy_pass'"):
        site.controller().down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before
    assert site.calls() == []


def test_an_unreadable_file_is_a_clear_error(site: Site) -> None:
    missing = UpstreamController(site.dir / "missing.conf", "app")
    with pytest.raises(UpstreamFileError, match=r"cannot read the upstream file .*missing\.conf"):
        missing.down("127.0.0.1:8001")
    with pytest.raises(UpstreamFileError, match="not a regular file"):
        UpstreamController(site.dir, "app").status()
    assert not (site.dir / "missing.conf.lock").exists()


def test_a_write_that_fails_midway_leaves_the_file_and_no_temporary_file(
    site: Site, master: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = site.upstream.read_bytes()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    with pytest.raises(UpstreamFileError, match=r"cannot write .*: No space left on device"):
        site.controller().down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before
    assert sorted(p.name for p in site.dir.iterdir() if "upstream" in p.name) == ["upstream.conf"]
    assert [call.split()[-2:] for call in site.calls()] == [["-T", "-q"]]  # never tested


def test_a_failing_nginx_t_restores_the_file_byte_for_byte(site: Site, master: int) -> None:
    (site.dir / "fail-test").touch()
    before = site.upstream.read_bytes()
    workers = nginx._children(master)

    with pytest.raises(ValidationError, match='invalid parameter "bogus"') as caught:
        site.controller().down("127.0.0.1:8001")

    assert "test failed" in caught.value.output
    assert "was restored" in str(caught.value)
    assert "8001 max_fails=0 weight=2 down;" in (site.dir / "seen-by-test.conf").read_text()
    assert site.upstream.read_bytes() == before
    assert nginx._children(master) == workers  # never signalled


def test_a_configuration_nginx_t_already_rejects_is_refused_before_the_write(
    site: Site, master: int
) -> None:
    (site.dir / "fail-dump").touch()
    before = site.upstream.read_bytes()

    with pytest.raises(ValidationError, match=r"before any edit.*unknown directive \"bogus\""):
        site.controller().down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before
    assert not (site.dir / "upstream.conf.prev").exists()


def test_a_master_that_exits_during_the_reload_leaves_the_file_restored(
    site: Site, master: int
) -> None:
    (site.dir / "die-on-reload").touch()
    before = site.upstream.read_bytes()

    with pytest.raises(ReloadError, match=r"exited during the reload.*was restored"):
        site.controller().up("127.0.0.1:8003")

    assert site.upstream.read_bytes() == before


def test_no_running_master_is_refused_before_the_file_is_touched(site: Site) -> None:
    before = site.upstream.read_bytes()
    with pytest.raises(ReloadError, match="no nginx master to reload: cannot read a pid"):
        site.controller().down("127.0.0.1:8001")
    site.pid_file.write_text("999999999\n")  # no such process
    with pytest.raises(ReloadError, match=r"process 999999999 .* is not running"):
        site.controller().down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before
    assert [call for call in site.calls() if "-T" not in call] == []


def test_a_reload_that_starts_no_new_workers_times_out_and_restores_the_file(
    site: Site, master: int
) -> None:
    (site.dir / "ignore-reload").touch()
    before = site.upstream.read_bytes()

    with pytest.raises(ReloadTimeoutError, match=r"did not start new workers within 0\.3s"):
        site.controller(timeout=0.3).down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before


def test_a_missing_nginx_binary_leaves_the_file_untouched(site: Site, master: int) -> None:
    before = site.upstream.read_bytes()

    with pytest.raises(ReloadError, match="cannot run '/nonexistent/nginx'"):
        site.controller(nginx_bin="/nonexistent/nginx").down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before


def test_an_edit_waits_for_the_lock_and_gives_up_at_its_timeout(site: Site, master: int) -> None:
    before = site.upstream.read_bytes()
    with open(site.dir / "upstream.conf.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(
            LockTimeoutError, match=r"held .*upstream\.conf\.lock for more than 0\.2s"
        ):
            site.controller(lock_timeout=0.2).down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before
    assert site.controller().down("127.0.0.1:8001").changed  # the lock is free again


# -- whose process gets the signal ---------------------------------------------------------


def test_a_pid_file_naming_a_process_that_is_not_nginx_signals_nothing(
    site: Site, spawn: Spawn
) -> None:
    stranger = spawn(["sleep", "60"], name="stranger")
    site.pid_file.write_text(f"{stranger.pid}\n")
    before = site.upstream.read_bytes()

    with pytest.raises(ReloadError, match=rf"process {stranger.pid} .* is not an nginx master"):
        site.controller().down("127.0.0.1:8001")

    assert stranger.alive()
    assert site.upstream.read_bytes() == before
    assert not (site.dir / "upstream.conf.prev").exists()


def test_a_process_titled_like_an_nginx_master_but_running_another_program_is_refused(
    site: Site, spawn: Spawn, wait_until: WaitUntil
) -> None:
    impostor = start_master(spawn, site, wait_until, master_title(site.dir))  # Python inside
    workers = nginx._children(impostor.pid)
    before = site.upstream.read_bytes()

    with pytest.raises(ReloadError, match=rf"process {impostor.pid} .* runs .*python"):
        site.controller().down("127.0.0.1:8001")

    assert nginx._children(impostor.pid) == workers  # never signalled
    assert site.upstream.read_bytes() == before


def test_the_master_of_another_configuration_is_refused(
    site: Site, spawn: Spawn, wait_until: WaitUntil, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = site.dir / "other" / "nginx.conf"
    other = start_master(spawn, site, wait_until, master_title(site.dir, conf=elsewhere))
    monkeypatch.setattr(nginx, "_executable", lambda pid: str(site.dir / "nginx"))
    workers = nginx._children(other.pid)
    before = site.upstream.read_bytes()

    with pytest.raises(ReloadError, match=rf"runs {elsewhere}, not {site.dir / 'nginx.conf'}"):
        site.controller().down("127.0.0.1:8001")

    assert nginx._children(other.pid) == workers
    assert site.upstream.read_bytes() == before


# -- the files it reads and creates ----------------------------------------------------------


def test_an_upstream_file_nginx_does_not_include_is_refused_untouched(
    site: Site, master: int
) -> None:
    (site.dir / "not-included").touch()
    before = site.upstream.read_bytes()

    with pytest.raises(NotIncludedError, match=r"upstream\.conf is not part of nginx's config"):
        site.controller().down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before
    assert [call.split()[-2:] for call in site.calls()] == [["-T", "-q"]]


def test_the_last_server_in_service_is_taken_out_only_with_force(site: Site, master: int) -> None:
    controller = site.controller()
    controller.down("127.0.0.1:8001")
    before = site.upstream.read_bytes()

    with pytest.raises(LastServerError, match=r"127\.0\.0\.1:8002 is the last server .* --force"):
        controller.down("127.0.0.1:8002")

    assert site.upstream.read_bytes() == before
    assert controller.down("127.0.0.1:8002", force=True).changed
    assert [s.state for s in controller.status()] == ["down", "down", "down"]


def test_the_lock_file_is_gone_after_an_edit_that_fails(site: Site, master: int) -> None:
    (site.dir / "fail-test").touch()

    with pytest.raises(ValidationError):
        site.controller().down("127.0.0.1:8001")

    assert not (site.dir / "upstream.conf.lock").exists()


@pytest.mark.parametrize("planted", ["upstream.conf.lock", "upstream.conf.prev"])
def test_a_symlink_planted_where_the_controller_writes_is_never_followed(
    site: Site, master: int, planted: str
) -> None:
    target = site.dir / "victim"
    target.write_text("keep me\n")
    (site.dir / planted).symlink_to(target)

    if planted.endswith(".lock"):  # a lock is never opened through a link: refused
        with pytest.raises(UpstreamFileError, match="is a symbolic link"):
            site.controller().down("127.0.0.1:8001")
    else:  # FILE.prev is replaced by a rename, which replaces the link itself
        assert site.controller().down("127.0.0.1:8001").changed
        assert not (site.dir / planted).is_symlink()
        assert (site.dir / planted).read_text() == UPSTREAM
    assert target.read_text() == "keep me\n"


def test_a_dangling_symlink_at_the_lock_creates_no_file_at_its_target(
    site: Site, master: int
) -> None:
    target = site.dir / "created-through-the-lock"
    (site.dir / "upstream.conf.lock").symlink_to(target)
    before = site.upstream.read_bytes()

    with pytest.raises(UpstreamFileError, match=r"lock file .* is a symbolic link"):
        site.controller().down("127.0.0.1:8001")

    assert not target.exists()
    assert site.upstream.read_bytes() == before


def test_an_upstream_file_larger_than_the_limit_is_refused_before_anything_is_created(
    site: Site, master: int
) -> None:
    padding = "#" + "x" * 100 + "\n"
    site.upstream.write_text(UPSTREAM + padding * (nginx.MAX_FILE_BYTES // len(padding) + 1))
    before = site.upstream.read_bytes()

    with pytest.raises(UpstreamFileError, match=r"larger than 1 MiB"):
        site.controller().down("127.0.0.1:8001")

    assert site.upstream.read_bytes() == before
    assert sorted(p.name for p in site.dir.iterdir() if "upstream" in p.name) == ["upstream.conf"]


def test_an_upstream_file_that_is_not_a_regular_file_is_refused_without_reading_it(
    site: Site, master: int
) -> None:
    fifo = site.dir / "fifo.conf"
    os.mkfifo(fifo)
    endless = _EndlessWriter(fifo)
    try:
        with pytest.raises(UpstreamFileError, match=r"fifo\.conf is not a regular file"):
            UpstreamController(fifo, "app", pid_file=site.pid_file).down("127.0.0.1:8001")
        assert endless.written == 0  # never opened, so never read
    finally:
        endless.stop()

    assert not (site.dir / "fifo.conf.lock").exists()


class _EndlessWriter:
    """Writes to a FIFO for as long as someone reads it (a /dev/zero that cannot fill a disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY)  # waits for a reader
        except OSError:
            return
        try:
            while not self.done.is_set() and self.written < 64 << 20:
                self.written += os.write(fd, b"server 127.0.0.1:1;\n" * 512)
        except OSError:
            pass  # the reader went away
        finally:
            os.close(fd)

    def stop(self) -> None:
        self.done.set()
        with contextlib.suppress(OSError):  # release a writer still waiting for a reader
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self.thread.join(10)


# -- the command line --------------------------------------------------------------------------


def test_cli_status_lists_the_servers(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(site.cli("nginx", "status")) == 0
    assert capsys.readouterr().out.splitlines() == [
        "127.0.0.1:8001 up max_fails=0 weight=2",
        "127.0.0.1:8002 up",
        "127.0.0.1:8003 down max_conns=10",
    ]
    assert main(site.cli("nginx", "status", "--json")) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["servers"][2] == {
        "address": "127.0.0.1:8003",
        "state": "down",
        "params": ["down", "max_conns=10"],
    }


def test_cli_down_and_up(site: Site, master: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(site.cli("nginx", "down", "http://127.0.0.1:8002")) == 0
    assert "app 127.0.0.1:8002 down (" in capsys.readouterr().out
    assert main(site.cli("nginx", "down", "127.0.0.1:8002")) == 0
    assert "already, nothing changed" in capsys.readouterr().out
    assert main(site.cli("nginx", "up", "127.0.0.1:8002")) == 0
    assert site.upstream.read_text() == UPSTREAM


@pytest.mark.parametrize(
    ("setup", "argv", "code", "message"),
    [
        ("", ["down", "127.0.0.1:9999"], 7, "has no server '127.0.0.1:9999'"),
        ("bad-file", ["down", "127.0.0.1:8001"], 7, "unknown server parameter 'bogus'"),
        ("fail-test", ["down", "127.0.0.1:8001"], 8, "nginx -t rejected"),
        ("fail-dump", ["down", "127.0.0.1:8001"], 8, "before any edit"),
        ("not-included", ["down", "127.0.0.1:8001"], 7, "is not part of nginx's configuration"),
        ("last", ["down", "127.0.0.1:8001"], 7, "is the last server"),
        ("die-on-reload", ["down", "127.0.0.1:8001"], 9, "was restored"),
        ("no-master", ["down", "127.0.0.1:8001"], 9, "no nginx master to reload"),
        ("stranger", ["down", "127.0.0.1:8001"], 9, "is not an nginx master"),
        ("locked", ["down", "127.0.0.1:8001", "--timeout", "0.2"], 6, "held"),
    ],
)
def test_cli_bad_edits_exit_with_distinct_codes_and_leave_the_file_untouched(
    site: Site,
    master: int,
    spawn: Spawn,
    capsys: pytest.CaptureFixture[str],
    setup: str,
    argv: list[str],
    code: int,
    message: str,
) -> None:
    if setup == "bad-file":
        site.upstream.write_text(UPSTREAM.replace("weight=2", "bogus"))
    elif setup == "no-master":
        site.pid_file.unlink()
    elif setup == "stranger":
        site.pid_file.write_text(f"{spawn(['sleep', '60'], name='stranger').pid}\n")
    elif setup == "last":
        site.upstream.write_text(UPSTREAM.replace("8002;", "8002 down;"))
    elif setup:
        (site.dir / setup).touch()
    before = site.upstream.read_bytes()
    with open(site.dir / "upstream.conf.lock", "w") as lock:
        if setup == "locked":
            fcntl.flock(lock, fcntl.LOCK_EX)
        result = main(site.cli("nginx", *argv))

    err = capsys.readouterr().err
    assert result == code, err
    assert err.startswith("graceful: ")
    assert message in err
    assert site.upstream.read_bytes() == before
    assert not (site.dir / "upstream.conf.lock").exists() or setup == "locked"


def test_cli_down_force_takes_the_last_server_out(
    site: Site, master: int, capsys: pytest.CaptureFixture[str]
) -> None:
    site.upstream.write_text(UPSTREAM.replace("8002;", "8002 down;"))

    assert main(site.cli("nginx", "down", "127.0.0.1:8001")) == 7
    assert "--force" in capsys.readouterr().err
    assert main(site.cli("nginx", "down", "127.0.0.1:8001", "--force")) == 0
    assert "app 127.0.0.1:8001 down (" in capsys.readouterr().out


def test_cli_help_lists_the_nginx_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["nginx", "--help"])
    out = capsys.readouterr().out
    for verb in ("status", "down", "up"):
        assert verb in out
    assert "  8  nginx: nginx -T or nginx -t rejected" in out
    assert "--force" in out


def test_the_example_upstream_file_parses() -> None:
    path = Path(__file__).resolve().parent.parent / "integrations" / "nginx" / "upstream.conf"
    upstreams = parse_upstreams(path.read_text(), str(path))

    assert len(upstreams) == 1
    (upstream,) = upstreams.values()
    assert len(upstream.servers) >= 2
    assert not any(s.down for s in upstream.servers)


@pytest.mark.parametrize(
    ("error", "standard"),
    [
        (nginx.NginxError, Exception),
        (nginx.UpstreamFileError, ValueError),
        (nginx.NotIncludedError, ValueError),
        (nginx.LastServerError, ValueError),
        (nginx.UnknownUpstreamError, ValueError),
        (nginx.UnknownServerError, ValueError),
        (nginx.ValidationError, Exception),
        (nginx.ReloadError, Exception),
        (nginx.ReloadTimeoutError, TimeoutError),
        (nginx.LockTimeoutError, TimeoutError),
    ],
)
def test_each_error_is_a_graceful_error_and_keeps_its_standard_base(
    error: type[Exception], standard: type[Exception]
) -> None:
    from graceful._core.errors import GracefulError

    assert issubclass(error, nginx.NginxError)
    assert issubclass(error, GracefulError)
    assert issubclass(error, standard)

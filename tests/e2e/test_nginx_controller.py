"""The nginx upstream controller against a real nginx master on 127.0.0.1.

Each test starts nginx (its config, pid file, logs and temp directories under ``tmp_path``)
in front of small ``python -m http.server`` backends that each serve a file ``/who`` naming
themselves, so every answer through nginx says which backend took the request. Requests go out
on fresh connections (``Connection: close``), so each one is routed by the nginx workers of the
moment. Without nginx these tests skip, or fail when ``CI`` is set.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests
from conftest import unused_port
from rollout_harness import required_binary

from graceful._balancers import nginx as nginx
from graceful._tools import cli as cli
from graceful.nginx import UpstreamController, ValidationError

if TYPE_CHECKING:
    from conftest import Proc, Spawn, WaitUntil

pytestmark = pytest.mark.e2e

NAMES = ("a", "b", "c")


def nginx_binary() -> str:
    return required_binary("nginx")


@dataclass
class Site:
    dir: Path
    nginx_bin: str
    conf: Path
    upstream: Path
    url: str
    backends: dict[str, str]
    master: Proc

    def controller(self) -> UpstreamController:
        return UpstreamController(
            self.upstream,
            "app",
            nginx_bin=self.nginx_bin,
            conf=self.conf,
            prefix=self.dir,
        )

    def who(self, count: int = 12) -> list[str]:
        """Which backend answered each of ``count`` requests through nginx."""
        answers = []
        for _ in range(count):
            response = requests.get(self.url, headers={"Connection": "close"}, timeout=5)
            assert response.status_code == 200, response.text
            answers.append(response.text.strip())
        return answers

    def workers(self) -> set[int]:
        return nginx._children(self.master.pid)

    def cli(self, verb: str, server: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "graceful.cli",
            "nginx",
            verb,
            server,
            "--upstream-file",
            str(self.upstream),
            "--upstream",
            "app",
            "--nginx-bin",
            self.nginx_bin,
            "--nginx-conf",
            str(self.conf),
            "--nginx-prefix",
            str(self.dir),
        ]


def nginx_conf(site_dir: Path, port: int, extra: str = "") -> str:
    temp = " ".join(
        f"{kind}_temp_path {site_dir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {site_dir / "nginx.pid"};
error_log {site_dir / "error.log"} info;
events {{ worker_connections 64; }}
http {{
    access_log {site_dir / "access.log"};
    {temp}
    include {site_dir / "upstream.conf"};
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://app; proxy_next_upstream off; }}
    }}
    {extra}
}}
"""


@pytest.fixture
def site(tmp_path: Path, spawn: Spawn, wait_until: WaitUntil, free_port: int) -> Site:
    nginx_bin = nginx_binary()
    backends = {}
    for name in NAMES:
        root = tmp_path / f"www-{name}"
        root.mkdir()
        (root / "who").write_text(name)
        port = unused_port()
        spawn(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
                str(root),
                str(port),
            ],
            name=f"backend-{name}",
        )
        backends[name] = f"127.0.0.1:{port}"
    servers = "".join(
        f"    server {addr} max_fails=0;  # {name}\n" for name, addr in backends.items()
    )
    upstream = tmp_path / "upstream.conf"
    upstream.write_text(f"# managed by graceful nginx\nupstream app {{\n{servers}}}\n")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, free_port))
    master = spawn([nginx_bin, "-p", str(tmp_path), "-c", str(conf)], name="nginx")
    site = Site(
        tmp_path, nginx_bin, conf, upstream, f"http://127.0.0.1:{free_port}/who", backends, master
    )

    def serving(addr: str) -> bool:
        return requests.get(f"http://{addr}/who", timeout=2).ok

    for addr in backends.values():
        wait_until(lambda: serving(addr), timeout=15)  # noqa: B023 (called before the next loop)
    wait_until(
        lambda: site.workers() and set(site.who(6)) == set(NAMES), timeout=15, message=master.output
    )
    return site


def test_down_takes_a_server_out_of_rotation_and_up_brings_it_back(site: Site) -> None:
    controller = site.controller()
    workers = site.workers()

    change = controller.down(site.backends["b"])

    assert change.changed and change.server.down
    # new workers run the new upstream; the old ones are gone or no longer accept connections
    assert site.workers() - workers
    assert all(nginx._quitting(pid) for pid in workers)
    assert set(site.who()) == {"a", "c"}
    assert [s.state for s in controller.status()] == ["up", "down", "up"]

    controller.up(site.backends["b"])

    assert set(site.who()) == set(NAMES)
    assert site.upstream.read_text() == (site.dir / "upstream.conf.prev").read_text().replace(
        f"{site.backends['b']} max_fails=0 down;", f"{site.backends['b']} max_fails=0;"
    )


def test_a_conf_that_fails_nginx_t_leaves_the_file_untouched_and_nginx_serving(
    site: Site,
) -> None:
    before = site.upstream.read_bytes()
    workers = site.workers()
    site.conf.write_text(nginx_conf(site.dir, 1, extra="bogus_directive on;"))

    with pytest.raises(ValidationError, match='unknown directive "bogus_directive"'):
        site.controller().down(site.backends["a"])

    assert site.upstream.read_bytes() == before
    assert site.workers() == workers  # never reloaded
    assert set(site.who()) == set(NAMES)


def test_an_edit_nginx_rejects_is_rolled_back_and_nginx_keeps_serving(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = site.upstream.read_bytes()
    workers = site.workers()
    real_set_down = nginx.set_down

    def broken(text: str, upstream: str, server: str, down: bool, source: str = "") -> str:
        return real_set_down(text, upstream, server, down, source).replace(
            " down;", " down weight=0;"
        )

    monkeypatch.setattr(nginx, "set_down", broken)  # a test hook: the edit is made invalid

    with pytest.raises(ValidationError, match='invalid parameter "weight=0"'):
        site.controller().down(site.backends["a"])

    assert site.upstream.read_bytes() == before
    assert site.workers() == workers
    assert set(site.who()) == set(NAMES)


def test_two_concurrent_downs_wait_for_each_other_and_both_take_effect(
    site: Site, spawn: Spawn, wait_until: WaitUntil
) -> None:
    before = site.upstream.read_bytes()
    lock_file = site.dir / "upstream.conf.lock"

    def holds_open(proc: Proc) -> bool:
        fds = Path(f"/proc/{proc.pid}/fd")
        return any(os.readlink(fd) == str(lock_file) for fd in fds.iterdir())

    with open(lock_file, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another edit is running
        first = spawn(site.cli("down", site.backends["a"]), name="down-a")
        second = spawn(site.cli("down", site.backends["b"]), name="down-b")
        wait_until(lambda: holds_open(first) and holds_open(second), timeout=20)
        assert first.alive() and second.alive()  # both wait for the lock
        assert site.upstream.read_bytes() == before

    assert first.wait(20) == 0, first.output()
    assert second.wait(20) == 0, second.output()
    assert [s.state for s in site.controller().status()] == ["down", "down", "up"]
    assert set(site.who()) == {"c"}


def test_no_running_master_is_refused_before_the_file_is_touched(site: Site) -> None:
    site.master.stop()
    (site.dir / "nginx.pid").unlink(missing_ok=True)
    before = site.upstream.read_bytes()

    result = subprocess.run(
        site.cli("down", site.backends["a"]),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 9, result.stderr
    assert "no nginx master to reload" in result.stderr
    assert site.upstream.read_bytes() == before


def test_the_example_upstream_file_passes_nginx_t(tmp_path: Path) -> None:
    nginx_bin = nginx_binary()
    example = Path(__file__).resolve().parents[2] / "integrations" / "nginx" / "upstream.conf"
    shutil.copy(example, tmp_path / "upstream.conf")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf(tmp_path, unused_port()))

    result = subprocess.run(
        [nginx_bin, "-p", str(tmp_path), "-c", str(conf), "-t", "-q"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert [s.state for s in UpstreamController(example, "app").status()] == ["up"] * 3


def rollout_args(site: Site, restart: str) -> list[str]:
    nodes = [arg for addr in site.backends.values() for arg in ("--node", f"http://{addr}")]
    return [
        "rollout",
        *nodes,
        "--lb", "nginx",
        "--nginx-upstream-file", str(site.upstream),
        "--nginx-upstream", "app",
        "--nginx-bin", site.nginx_bin,
        "--nginx-conf", str(site.conf),
        "--nginx-prefix", str(site.dir),
        "--readyz-path", "/who",  # the http.server backends have no /readyz
        "--restart", restart,
    ]  # fmt: skip


def test_rollout_takes_each_node_down_and_back_through_nginx(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = tmp_path / "seen"
    # The 'restart' records which backends nginx still sends traffic to while this node is down.
    code = (
        "import sys, urllib.request\n"
        "who = {urllib.request.urlopen(sys.argv[1], timeout=5).read().decode() for _ in range(6)}\n"
        "open(sys.argv[2], 'a').write(sys.argv[3] + ' ' + ','.join(sorted(who)) + '\\n')\n"
    )
    code = code.replace("{", "{{").replace("}", "}}")  # literal braces in a command template
    restart = f"{sys.executable} -c {shlex.quote(code)} {site.url} {seen} {{index}}"
    before = site.upstream.read_text()

    assert cli.main(rollout_args(site, restart)) == 0

    out = capsys.readouterr().out
    assert out.count("nginx reloaded") == 6, out
    assert seen.read_text().splitlines() == ["0 b,c", "1 a,c", "2 a,b"]
    assert site.upstream.read_text() == before  # every server up again
    assert set(site.who(6)) == set(NAMES)


def test_rollout_stops_when_nginx_cannot_be_reloaded_and_leaves_the_file_untouched(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site.master.stop()
    (site.dir / "nginx.pid").unlink(missing_ok=True)
    before = site.upstream.read_bytes()
    ran = tmp_path / "restarted"

    assert cli.main(rollout_args(site, f"touch {ran}")) == cli.ROLLOUT_STOPPED

    out = capsys.readouterr().out
    assert "cut: FAILED: nginx: " in out and "no nginx master to reload" in out
    assert site.upstream.read_bytes() == before
    assert not ran.exists()


# -- whose process gets the signal, which file may be edited ---------------------------------


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_a_pid_file_naming_a_process_that_is_not_nginx_signals_nothing(
    site: Site, spawn: Spawn
) -> None:
    """nginx's own pid file (from the configuration's pid line) is stale and now names another
    process: ``nginx -s reload`` would send that process SIGHUP."""
    stranger = spawn(["sleep", "60"], name="stranger")
    pid_file = site.dir / "nginx.pid"
    pid_file.write_text(f"{stranger.pid}\n")
    before = site.upstream.read_bytes()
    workers = site.workers()

    result = run_cli(site.cli("down", site.backends["a"]))

    assert result.returncode == 9, result.stderr
    assert f"process {stranger.pid} (from {pid_file}) is not an nginx master" in result.stderr
    assert stranger.alive()  # a SIGHUP would have ended it
    assert site.upstream.read_bytes() == before
    assert site.workers() == workers
    assert set(site.who()) == set(NAMES)
    assert sorted(p.name for p in site.dir.iterdir() if p.name.startswith("upstream")) == [
        "upstream.conf"
    ]


def test_the_master_of_another_nginx_is_not_signalled(
    site: Site, spawn: Spawn, tmp_path: Path, wait_until: WaitUntil
) -> None:
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    shutil.copy(site.upstream, other_dir / "upstream.conf")
    other_conf = other_dir / "nginx.conf"
    other_conf.write_text(nginx_conf(other_dir, unused_port()))
    other = spawn([site.nginx_bin, "-p", str(other_dir), "-c", str(other_conf)], name="other")
    wait_until(lambda: nginx._children(other.pid), timeout=15, message=other.output)
    other_workers = nginx._children(other.pid)
    before = site.upstream.read_bytes()

    result = run_cli(
        [*site.cli("down", site.backends["a"]), "--pid-file", str(other_dir / "nginx.pid")]
    )

    assert result.returncode == 9, result.stderr
    assert f"runs {other_conf}, not {site.conf}" in result.stderr
    assert nginx._children(other.pid) == other_workers
    assert site.upstream.read_bytes() == before


def test_an_upstream_file_nginx_does_not_include_is_refused_untouched(
    site: Site, tmp_path: Path
) -> None:
    stray = tmp_path / "stray" / "upstream.conf"
    stray.parent.mkdir()
    shutil.copy(site.upstream, stray)
    before = stray.read_bytes()
    args = site.cli("down", site.backends["a"])
    args[args.index(str(site.upstream))] = str(stray)

    result = run_cli(args)

    assert result.returncode == 7, result.stderr
    assert f"{stray} is not part of nginx's configuration ({site.conf})" in result.stderr
    assert stray.read_bytes() == before
    assert sorted(p.name for p in stray.parent.iterdir()) == ["upstream.conf"]  # no litter
    assert set(site.who()) == set(NAMES)


def test_the_last_server_up_is_taken_out_only_with_force(site: Site) -> None:
    controller = site.controller()
    controller.down(site.backends["a"])
    controller.down(site.backends["b"])
    before = site.upstream.read_bytes()

    refused = run_cli(site.cli("down", site.backends["c"]))

    assert refused.returncode == 7, refused.stderr
    assert "is the last server" in refused.stderr and "--force" in refused.stderr
    assert site.upstream.read_bytes() == before
    assert set(site.who()) == {"c"}
    forced = run_cli([*site.cli("down", site.backends["c"]), "--force"])
    assert forced.returncode == 0, forced.stderr
    assert requests.get(site.url, headers={"Connection": "close"}, timeout=5).status_code == 502


def test_rollout_goes_through_an_upstream_with_nginx_s_default_passive_checks(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each node is marked down before anything else happens to it, so nginx's default
    max_fails=1 never sees it fail: a warning, not a refusal."""
    defaults = site.upstream.read_text().replace(" max_fails=0", "")
    site.upstream.write_text(defaults)
    seen = tmp_path / "seen"
    code = (
        "import sys, urllib.request\n"
        "who = {urllib.request.urlopen(sys.argv[1], timeout=5).read().decode() for _ in range(6)}\n"
        "open(sys.argv[2], 'a').write(sys.argv[3] + ' ' + ','.join(sorted(who)) + '\\n')\n"
    )
    code = code.replace("{", "{{").replace("}", "}}")
    restart = f"{sys.executable} -c {shlex.quote(code)} {site.url} {seen} {{index}}"

    assert cli.main(rollout_args(site, restart)) == 0

    out = capsys.readouterr().out
    assert "preflight: warning: " in out and "keeps nginx's default max_fails" in out
    assert "FAILED" not in out
    assert seen.read_text().splitlines() == ["0 b,c", "1 a,c", "2 a,b"]
    assert site.upstream.read_text() == defaults
    assert set(site.who(6)) == set(NAMES)

"""``graceful check-config``: the shipped integrations pass; each broken variant is reported.

The verb is built with its own parser (``add_verb`` on a fresh ``add_subparsers``), the way
``graceful.cli`` wires it, and run in-process: it only reads files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from graceful._tools.check_config import add_verb

INTEGRATIONS = Path(__file__).resolve().parent.parent / "integrations"
MANIFEST = INTEGRATIONS / "kubernetes" / "deployment.yaml"
UNIT = INTEGRATIONS / "systemd" / "graceful-app.service"
UPSTREAM = INTEGRATIONS / "nginx" / "upstream.conf"
PROXY = INTEGRATIONS / "nginx" / "graceful-proxy.conf"
NGINX_FILES = sorted((INTEGRATIONS / "nginx").glob("*.conf"))

# A whole nginx.conf: upstream nested in http {}, quotes, a location, client keep-alive.
FULL_CONF = """\
events { worker_connections 64; }
http {
    upstream app {
        server 127.0.0.1:8001 max_fails=0;
        server 127.0.0.1:8002 max_fails=0;
        keepalive 16;
        keepalive_timeout 3s;
    }
    keepalive_timeout 75s;  # after the upstream's block: the client side, not the upstream's
    server {
        listen 127.0.0.1:8080;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Note 'a ; b { c }';
            proxy_next_upstream error timeout http_503;
        }
    }
}
"""


@dataclass
class Result:
    code: int
    out: str
    err: str

    def lines(self, severity: str) -> list[str]:
        return [line for line in self.out.splitlines() if line.startswith(severity + ":")]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("GRACEFUL_") or key == "KUBERNETES_SERVICE_HOST":
            monkeypatch.delenv(key)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graceful")
    add_verb(parser.add_subparsers(dest="verb", required=True), None)
    return parser


@pytest.fixture
def check(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    def run(*argv: str | Path) -> Result:
        args = _parser().parse_args(["check-config", *map(str, argv)])
        assert args.needs_node is False  # cli.main calls run(args), without a node client
        code = args.run(args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def _variant(tmp_path: Path, source: Path, old: str, new: str) -> Path:
    text = source.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {source.name}: the test is out of date"
    target = tmp_path / source.name
    target.write_text(text.replace(old, new), encoding="utf-8")
    return target


# -- the shipped files ---------------------------------------------------------------------


def test_the_shipped_integrations_together_have_no_finding(
    check: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRACEFUL_REJECT_WHEN_DRAINING", "1")  # as the nginx snippet expects
    result = check(
        "--kubernetes", MANIFEST, "--systemd", UNIT, "--nginx", UPSTREAM, "--nginx", PROXY,
        "--server", "uvicorn",
    )  # fmt: skip
    assert result.code == 0, result.out
    [summary] = result.out.splitlines()
    assert summary.startswith("check-config: no problems; checked settings")
    for path in (MANIFEST, UNIT, UPSTREAM, PROXY):
        assert str(path) in summary


@pytest.mark.parametrize("conf", NGINX_FILES, ids=[p.name for p in NGINX_FILES])
def test_each_shipped_nginx_file_alone_has_no_error(
    check: Callable[..., Result], conf: Path
) -> None:
    result = check("--nginx", conf, "--server", "uvicorn")
    assert result.code == 0, result.out
    assert result.lines("error") == []


def test_the_shipped_upstream_and_graceful_gunicorn_agree_on_keepalive(
    check: Callable[..., Result],
) -> None:
    # upstream.conf keeps idle connections 4 s; graceful.gunicorn keeps them 5 s.
    result = check("--nginx", UPSTREAM, "--server", "gunicorn", "--stop-timeout", "30")
    assert result.code == 0, result.out
    assert result.lines("error") == []


def test_the_shipped_upstream_keepalive_is_too_long_for_gunicorn_alone(
    check: Callable[..., Result],
) -> None:
    # gunicorn without graceful's hooks closes idle connections after 2 s.
    result = check("--nginx", UPSTREAM, "--server-keepalive", "2", "--stop-timeout", "30")
    assert result.code == 1
    [error] = result.lines("error")
    assert error.startswith(f"error: {UPSTREAM}: upstream 'app'")
    assert "keepalive_timeout 4 s is not below the server's idle timeout" in error
    assert "raise the server's idle timeout to 5 s or more" in error


def test_a_whole_nginx_conf_with_nested_blocks_and_quotes_is_read(
    check: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRACEFUL_REJECT_WHEN_DRAINING", "1")
    conf = tmp_path / "nginx.conf"
    conf.write_text(FULL_CONF, encoding="utf-8")
    ok = check("--nginx", conf, "--server-keepalive", "3.5", "--stop-timeout", "30")
    assert (ok.code, ok.lines("error"), ok.lines("warning")) == (0, [], []), ok.out
    # The upstream's 3 s counts, not the http-level 75 s: 2 s is too short, 75 s is not needed.
    too_short = check("--nginx", conf, "--server-keepalive", "2", "--stop-timeout", "30")
    assert too_short.code == 1
    assert "keepalive_timeout 3 s is not below" in too_short.lines("error")[0]


# -- the settings and --stop-timeout -------------------------------------------------------


def test_settings_that_outlast_the_stop_timeout_are_an_error(check: Callable[..., Result]) -> None:
    result = check("--stop-timeout", "10")  # docker stop's default against 2 + 25 + 2
    assert result.code == 1
    [error] = result.lines("error")
    assert error.startswith("error: settings: delay (2 s) + drain_timeout (25 s) + server stop")
    assert "= 29 s does not fit --stop-timeout (10 s)" in error
    assert "raise --stop-timeout to at least 29 s" in error
    assert check("--stop-timeout", "29").code == 0  # exactly full still fits


def test_env_file_overrides_the_environment_and_flags_override_both(
    check: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRACEFUL_DELAY", "10")
    monkeypatch.setenv("GRACEFUL_DRAIN_TIMEOUT", "10")
    env_file = tmp_path / "graceful.env"
    env_file.write_text(
        "# the app's settings\n\nexport GRACEFUL_DRAIN_TIMEOUT='1'\nOTHER=x\n", encoding="utf-8"
    )
    assert check("--stop-timeout", "15").code == 1  # 10 + 10 + 2 from the environment
    assert check("--stop-timeout", "15", "--env-file", env_file).code == 0  # 10 + 1 + 2
    flagged = check("--stop-timeout", "15", "--env-file", env_file, "--delay", "20")
    assert flagged.code == 1
    assert "delay (20 s) + drain_timeout (1 s)" in flagged.lines("error")[0]
    assert check("--stop-timeout", "15", "--drain-timeout", "3").code == 0  # 10 + 3 + 2


def test_no_deadline_and_unknown_settings_are_warnings_only(
    check: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRACEFUL_DRAIN_TIMEOT", "5")  # a typo
    result = check()
    assert result.code == 0
    assert result.lines("error") == []
    typo, deadline = result.lines("warning")
    assert typo.startswith("warning: the environment: unknown setting GRACEFUL_DRAIN_TIMEOT")
    assert "give --stop-timeout S" in deadline
    assert result.out.splitlines()[-1].startswith("check-config: 0 error(s), 2 warning(s)")


# -- Kubernetes ----------------------------------------------------------------------------


def test_a_grace_period_shorter_than_the_budget_is_an_error(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    manifest = _variant(
        tmp_path, MANIFEST, "terminationGracePeriodSeconds: 35", "terminationGracePeriodSeconds: 20"
    )
    result = check("--kubernetes", manifest)
    assert result.code == 1
    [error] = result.lines("error")
    assert error.startswith(f"error: {manifest}: container 'app': delay (5 s) + drain_timeout")
    assert "does not fit terminationGracePeriodSeconds (20 s)" in error


def test_a_liveness_probe_on_readyz_is_an_error(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    manifest = _variant(tmp_path, MANIFEST, "path: /livez", "path: /readyz")
    result = check("--kubernetes", manifest)
    assert result.code == 1
    [error] = result.lines("error")
    assert "livenessProbe checks /readyz" in error
    assert "point it at /livez" in error


def test_a_slow_readiness_probe_is_a_warning_not_an_error(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    manifest = _variant(tmp_path, MANIFEST, "periodSeconds: 2\n", "periodSeconds: 10\n")
    result = check("--kubernetes", manifest)
    assert result.code == 0
    [warning] = result.lines("warning")
    assert f"warning: {manifest}: container 'app': readinessProbe notices a drain" in warning


def test_a_json_manifest_list_is_read_without_yaml(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    import yaml

    documents = list(yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")))
    documents[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 10
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"kind": "List", "items": documents}), encoding="utf-8")
    result = check("--kubernetes", listed)
    assert result.code == 1
    assert "does not fit terminationGracePeriodSeconds (10 s)" in result.lines("error")[0]


# -- systemd -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("TimeoutStopSec=35", "TimeoutStopSec=20", "does not fit TimeoutStopSec (20 s)"),
        ("KillMode=mixed", "KillMode=control-group", "KillMode=control-group: SIGTERM goes"),
        ("KillMode=mixed", "", "KillMode is not set (default control-group)"),
        ("KillSignal=SIGTERM", "KillSignal=SIGINT", "KillSignal=SIGINT: only SIGTERM drains"),
    ],
)
def test_a_unit_that_cuts_the_drain_short_is_an_error(
    check: Callable[..., Result], tmp_path: Path, old: str, new: str, expected: str
) -> None:
    unit = _variant(tmp_path, UNIT, old, new)
    result = check("--systemd", unit)
    assert result.code == 1
    [error] = result.lines("error")
    assert error.startswith(f"error: {unit}: ")
    assert expected in error


def test_a_unit_relying_on_the_default_stop_timeout_gets_a_warning(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    unit = _variant(tmp_path, UNIT, "TimeoutStopSec=35", "")
    result = check("--systemd", unit)
    assert result.code == 0  # 90 s covers 2 + 25 + 2
    [warning] = result.lines("warning")
    assert "TimeoutStopSec is not set" in warning


# -- nginx ---------------------------------------------------------------------------------


def test_keepalive_timeouts_must_be_strictly_ordered(check: Callable[..., Result]) -> None:
    assert check("--nginx", UPSTREAM, "--server-keepalive", "4", "--stop-timeout", "30").code == 1
    assert check("--nginx", UPSTREAM, "--server-keepalive", "4.5", "--stop-timeout", "30").code == 0
    # --server-keepalive wins over --server's default
    both = ("--server", "gunicorn", "--server-keepalive", "30", "--stop-timeout", "30")
    assert check("--nginx", UPSTREAM, *both).code == 0


def test_an_upstream_keepalive_without_a_timeout_keeps_connections_60_s(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    conf = _variant(tmp_path, UPSTREAM, "keepalive_timeout 4s;", "")
    result = check("--nginx", conf, "--server", "uvicorn", "--stop-timeout", "30")
    assert result.code == 1
    assert "keepalive_timeout 60 s is not below uvicorn --timeout-keep-alive" in result.out
    assert "set keepalive_timeout below 5s in the upstream" in result.out


def test_an_upstream_without_keepalive_has_no_ordering_to_check(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    conf = _variant(tmp_path, UPSTREAM, "keepalive 32;", "")
    result = check("--nginx", conf, "--server", "gunicorn", "--stop-timeout", "30")
    assert (result.code, result.lines("error"), result.lines("warning")) == (0, [], [])


def test_an_unknown_server_keepalive_is_a_warning(check: Callable[..., Result]) -> None:
    result = check("--nginx", UPSTREAM, "--stop-timeout", "30")
    assert result.code == 0
    [warning] = result.lines("warning")
    assert "keepalive_timeout 4 s; not checked" in warning
    assert "--server gunicorn|uvicorn or --server-keepalive S" in warning


def test_a_server_without_max_fails_0_is_an_error(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    conf = _variant(
        tmp_path, UPSTREAM, "server 127.0.0.1:8002 max_fails=0;", "server 127.0.0.1:8002;"
    )
    result = check("--nginx", conf, "--server", "uvicorn", "--stop-timeout", "30")
    assert result.code == 1
    [error] = result.lines("error")
    assert error.startswith(f"error: {conf}: upstream 'app' (line 15): server 127.0.0.1:8002 ")
    assert "no live upstreams" in error
    assert "add max_fails=0" in error


def test_max_fails_does_not_matter_for_a_single_server_or_a_backup(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    conf = tmp_path / "single.conf"
    conf.write_text(
        "upstream one { server 127.0.0.1:8001; }\n"
        "upstream spare { server 127.0.0.1:8002; server 127.0.0.1:8003 backup; }\n",
        encoding="utf-8",
    )
    result = check("--nginx", conf, "--stop-timeout", "30")
    assert (result.code, result.lines("error")) == (0, [])


def test_reject_mode_needs_nginx_to_retry_a_draining_node_s_503(
    check: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = _variant(tmp_path, PROXY, " http_503;", ";")
    assert check("--nginx", proxy, "--stop-timeout", "30").code == 0  # reject mode off: fine
    monkeypatch.setenv("GRACEFUL_REJECT_WHEN_DRAINING", "1")
    result = check("--nginx", proxy, "--stop-timeout", "30")
    assert result.code == 1
    [error] = result.lines("error")
    assert "proxy_next_upstream error timeout lacks http_503" in error
    assert "proxy_next_upstream error timeout http_503;" in error  # the fix, spelled out
    assert error.startswith(f"error: {proxy}: line ")


@pytest.mark.parametrize("reject_mode", ["0", "1"])
def test_non_idempotent_is_an_error_because_nginx_then_runs_a_post_twice(
    check: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reject_mode: str
) -> None:
    monkeypatch.setenv("GRACEFUL_REJECT_WHEN_DRAINING", reject_mode)
    proxy = _variant(tmp_path, PROXY, " http_503;", " http_503 non_idempotent;")
    result = check("--nginx", proxy, "--stop-timeout", "30")
    assert result.code == 1
    [error] = result.lines("error")
    assert error.startswith(f"error: {proxy}: line ")
    assert "non_idempotent" in error and "twice" in error
    assert "drop non_idempotent" in error


def test_reject_mode_without_any_retry_rule_in_sight_is_a_warning(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    env_file = tmp_path / "graceful.env"
    env_file.write_text("GRACEFUL_REJECT_WHEN_DRAINING=on\n", encoding="utf-8")
    args = ("--nginx", UPSTREAM, "--server", "uvicorn", "--stop-timeout", "30")
    result = check(*args, "--env-file", env_file)
    assert result.code == 0
    [warning] = result.lines("warning")
    assert "GRACEFUL_REJECT_WHEN_DRAINING is on but the nginx files given have no" in warning


# -- output and exit status 2 --------------------------------------------------------------


def test_json_output_lists_every_finding_with_its_severity(
    check: Callable[..., Result], tmp_path: Path
) -> None:
    unit = _variant(tmp_path, UNIT, "TimeoutStopSec=35", "")
    result = check("--json", "--systemd", unit, "--nginx", UPSTREAM, "--server-keepalive", "2")
    assert result.code == 1
    report = json.loads(result.out)
    assert (report["errors"], report["warnings"]) == (1, 1)
    assert [(f["severity"], f["source"]) for f in report["findings"]] == [
        ("warning", str(unit)),
        ("error", str(UPSTREAM)),
    ]


@pytest.mark.parametrize("option", ["--kubernetes", "--systemd", "--nginx", "--env-file"])
def test_a_missing_file_exits_2_naming_it(
    check: Callable[..., Result], tmp_path: Path, option: str
) -> None:
    missing = tmp_path / "nope.conf"
    result = check(option, missing)
    assert result.code == 2
    assert result.out == ""
    assert f"cannot read {missing}" in result.err


@pytest.mark.parametrize(
    ("name", "option", "text", "expected"),
    [
        (
            "bad.conf",
            "--nginx",
            "upstream app {\n  server a:1;\n",
            "block 'upstream' is not closed",
        ),
        ("bad.conf", "--nginx", "upstream app {\n  server a:1\n}\n", ":2: missing ';' after 'a:1'"),
        ("bad.conf", "--nginx", 'http { add_header X "open; }\n', ":1: unterminated quoted"),
        ("bad.conf", "--nginx", "}\n", ":1: '}' closes no block"),
        ("bad.conf", "--nginx", "upstream a { keepalive_timeout 4x; }", "keepalive_timeout='4x'"),
        ("svc.yaml", "--kubernetes", "kind: Service\nspec: {}\n", "no Pod or workload"),
        ("bad.yaml", "--kubernetes", "kind: [unclosed\n", "not YAML"),
        ("bad.json", "--kubernetes", '{"kind": ', "not JSON"),
        ("bad.service", "--systemd", "[Unit]\nDescription=x\n", "no [Service] section"),
        ("bad.service", "--systemd", "[Service]\nTimeoutStopSec=30x\n", "TimeoutStopSec='30x'"),
        ("bad.env", "--env-file", "GRACEFUL_DELAY=soon\n", "GRACEFUL_DELAY='soon' is not a"),
        ("bad.env", "--env-file", "GRACEFUL_DRAIN_TIMEOUT=-1\n", "drain_timeout"),
        ("bad.env", "--env-file", "# ok\nGRACEFUL_DELAY\n", ":2: 'GRACEFUL_DELAY' is not KEY="),
    ],
)
def test_a_file_that_cannot_be_parsed_exits_2_naming_it(
    check: Callable[..., Result],
    tmp_path: Path,
    name: str,
    option: str,
    text: str,
    expected: str,
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    result = check(option, path)
    assert result.code == 2, result.out
    assert result.err.startswith(f"graceful check-config: {path}") or str(path) in result.err
    assert expected in result.err


def test_a_bad_setting_in_the_environment_exits_2_naming_it(
    check: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRACEFUL_DRAIN_TIMEOUT", "-1")
    result = check()
    assert result.code == 2
    assert result.err.startswith("graceful check-config: settings from the environment: ")
    assert "drain_timeout" in result.err


@pytest.mark.parametrize(
    "argv",
    [["--delay", "soon"], ["--stop-timeout", "-1"], ["--server", "waitress"], ["--nginx"]],
)
def test_a_bad_command_line_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["check-config", *argv])
    assert exited.value.code == 2

"""``graceful check-config``: find the settings that lose requests before a deploy does.

Reads the library's settings (``GRACEFUL_*`` from the environment, ``--env-file`` files and a
few flags) and, where given, a Kubernetes manifest, a systemd unit and nginx files, then
reports one line per finding: ``error:`` for what fails requests, ``warning:`` for advice.

- Budget: delay + drain timeout + the server's stop must fit the kill deadline. The manifest's
  and the unit's checks are :mod:`graceful.budget`'s, with their own ``GRACEFUL_*`` settings
  (that is the environment the process gets there); the settings read here are held to
  ``--stop-timeout`` (``docker stop --time``, or any other deadline).
- Keep-alive ordering: an upstream with ``keepalive`` keeps idle connections to the nodes for
  its ``keepalive_timeout`` (default 60 s); the server's own idle timeout must be longer, or
  it closes a connection nginx is about to reuse.
- nginx's passive checks: a server without ``max_fails=0`` in a group of several can be marked
  failed while it restarts; a quick rollout can leave no live upstream at all.
- Reject mode (``GRACEFUL_REJECT_WHEN_DRAINING``): nginx must retry the draining node's 503
  (``proxy_next_upstream ... http_503``).
- ``non_idempotent`` in ``proxy_next_upstream``: nginx then sends a POST a node answered 503
  to, crashed or timed out on to the next node as well, and the app can run it twice.

Exit status: 0 nothing wrong (warnings allowed), 1 an error found, 2 a bad command line or a
file that cannot be read or parsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .._core import budget
from .._core.config import ENV_PREFIX, Config, ConfigError
from .._core.errors import GracefulError
from .options import seconds_type

__all__ = ["SERVER_KEEPALIVE", "Finding", "add_verb", "check", "run"]

OK, FOUND_ERRORS, UNREADABLE = 0, 1, 2

#: Idle keep-alive timeouts of the servers, by default, with the option that changes each:
#: gunicorn ``--keep-alive`` as ``graceful.gunicorn`` sets it (5 s; gunicorn alone: 2 s) and
#: uvicorn ``--timeout-keep-alive`` (5 s).
SERVER_KEEPALIVE = {"gunicorn": (5.0, "--keep-alive"), "uvicorn": (5.0, "--timeout-keep-alive")}
#: nginx's ``keepalive_timeout`` inside an ``upstream`` block, when not set.
NGINX_UPSTREAM_KEEPALIVE_TIMEOUT = 60.0
RETRY_RULE = "proxy_next_upstream error timeout http_503;"


#: ``error``: a setting that loses requests; ``warning``: advice.
Severity = Literal["error", "warning"]


class Unreadable(GracefulError):
    """A file cannot be read or parsed; the message names it. Exit status 2."""


@dataclasses.dataclass(frozen=True)
class Finding:
    severity: Severity
    source: str  # "settings", or the file it is about
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.source}: {self.message}"


def _finding(source: str, text: str) -> Finding:
    return Finding("error" if isinstance(text, budget.Problem) else "warning", source, text)


# -- the settings ---------------------------------------------------------------------------


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines, ``export``, quotes around the value)."""
    env: dict[str, str] = {}
    for number, raw in enumerate(_read(path).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise Unreadable(f"{path}:{number}: {line!r} is not KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def load_settings(
    environ: Mapping[str, str], env_files: Sequence[str], overrides: Mapping[str, float]
) -> tuple[Config, list[Finding]]:
    """The settings: ``environ``, then each env file, then ``overrides`` (later ones win)."""
    env, origin = dict(environ), dict.fromkeys(environ, "the environment")
    for path in env_files:
        values = read_env_file(path)
        env.update(values)
        origin.update(dict.fromkeys(values, path))
    unknown, known = budget._split_known({k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    findings = [
        Finding(
            "warning", origin[key], f"unknown setting {key} (ignored); known: {', '.join(known)}"
        )
        for key in unknown
    ]
    try:
        config = Config.from_env({k: v for k, v in env.items() if k not in unknown}, **overrides)
    except ConfigError as exc:
        text = str(exc)  # names GRACEFUL_X when it is not a number, else the setting x=...
        named = [
            origin[key]
            for key in origin
            if key.startswith(ENV_PREFIX)
            and key.removeprefix(ENV_PREFIX).lower() not in overrides
            and (key in text or key.removeprefix(ENV_PREFIX).lower() + "=" in text)
        ]
        source = named[0] if named else "the command line"
        raise Unreadable(f"settings from {source}: {exc}") from None
    return config, findings


# -- nginx ----------------------------------------------------------------------------------

_NGINX_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|(?P<punct>[{};])|(?P<quoted>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')"""
    r"""|(?P<word>[^\s{};"']+)"""
)


@dataclasses.dataclass
class _Upstream:
    name: str
    line: int
    servers: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    keepalive: bool = False
    keepalive_timeout: float = NGINX_UPSTREAM_KEEPALIVE_TIMEOUT


@dataclasses.dataclass
class _Nginx:
    upstreams: list[tuple[str, _Upstream]] = dataclasses.field(default_factory=list)
    retry_rules: list[tuple[str, int, list[str]]] = dataclasses.field(default_factory=list)


def _nginx_statements(text: str, path: str) -> Iterator[tuple[list[str], str, int]]:
    """Each statement of an nginx file: its words, what ends it (``;``, ``{``, ``}``), its line."""
    pos, line, start = 0, 1, 1
    words: list[str] = []
    while pos < len(text):
        match = _NGINX_TOKEN.match(text, pos)
        if match is None:  # an unclosed quote
            raise Unreadable(f"{path}:{line}: unterminated quoted string")
        if match.lastgroup in ("word", "quoted"):
            start = start if words else line
            words.append(match.group()[1:-1] if match.lastgroup == "quoted" else match.group())
        elif match.lastgroup == "punct":
            yield words, match.group(), start if words else line
            words = []
        line += match.group().count("\n")
        pos = match.end()
    if words:
        raise Unreadable(f"{path}:{start}: {words[0]!r} is not ended by ';'")


def parse_nginx(text: str, path: str, into: _Nginx) -> None:
    """Collect the upstream blocks and ``proxy_next_upstream`` lines of one nginx file.

    Not :func:`graceful.nginx.parse_upstreams`: that strict parser takes a managed upstream
    file only, and this one reads any configuration (quotes, ``http {}``, ``location {}``).
    """
    blocks: list[str] = []
    current: _Upstream | None = None
    for words, end, line in _nginx_statements(text, path):
        if end == "{":
            blocks.append(words[0] if words else "")
            if words[:1] == ["upstream"] and len(words) == 2:
                current = _Upstream(words[1], line)
                into.upstreams.append((path, current))
            continue
        if end == "}":
            if words:
                raise Unreadable(f"{path}:{line}: missing ';' after {words[-1]!r}")
            if not blocks:
                raise Unreadable(f"{path}:{line}: '}}' closes no block")
            if blocks.pop() == "upstream":
                current = None
            continue
        if not words:
            continue
        name, args = words[0], words[1:]
        if current is not None and name == "server" and args:
            current.servers.append((args[0], args[1:]))
        elif current is not None and name == "keepalive":
            current.keepalive = True
        elif current is not None and name == "keepalive_timeout" and args:
            try:
                current.keepalive_timeout = budget.parse_timespan(args[0], setting=name)
            except budget.BudgetError as exc:
                raise Unreadable(f"{path}:{line}: {exc}") from None
        elif name == "proxy_next_upstream":
            into.retry_rules.append((path, line, args))
    if blocks:
        raise Unreadable(f"{path}: block {blocks[-1]!r} is not closed by '}}'")


def _server_keepalive(server: str | None, seconds: float | None) -> tuple[float, str] | None:
    """The server's idle keep-alive timeout and how to name it in a finding."""
    if seconds is not None:
        options = " or ".join(f"{name} {option}" for name, (_, option) in SERVER_KEEPALIVE.items())
        return seconds, f"the server's idle timeout ({options}; --server-keepalive)"
    if server is None:
        return None
    default, option = SERVER_KEEPALIVE[server]
    source = "as graceful.gunicorn sets it" if server == "gunicorn" else "its default"
    return default, f"{server} {option} ({source})"


def nginx_findings(
    nginx: _Nginx, config: Config, server_keepalive: tuple[float, str] | None
) -> list[Finding]:
    findings: list[Finding] = []
    for path, upstream in nginx.upstreams:
        where = f"upstream {upstream.name!r} (line {upstream.line})"
        live = [(address, params) for address, params in upstream.servers if "backup" not in params]
        for address, params in live if len(live) > 1 else []:
            if "max_fails=0" not in params:
                findings.append(
                    Finding(
                        "error",
                        path,
                        f"{where}: server {address} has no max_fails=0: nginx's passive check "
                        "(default max_fails=1 fail_timeout=10s) marks a node that refuses or "
                        "answers 503 as failed, and a rollout can leave no live upstream "
                        "(502 'no live upstreams'); add max_fails=0 to the server line",
                    )
                )
        if not upstream.keepalive:
            continue  # no idle connections to the nodes: nothing to order
        idle = f"keepalive_timeout {upstream.keepalive_timeout:g} s"
        if server_keepalive is None:
            findings.append(
                Finding(
                    "warning",
                    path,
                    f"{where}: keeps idle connections to the nodes for {idle}; not checked "
                    "against the server's idle timeout: pass --server gunicorn|uvicorn or "
                    "--server-keepalive S",
                )
            )
        elif server_keepalive[0] <= upstream.keepalive_timeout:
            seconds, setting = server_keepalive
            enough = math.floor(upstream.keepalive_timeout) + 1
            findings.append(
                Finding(
                    "error",
                    path,
                    f"{where}: {idle} is not below {setting}, {seconds:g} s: the server "
                    "closes idle connections nginx is about to reuse, and requests sent on "
                    f"them fail; set keepalive_timeout below {seconds:g}s in the upstream, or "
                    f"raise the server's idle timeout to {enough} s or more",
                )
            )
    findings += _resend_findings(nginx)
    if config.reject_when_draining:
        findings += _retry_findings(nginx)
    return findings


def _resend_findings(nginx: _Nginx) -> list[Finding]:
    """``non_idempotent`` lets nginx send a POST, PATCH or LOCK again after a node had it."""
    return [
        Finding(
            "error",
            path,
            f"line {line}: proxy_next_upstream {' '.join(args)}: with non_idempotent nginx "
            "sends a POST, PATCH or LOCK to the next node after a node had it (its app "
            "answered 503, it crashed or timed out while running it), so the app can run it "
            "twice; drop non_idempotent (in reject mode graceful serves POST, PATCH and LOCK "
            f"while draining, so they need no retry): `{RETRY_RULE}`",
        )
        for path, line, args in nginx.retry_rules
        if "non_idempotent" in args
    ]


def _retry_findings(nginx: _Nginx) -> list[Finding]:
    if not nginx.retry_rules:
        return [
            Finding(
                "warning",
                "settings",
                "GRACEFUL_REJECT_WHEN_DRAINING is on but the nginx files given have no "
                "proxy_next_upstream: nginx's default (error timeout) hands a draining node's "
                f"503 to the client; where you proxy_pass, add `{RETRY_RULE}`",
            )
        ]
    findings = []
    for path, line, args in nginx.retry_rules:
        if "http_503" not in args:
            findings.append(
                Finding(
                    "error",
                    path,
                    f"line {line}: proxy_next_upstream {' '.join(args)} lacks http_503: with "
                    "GRACEFUL_REJECT_WHEN_DRAINING on, a draining node's 503 reaches the client "
                    f"instead of the next node; use `{RETRY_RULE}`",
                )
            )
    return findings


# -- files ----------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Unreadable(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def _manifests(path: str) -> list[Mapping[str, Any]]:
    """The documents of a manifest that hold a pod template (JSON, or YAML with PyYAML)."""
    items: list[Any] = []
    for doc in _documents(_read(path), path):
        is_list = isinstance(doc, Mapping) and doc.get("kind") == "List"
        items += (doc.get("items") or []) if is_list else [doc]
    found = [doc for doc in items if isinstance(doc, Mapping) and budget.pod_spec(doc) is not None]
    if not found:
        raise Unreadable(f"{path}: no Pod or workload with a pod template (spec.template.spec)")
    return found


def _documents(text: str, path: str) -> list[Any]:
    if text.lstrip().startswith("{"):
        try:
            return [json.loads(text)]
        except ValueError as exc:
            raise Unreadable(f"{path}: not JSON: {exc}") from None
    try:
        import yaml
    except ImportError:
        raise Unreadable(
            f"{path}: reading YAML needs PyYAML (pip install pyyaml); or give the manifest as "
            "JSON (kubectl get deployment NAME -o json)"
        ) from None
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise Unreadable(f"{path}: not YAML: {exc}") from None


def check(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[list[Finding], str]:
    """Every finding, and what was checked; raises :class:`Unreadable`."""
    overrides = {
        name: value
        for name, value in (("delay", args.delay), ("drain_timeout", args.drain_timeout))
        if value is not None
    }
    config, findings = load_settings(environ, args.env_file, overrides)
    checked = [f"settings (delay {config.delay:g} s, drain_timeout {config.drain_timeout:g} s)"]
    if args.stop_timeout is not None:
        budget_warnings = budget.check_budget(
            config, args.stop_timeout, deadline_name="--stop-timeout"
        )
        findings += [_finding("settings", text) for text in budget_warnings]
    for path in args.kubernetes:
        for manifest in _manifests(path):
            try:
                findings += [_finding(path, text) for text in budget.kubernetes_budget(manifest)]
            except budget.BudgetError as exc:
                raise Unreadable(f"{path}: {exc}") from None
    for path in args.systemd:
        try:
            findings += [_finding(path, text) for text in budget.systemd_budget(_read(path))]
        except budget.BudgetError as exc:
            raise Unreadable(f"{path}: {exc}") from None
    nginx = _Nginx()
    for path in args.nginx:
        parse_nginx(_read(path), path, nginx)
    if args.nginx:
        keepalive = _server_keepalive(args.server, args.server_keepalive)
        findings += nginx_findings(nginx, config, keepalive)
    if not (args.stop_timeout is not None or args.kubernetes or args.systemd):
        findings.append(
            Finding(
                "warning",
                "settings",
                "no kill deadline to check the budget against: give --stop-timeout S "
                "(docker stop --time, default 10), --kubernetes FILE or --systemd FILE",
            )
        )
    return findings, ", ".join(checked + args.kubernetes + args.systemd + args.nginx)


def run(args: argparse.Namespace) -> int:
    try:
        findings, checked = check(args, os.environ)
    except Unreadable as exc:
        print(f"graceful check-config: {exc}", file=sys.stderr)
        return UNREADABLE
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    if args.json:
        rows = [dataclasses.asdict(f) for f in findings]
        print(json.dumps({"errors": errors, "warnings": warnings, "findings": rows}, indent=2))
    else:
        for finding in findings:
            print(finding)
        verdict = f"{errors} error(s), {warnings} warning(s)" if findings else "no problems"
        print(f"check-config: {verdict}; checked {checked}")
    return FOUND_ERRORS if errors else OK


# -- the command line -----------------------------------------------------------------------


_seconds = seconds_type(allow_zero=True)


EPILOG = """exit codes:
  0  nothing wrong (warnings allowed)
  1  an error was found: a setting that loses requests
  2  bad command line, or a file that cannot be read or parsed (the message names it)

The manifest and the unit are checked with their own GRACEFUL_* settings (what the process gets
there); the settings from the environment, --env-file and the flags are held to --stop-timeout
and decide whether reject mode's nginx retry rule (http_503) is required. non_idempotent in a
proxy_next_upstream is an error in any mode: nginx can then run a POST twice."""


def add_verb(
    verbs: argparse._SubParsersAction[argparse.ArgumentParser], epilog: str | None
) -> None:
    """Add ``check-config`` to the ``graceful`` command's verbs.

    ``epilog`` is the command's shared one; check-config's exit codes differ, so it shows its own.
    """
    text = "check settings, a Kubernetes manifest, a systemd unit and nginx files for lost requests"
    sub = verbs.add_parser(
        "check-config",
        help=text,
        description=text,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = sub.add_argument
    add("--env-file", action="append", default=[], metavar="FILE", help="KEY=VALUE lines")
    add("--delay", type=_seconds, metavar="S", help="overrides GRACEFUL_DELAY")
    add("--drain-timeout", type=_seconds, metavar="S", help="overrides GRACEFUL_DRAIN_TIMEOUT")
    add(
        "--stop-timeout",
        type=_seconds,
        metavar="S",
        help="the settings' kill deadline: seconds from SIGTERM to SIGKILL (docker stop --time)",
    )
    add("--kubernetes", action="append", default=[], metavar="FILE", help="manifest")
    add("--systemd", action="append", default=[], metavar="FILE", help="service unit")
    add("--nginx", action="append", default=[], metavar="FILE", help="nginx configuration")
    add(
        "--server",
        choices=sorted(SERVER_KEEPALIVE),
        help="the app server, for its default idle keep-alive timeout (gunicorn under "
        "graceful.gunicorn 5 s, uvicorn 5 s; gunicorn alone: --server-keepalive 2)",
    )
    add(
        "--server-keepalive",
        type=_seconds,
        metavar="S",
        help="the server's idle keep-alive timeout",
    )
    add("--json", action="store_true", help="print the findings as JSON")
    sub.set_defaults(run=run, needs_node=False)

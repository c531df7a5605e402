"""The ``graceful`` command: talk to a node's probe and control routes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from .._core import protocol
from .._core.errors import GracefulError
from .._core.phases import Phase
from .._core.surface import MAX_WAIT
from . import check_config, demo, fetch, reload
from .options import count_type, seconds_type

__all__ = ["EXIT_CODES", "main"]

OK, FAILED, USAGE, UNREACHABLE, UNAUTHORIZED, CONTROL_OFF, TIMED_OUT = 0, 1, 2, 3, 4, 5, 6
BAD_EDIT, NGINX_REJECTED, NOT_APPLIED, ROLLOUT_STOPPED = 7, 8, 9, 10
INTERRUPTED = 130
EXIT_CODES = {
    OK: "success",
    FAILED: "the node refused or answered something unexpected (409: cannot drain while starting)",
    USAGE: "bad command line",
    UNREACHABLE: "the node could not be reached",
    UNAUTHORIZED: "401: missing or wrong token (--token or GRACEFUL_TOKEN)",
    CONTROL_OFF: "404: the node has no token configured, so its control routes are off",
    TIMED_OUT: "the node did not get there (or answer) within --timeout "
    "(nginx: another edit held the lock, or the reload was not confirmed: file restored)",
    BAD_EDIT: "nginx: the upstream file cannot be read, written or parsed, has no such "
    "upstream or server, is not part of nginx's configuration (nginx -T), or the edit would "
    "leave no server up (--force) (file untouched)",
    NGINX_REJECTED: "nginx: nginx -T or nginx -t rejected the configuration (file untouched or "
    "restored; nginx's message printed)",
    NOT_APPLIED: "nginx: no nginx master of this configuration runs (the pid file is missing, "
    "stale or names another process: nothing signalled), nginx could not run, or the master "
    "exited during the reload (file untouched or restored)",
    ROLLOUT_STOPPED: "rollout: a step failed; that node is out of rotation, the nodes not yet "
    "touched are in service (the output says which step and why)",
    INTERRUPTED: "interrupted (Ctrl-C)",
}

POLL_INTERVAL = 0.2


class Failure(GracefulError):
    """The command cannot go on: ``code`` is its exit status, the message says why."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _base_url(text: str) -> str:
    try:
        parsed = urllib.parse.urlsplit(text)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        parsed = urllib.parse.urlsplit("")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a node URL; expected http://HOST:PORT (or https://)"
        )
    if parsed.query or parsed.fragment:
        raise argparse.ArgumentTypeError(f"{text!r}: give the node's base URL without ?query or #")
    return text.rstrip("/")


_seconds = seconds_type()


def _path(text: str) -> str:
    if not text.startswith("/") or any(c in text for c in "?# "):
        raise argparse.ArgumentTypeError(f"{text!r} is not a path like /readyz")
    return text.rstrip("/") or "/"


def _request_path(text: str) -> str:
    """A path to GET, with a query string if it has one: ``/items.json?_size=20``."""
    path, _, query = text.partition("?")
    if not path.startswith("/") or any(c in text for c in "# \t\r\n") or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not a path like /version or /items?size=20")
    return (path.rstrip("/") or "/") + (f"?{query}" if query else "")


def _token(token: str | None) -> str | None:
    """The token, refused (never echoed) when no node could have it: nodes take printable ASCII
    only, and anything else cannot even be sent in a header."""
    if token is not None and not all(0x21 <= ord(ch) <= 0x7E for ch in token):
        raise Failure(
            USAGE, "the token (--token or GRACEFUL_TOKEN) is not printable ASCII without spaces"
        )
    return token


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        self.url: str = args.url
        self.prefix: str = args.prefix
        self.readyz: str = args.readyz_path
        self.timeout: float = args.timeout
        self.token: str | None = _token(args.token or os.environ.get("GRACEFUL_TOKEN") or None)

    def request(
        self,
        method: str,
        path: str,
        *,
        control: bool,
        timeout: float | None = None,
        params: dict[str, str] | None = None,
    ) -> fetch.Answer:
        headers = {}
        if control and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        timeout = self.timeout if timeout is None else timeout
        try:
            response = fetch.request(
                method, self.url + path, headers=headers, params=params, timeout=timeout
            )
        except fetch.NoAnswer:
            raise Failure(TIMED_OUT, f"{self.url}: no answer within {timeout:g}s") from None
        except fetch.Unreachable as exc:
            raise Failure(UNREACHABLE, f"{self.url}: cannot connect ({exc})") from None
        if control:
            self._check_control(response)
        return response

    def _check_control(self, response: fetch.Answer) -> None:
        if response.status_code == 401:
            hint = (
                "wrong token"
                if self.token
                else "no token given: pass --token or set GRACEFUL_TOKEN"
            )
            raise Failure(UNAUTHORIZED, f"{self.url}: 401 unauthorized ({hint})")
        if response.status_code == 404:
            raise Failure(
                CONTROL_OFF,
                f"{self.url}: 404: control routes are off (the node has no GRACEFUL_TOKEN) "
                f"or not under {self.prefix}",
            )
        if response.status_code not in (200, 202):
            raise Failure(FAILED, f"{self.url}: {response.status_code}: {_output(response)}")

    def readiness(self, timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        response = self.request(
            "GET", self.readyz, control=False, timeout=self.timeout if timeout is None else timeout
        )
        return response.status_code, _body(response)


def _body(response: fetch.Answer) -> dict[str, Any]:
    return response.json_object()


def _output(response: fetch.Answer) -> str:
    return str(_body(response).get("output") or response.text[:200].strip() or response.reason)


def _status(client: Client, response: fetch.Answer) -> protocol.Status:
    """The status document a control route answered, typed; FAILED when it is not one."""
    try:
        return protocol.Status.from_json(response.content)
    except protocol.ProtocolError as exc:
        raise Failure(FAILED, f"{client.url}: {response.status_code}: {exc}") from None


def _summary(status: protocol.Status) -> str:
    parts = [f"phase={status.phase}", f"inflight={status.inflight}"]
    if status.reason:
        parts.append(f"reason={status.reason!r}")
    if status.oldest_request_age is not None:
        parts.append(f"oldest={status.oldest_request_age}s")
    return " ".join(parts)


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    response = client.request(
        "GET", protocol.control_path(protocol.STATUS, client.prefix), control=True
    )
    status = _status(client, response)  # refused when it is not a status document
    if args.json:  # the whole document as the node sent it, newer fields included
        print(json.dumps(_body(response), indent=2, sort_keys=True))
    else:
        print(f"{client.url} {_summary(status)}")
    return OK


def cmd_drain(client: Client, args: argparse.Namespace) -> int:
    if args.wait and args.timeout > MAX_WAIT:
        raise Failure(
            USAGE,
            f"--timeout {args.timeout:g}: drain --wait waits at most {MAX_WAIT:g}s (the node's "
            "bound); for longer, drain without --wait, then "
            "`graceful wait URL --for drained --timeout S`",
        )
    params = {"wait": "1", "timeout": f"{args.timeout:g}"} if args.wait else None
    timeout = args.timeout + 5 if args.wait else args.timeout
    response = client.request(
        "POST",
        protocol.control_path(protocol.DRAIN, client.prefix),
        control=True,
        params=params,
        timeout=timeout,
    )
    status = _status(client, response)
    if args.wait and response.status_code == 202:
        print(
            f"{client.url} still draining after {args.timeout:g}s: {_summary(status)}",
            file=sys.stderr,
        )
        return TIMED_OUT
    print(f"{client.url} {_summary(status)}")
    return OK


def cmd_resume(client: Client, args: argparse.Namespace) -> int:
    path = protocol.control_path(protocol.RESUME, client.prefix)
    status = _status(client, client.request("POST", path, control=True))
    print(f"{client.url} {_summary(status)}")
    return OK


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    want: Callable[[int, dict[str, Any]], bool]
    if args.target == "ready":
        want = lambda code, body: code == 200  # noqa: E731
    else:
        done = (Phase.DRAINED.value, Phase.STOPPING.value)
        want = lambda code, body: body.get("phase") in done  # noqa: E731
    last = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            print(
                f"graceful: {client.url} not {args.target} after {args.timeout:g}s (last: {last})",
                file=sys.stderr,
            )
            return TIMED_OUT
        try:
            # --timeout bounds the whole wait: no request may outlast the time left.
            code, body = client.readiness(timeout=remaining)
        except Failure as failure:
            last = str(failure)
        else:
            if want(code, body):
                print(f"{client.url} {args.target}")
                return OK
            last = f"{code} {body.get('output', '')}".strip()
        time.sleep(max(0.0, min(POLL_INTERVAL, deadline - time.monotonic())))


def _route_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--prefix", type=_path, default=protocol.CONTROL_PREFIX, help="control route prefix"
    )
    sub.add_argument(
        "--readyz-path", type=_path, default=protocol.READYZ_PATH, help="readiness route"
    )


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="graceful",
        description="Drain, resume and watch nodes that run the graceful-drain middleware.",
        epilog=f"exit codes:\n{codes}\n\nThe token comes from --token or GRACEFUL_TOKEN.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"graceful-drain {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_text: str, default_timeout: float) -> argparse.ArgumentParser:
        sub = verbs.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=parser.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument(
            "url", type=_base_url, metavar="URL", help="the node, e.g. http://10.0.0.5:8000"
        )
        sub.add_argument("--token", help="bearer token (default: $GRACEFUL_TOKEN)")
        _route_options(sub)
        sub.add_argument(
            "--timeout",
            type=_seconds,
            default=default_timeout,
            help=f"seconds (default {default_timeout:g})",
        )
        return sub

    status = verb("status", "show a node's phase and in-flight work", 10.0)
    status.add_argument("--json", action="store_true", help="print the whole status as JSON")
    status.set_defaults(run=cmd_status)
    drain = verb("drain", "start a drain: readiness fails, requests are still served", 10.0)
    drain.add_argument("--wait", action="store_true", help="answer once the node is drained")
    drain.set_defaults(run=cmd_drain)
    verb("resume", "give a drained or draining node its traffic back", 10.0).set_defaults(
        run=cmd_resume
    )
    wait = verb(
        "wait",
        "poll a node's readiness until it is ready or drained; a node that cannot be reached "
        "is retried until --timeout (a bound on the whole wait), then exit 6 naming the last "
        "error",
        60.0,
    )
    wait.add_argument("--for", dest="target", choices=("ready", "drained"), required=True)
    wait.set_defaults(run=cmd_wait)
    _nginx_verbs(verbs, parser.epilog)
    _rollout_verb(verbs, parser.epilog)
    check_config.add_verb(verbs, parser.epilog)
    demo.add_verb(verbs, parser.epilog)
    reload.add_verb(verbs, parser.epilog)
    return parser


def cmd_nginx(args: argparse.Namespace) -> int:
    from .._balancers import nginx

    controller = nginx.UpstreamController(
        args.upstream_file,
        args.upstream,
        nginx_bin=args.nginx_bin,
        conf=args.nginx_conf,
        prefix=args.nginx_prefix,
        pid_file=args.pid_file,
        timeout=args.timeout,
        lock_timeout=args.timeout,
    )
    try:
        if args.action == "status":
            servers = controller.status()
            if args.json:
                rows = [
                    {"address": s.address, "state": s.state, "params": s.params} for s in servers
                ]
                print(json.dumps({"upstream": args.upstream, "servers": rows}, indent=2))
            for server in [] if args.json else servers:
                params = " ".join(p for p in server.params if p != "down")
                print(f"{server.address} {server.state} {params}".rstrip())
            return OK
        change = (
            controller.down(args.server, force=args.force)
            if args.action == "down"
            else controller.up(args.server)
        )
    except (
        nginx.UpstreamFileError,
        nginx.UnknownUpstreamError,
        nginx.UnknownServerError,
        nginx.LastServerError,
    ) as exc:
        raise Failure(BAD_EDIT, str(exc)) from None
    except nginx.ValidationError as exc:
        raise Failure(NGINX_REJECTED, str(exc)) from None
    except TimeoutError as exc:
        raise Failure(TIMED_OUT, str(exc)) from None
    except nginx.ReloadError as exc:
        raise Failure(NOT_APPLIED, str(exc)) from None
    done = (
        f"{change.seconds:.2f}s, nginx reloaded" if change.changed else "already, nothing changed"
    )
    print(f"{args.upstream} {change.server.address} {change.server.state} ({done})")
    return OK


def _nginx_verbs(verbs: Any, epilog: str | None) -> None:
    nginx = verbs.add_parser(
        "nginx",
        help="mark a server of an nginx upstream down or up (validate, reload, confirm)",
        description="Edit the server lines of one upstream in a file of its own: status, down, "
        "up. Each edit is locked, made only in a file nginx -T lists, written atomically "
        "(FILE.prev keeps the previous content), checked with nginx -t, reloaded by a SIGHUP to "
        "the master once its pid is confirmed to be the nginx master of that configuration, and "
        "confirmed; any failure after the write restores the file. down refuses to take out the "
        "last server that is up unless --force.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = nginx.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (
        ("status", "list the upstream's servers and their state (from the file)"),
        ("down", "mark a server down, validate, reload nginx and wait for new workers"),
        ("up", "remove a server's down, validate, reload nginx and wait for new workers"),
    ):
        sub = actions.add_parser(
            action,
            help=text,
            description=text,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if action == "status":
            sub.add_argument("--json", action="store_true", help="print the servers as JSON")
        if action == "down":
            sub.add_argument(
                "--force",
                action="store_true",
                help="take the server out even when it is the last one up (nginx then answers "
                "502 to every request)",
            )
        if action != "status":
            sub.add_argument(
                "server", metavar="SERVER", help="its address as on the server line (or a URL)"
            )
        sub.add_argument("--upstream-file", required=True, metavar="FILE", help="managed file")
        sub.add_argument("--upstream", required=True, metavar="NAME", help="the upstream's name")
        sub.add_argument("--nginx-bin", default="nginx", metavar="PATH", help="default: nginx")
        sub.add_argument("--nginx-conf", metavar="PATH", help="nginx -c (default: nginx's own)")
        sub.add_argument("--nginx-prefix", metavar="PATH", help="nginx -p (default: nginx's own)")
        sub.add_argument("--pid-file", metavar="PATH", help="default: from the conf's pid line")
        sub.add_argument(
            "--timeout", type=_seconds, default=10.0, help="seconds per step (default 10)"
        )
        sub.set_defaults(run=cmd_nginx, needs_node=False)


def cmd_rollout(args: argparse.Namespace) -> int:
    from . import rollout

    token = _token(args.token or os.environ.get("GRACEFUL_TOKEN") or None)
    try:
        nodes = rollout.make_nodes(args.node)
        balancer = _balancer(args)
        plan = rollout.Rollout(
            nodes,
            balancer,
            restart=args.restart,
            before_restart=args.before_restart,
            verify=args.verify,
            token=token,
            batch=args.batch,
            drain_timeout=args.drain_timeout,
            ready_timeout=args.ready_timeout,
            restart_timeout=args.restart_timeout,
            settle=args.settle,
            prefix=args.prefix,
            readyz=args.readyz_path,
            out=lambda line: print(line, flush=True),
        )
    except rollout.RolloutUsageError as exc:
        raise Failure(USAGE, str(exc)) from None
    if args.dry_run:
        for line in plan.plan():
            print(line)
        return OK
    try:
        ok = plan.run()
    finally:
        if args.log_json:
            plan.write_timeline(args.log_json)
    return OK if ok else ROLLOUT_STOPPED


def _balancer(args: argparse.Namespace) -> Any:
    from .._balancers import haproxy, nginx
    from . import rollout

    nginx_given = [o for o in ("nginx_upstream_file", "nginx_upstream") if getattr(args, o)]
    haproxy_given = [o for o in ("haproxy_socket", "haproxy_backend") if getattr(args, o)]

    def flags(names: list[str]) -> str:
        return ", ".join("--" + name.replace("_", "-") for name in names)

    if args.lb != "nginx" and args.force:
        nginx_given.append("force")
    if args.lb != "nginx" and nginx_given:
        raise rollout.RolloutUsageError(f"{flags(nginx_given)}: only for --lb nginx")
    if args.lb != "haproxy" and haproxy_given:
        raise rollout.RolloutUsageError(f"{flags(haproxy_given)}: only for --lb haproxy")
    if args.lb == "nginx":
        if len(nginx_given) < 2:
            raise rollout.RolloutUsageError(
                "--lb nginx needs --nginx-upstream-file FILE and --nginx-upstream NAME"
            )
        controller = nginx.UpstreamController(
            args.nginx_upstream_file,
            args.nginx_upstream,
            nginx_bin=args.nginx_bin,
            conf=args.nginx_conf,
            prefix=args.nginx_prefix,
            pid_file=args.nginx_pid_file,
        )
        return rollout.NginxBalancer(controller, force=args.force)
    if args.lb == "haproxy":
        if len(haproxy_given) < 2:
            raise rollout.RolloutUsageError(
                "--lb haproxy needs --haproxy-socket PATH and --haproxy-backend NAME"
            )
        api = haproxy.RuntimeAPI(args.haproxy_socket)
        return rollout.HAProxyBalancer(
            api,
            args.haproxy_backend,
            drain_timeout=args.drain_timeout,
            ready_timeout=args.ready_timeout,
        )
    return rollout.NoBalancer(args.lb)


_count = count_type(minimum=1)


def _rollout_verb(verbs: Any, epilog: str | None) -> None:
    sub = verbs.add_parser(
        "rollout",
        help="restart every node behind a load balancer, a batch at a time, losing nothing",
        description="For each node: cut its traffic at the load balancer, drain it, run "
        "--before-restart, run --restart, wait for /readyz, check each --verify path, give its "
        "traffic back. The first failure stops the rollout: that node stays out of rotation, "
        "the nodes not yet touched stay in service. Commands are split like a shell would (no "
        "shell runs them) and {url} {host} {port} {index} are filled in (index from 0).",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument(
        "--node", action="append", required=True, type=_base_url, metavar="URL",
        help="a node's base URL, e.g. http://10.0.0.5:8000 (repeat, in rollout order)",
    )  # fmt: skip
    sub.add_argument(
        "--restart",
        required=True,
        metavar="CMD",
        help="restarts one node; done when the command exits (a server it starts in the "
        "background may keep running)",
    )
    sub.add_argument(
        "--lb",
        choices=("nginx", "haproxy", "readiness", "none"),
        default="readiness",
        help="how traffic is cut (default readiness: the load balancer polls /readyz)",
    )
    sub.add_argument("--nginx-upstream-file", metavar="FILE", help="managed upstream file")
    sub.add_argument("--nginx-upstream", metavar="NAME", help="the upstream's name")
    sub.add_argument("--nginx-bin", default="nginx", metavar="PATH", help="default: nginx")
    sub.add_argument("--nginx-conf", metavar="PATH", help="nginx -c (default: nginx's own)")
    sub.add_argument("--nginx-prefix", metavar="PATH", help="nginx -p (default: nginx's own)")
    sub.add_argument("--nginx-pid-file", metavar="PATH", help="default: from the conf's pid line")
    sub.add_argument(
        "--force",
        action="store_true",
        help="--lb nginx: go on even when a node is the last server up (nginx then answers 502 "
        "while it restarts)",
    )
    sub.add_argument("--haproxy-socket", metavar="PATH", help="runtime API socket (level admin)")
    sub.add_argument("--haproxy-backend", metavar="NAME", help="the backend holding the nodes")
    sub.add_argument(
        "--verify", action="append", default=[], type=_request_path, metavar="PATH",
        help="GET it (a path, with a query string if any) on the restarted node directly; "
        "must answer 2xx (repeatable)",
    )  # fmt: skip
    sub.add_argument("--before-restart", metavar="CMD", help="run before each restart")
    sub.add_argument("--token", help="bearer token (default: $GRACEFUL_TOKEN); drains nodes")
    sub.add_argument("--batch", type=_count, default=1, metavar="N", help="nodes at a time")
    for name, default, what in (
        ("--drain-timeout", 60.0, "wait for a node to drain"),
        ("--ready-timeout", 60.0, "wait for /readyz (and HAProxy's check) after a restart"),
        ("--restart-timeout", 120.0, "let each command run"),
    ):
        sub.add_argument(
            name, type=_seconds, default=default, metavar="S", help=f"{what} (default {default:g})"
        )
    sub.add_argument(
        "--settle", type=seconds_type(allow_zero=True), metavar="S",
        help="after giving a node its traffic back, wait S seconds for the load balancer's own "
        "checks to admit it before the next node (default 2 with --lb readiness, else 0: the "
        "rollout confirms nginx and haproxy itself)",
    )  # fmt: skip
    _route_options(sub)
    sub.add_argument("--dry-run", action="store_true", help="print the plan, touch nothing")
    sub.add_argument("--log-json", metavar="FILE", help="write a JSON timeline of every step")
    sub.set_defaults(run=cmd_rollout, needs_node=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "needs_node", True):
            code: int = args.run(Client(args), args)
        else:
            code = args.run(args)
    except Failure as failure:
        print(f"graceful: {failure}", file=sys.stderr)
        return failure.code
    except KeyboardInterrupt:
        return INTERRUPTED
    return code

"""``graceful demo --app MODULE:APP``: the rounds of the demo run on the user's own app.

- :func:`detect`: WSGI or ASGI, found in a child process (this Python, the current directory on
  ``sys.path`` as servers put it), so the user's app is never imported into the demo; an import
  that fails is one line saying why.
- :func:`choose_server`: the server that serves that kind (``--server``, or the first installed).
- :func:`write_module`: a small module in the demo's folder that imports the app and exposes
  ``plain`` (the app behind the demo's recorder, :mod:`graceful._tools.demo_recorder`) and
  ``wrapped`` (the same behind :class:`graceful.WSGIMiddleware` or
  :class:`graceful.ASGIMiddleware`, built on first access); :func:`node_env` puts that folder
  and the current directory on the nodes' ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Literal

from .demo import (
    INSTALL_HINT,
    SERVERS,
    DemoError,
    NodeApp,
    Processes,
    ServerName,
    Settings,
    child_env,
    gunicorn_script,
    installed,
    tail,
)
from .demo_recorder import LEDGER_ENV

__all__ = [
    "WRAPPED_MODULE",
    "AppKind",
    "UserApp",
    "app_spec",
    "choose_server",
    "detect",
    "node_app",
    "node_env",
    "resolve",
    "serving",
    "url_path",
    "write_module",
]

AppKind = Literal["wsgi", "asgi"]
#: The module the demo writes in its folder for the nodes.
WRAPPED_MODULE = "graceful_demo_wrapped"
#: Bound on importing the user's app to tell its kind.
DETECT_TIMEOUT = 60.0
#: The servers the demo runs a WSGI app with; an ASGI app: every one (gunicorn with
#: ``uvicorn_worker.UvicornWorker``).
WSGI_SERVERS: tuple[ServerName, ...] = ("gunicorn", "granian")
UVICORN_WORKER = "uvicorn_worker"


@dataclasses.dataclass(frozen=True)
class UserApp:
    """``--app`` and what the demo sends it."""

    spec: str
    kind: AppKind
    #: ``--path``: every GET goes there; the naive nodes are ready once it answers below 500.
    path: str
    #: ``--post-path``: every other request is a POST there; None: GETs only.
    post_path: str | None

    @property
    def module(self) -> str:
        return self.spec.partition(":")[0]


# -- options ------------------------------------------------------------------------------------


def app_spec(text: str) -> str:
    """``--app``: ``MODULE:APP``, both dotted names (``shop.app:app``,
    ``mysite.wsgi:application``)."""
    module, colon, name = text.partition(":")
    dotted = all(part.isidentifier() for part in module.split(".")) and all(
        part.isidentifier() for part in name.split(".")
    )
    if not colon or not module or not name or not dotted:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give MODULE:APP, the module's dotted name and the app's name in it, "
            "as gunicorn and uvicorn take them (e.g. shop.app:app, mysite.wsgi:application); "
            "an app object, not a factory call"
        )
    return text


def url_path(text: str) -> str:
    """``--path`` / ``--post-path``: a path on the app, starting with ``/``."""
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r}: a path starts with / (e.g. /, /orders)")
    if any(char.isspace() or ord(char) < 0x20 or char == "\x7f" for char in text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: no spaces or control characters in a path; percent-encode them"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--app",
        type=app_spec,
        metavar="MODULE:APP",
        help="run the rounds on your WSGI or ASGI app (imported from the current directory; "
        "Django: set DJANGO_SETTINGS_MODULE) instead of the demo's own; the demo wraps it "
        "with graceful's middleware itself in the graceful round",
    )
    add(
        "--path",
        type=url_path,
        metavar="PATH",
        help="with --app: where the GETs go (default /); any answer below 500 is the app's",
    )
    add(
        "--post-path",
        type=url_path,
        metavar="PATH",
        help="with --app: every other request is a POST there (a JSON body and an "
        "X-Graceful-Demo-Id header); default: GETs only",
    )


# -- what the app is ----------------------------------------------------------------------------

#: Run by the child: import the app, print its kind (or why not) after a marker line.
DETECT_SCRIPT = """\
import importlib, inspect, json, os, sys
sys.path.insert(0, os.getcwd())
spec, marker = sys.argv[1], sys.argv[2]
def say(**document):
    sys.stdout.write("\\n" + marker + json.dumps(document) + "\\n")
    sys.stdout.flush()
    os._exit(0)
module, _, name = spec.partition(":")
try:
    target = importlib.import_module(module)
except BaseException as exc:
    say(error=f"cannot import {module}: {type(exc).__name__}: {exc}")
for part in name.split("."):
    try:
        target = getattr(target, part)
    except Exception as exc:
        say(error=f"cannot find {name} in {module}: {type(exc).__name__}: {exc}")
if not callable(target):
    kind = type(target).__name__
    say(error=f"{name} in {module} is not a WSGI or ASGI app (not callable: {kind})")
wrapped = type(target).__module__.split(".")[0] == "graceful"
call = getattr(target, "__call__", None)
asgi = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)
say(kind="asgi" if asgi else "wsgi", wrapped=wrapped, type=type(target).__qualname__)
"""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def detect(spec: str, processes: Processes, folder: Path) -> AppKind:
    """The kind of ``spec``'s app, told by a child process that imports it; :class:`DemoError`
    (one line) when it cannot be imported or is not an app."""
    marker = f"graceful-demo-detect-{uuid.uuid4().hex}:"
    log = folder / "detect.log"
    argv = [sys.executable, "-c", DETECT_SCRIPT, spec, marker]
    env = child_env({})  # the user's environment (DJANGO_SETTINGS_MODULE), graceful's left out
    proc = processes.start(argv, log, env, cwd=os.getcwd())
    try:
        proc.wait(DETECT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DemoError(
            f"--app {spec}: importing it took more than {DETECT_TIMEOUT:g}s; does the module "
            "start something at import? give the app object a server would import"
        ) from None
    output = log.read_text(errors="replace").splitlines()
    found = [line[len(marker) :] for line in output if line.startswith(marker)]
    if not found:
        last = _one_line(tail(log, 1)) or "no output"
        raise DemoError(
            f"--app {spec}: cannot import {spec.partition(':')[0]}: the import exited with "
            f"status {proc.returncode} ({last})"
        )
    answer = json.loads(found[-1])
    if "error" in answer:
        raise DemoError(f"--app {spec}: {_one_line(str(answer['error']))}")
    if answer.get("wrapped"):
        raise DemoError(
            f"--app {spec}: the app is already behind graceful's middleware "
            f"({answer.get('type')}); give the app without it: the demo runs it without the "
            "library in the naive round and wraps it itself in the graceful one"
        )
    kind: AppKind = "asgi" if answer.get("kind") == "asgi" else "wsgi"
    return kind


# -- which server -------------------------------------------------------------------------------


def serving(kind: AppKind) -> tuple[ServerName, ...]:
    """The servers the demo runs an app of ``kind`` with, in the order of the default."""
    return WSGI_SERVERS if kind == "wsgi" else SERVERS


def _usable(server: ServerName, kind: AppKind) -> bool:
    if not installed(server):
        return False
    return server != "gunicorn" or kind == "wsgi" or installed(UVICORN_WORKER)


def choose_server(spec: str, kind: AppKind, given: ServerName | None, in_place: bool) -> ServerName:
    """``--server``, checked against the app's kind, or the first installed that serves it;
    ``in_place`` (``--nodes 1``, restarted with graceful reload): gunicorn for a WSGI app,
    uvicorn for an ASGI one."""
    candidates = serving(kind)
    if in_place:
        candidates = ("gunicorn",) if kind == "wsgi" else ("uvicorn",)
    names = " or ".join(f"--server {server}" for server in candidates)
    what = f"a {kind.upper()} app"
    if given is not None:
        if given not in candidates:
            one = " with --nodes 1" if in_place else ""
            raise DemoError(
                f"--app {spec} is {what} and the demo does not run {what} on {given}{one}; "
                f"{kind.upper()} apps run on {', '.join(candidates)}: give {names}"
            )
        if given == "gunicorn" and kind == "asgi" and not installed(UVICORN_WORKER):
            raise DemoError(
                f"--app {spec} is {what}: gunicorn serves it with "
                "uvicorn_worker.UvicornWorker, which is not installed; pip install "
                "uvicorn-worker, or give --server uvicorn"
            )
        return given
    for server in candidates:
        if _usable(server, kind):
            return server
    raise DemoError(
        f"--app {spec} is {what} and none of the servers that run it here is installed "
        f"({', '.join(candidates)}); install one: pip install 'graceful-drain[client,"
        f"{candidates[0]}]'"
    )


# -- the nodes' module ---------------------------------------------------------------------------

MODULE_SOURCE = '''\
"""Written by graceful demo for its nodes: {spec} behind the demo's recorder (plain: the naive
rounds), and behind graceful.{middleware} too (wrapped: the graceful round; built on first
access, so a plain node never creates graceful's lifecycle)."""

import importlib

from graceful._tools.demo_recorder import {recorder}

_app = importlib.import_module({module!r})
for _name in {names!r}:
    _app = getattr(_app, _name)
plain = {recorder}(_app)
_built = {{}}


def __getattr__(name):
    if name != "wrapped":
        raise AttributeError(f"module {{__name__!r}} has no attribute {{name!r}}")
    if name not in _built:
        import graceful

        _built[name] = graceful.{middleware}(plain)
    return _built[name]
'''


def write_module(app: UserApp, folder: Path) -> Path:
    """Write :data:`WRAPPED_MODULE` into ``folder`` for ``app``; its path."""
    module, _, name = app.spec.partition(":")
    prefix = "WSGI" if app.kind == "wsgi" else "ASGI"
    path = folder / f"{WRAPPED_MODULE}.py"
    path.write_text(
        MODULE_SOURCE.format(
            spec=app.spec,
            module=module,
            names=tuple(name.split(".")),
            recorder=f"{prefix}Recorder",
            middleware=f"{prefix}Middleware",
        )
    )
    return path


def node_app(app: UserApp) -> NodeApp:
    """What the nodes serve: the written module's ``plain`` and ``wrapped``."""
    return NodeApp(WRAPPED_MODULE, "plain", "wrapped", app.kind)


def node_env(folder: Path, ledger: Path) -> dict[str, str]:
    """The nodes' ``PYTHONPATH`` (the demo's folder, then the current directory, then what was
    there) and the round's ledger dir for the recorder."""
    path = [str(folder), os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path), LEDGER_ENV: str(ledger)}


# -- all of it ------------------------------------------------------------------------------------


def resolve(
    settings: Settings, args: argparse.Namespace, processes: Processes, folder: Path
) -> Settings:
    """``settings`` for ``--app``: its kind told, its server chosen and checked, the nodes'
    module written into ``folder``."""
    spec: str = args.app
    kind = detect(spec, processes, folder)
    in_place = settings.via == "direct"
    server = choose_server(spec, kind, args.server, in_place)
    if not installed(server):
        hint = INSTALL_HINT.replace("uvicorn", server)
        raise DemoError(f"--server {server}: {server} is not installed; install it: {hint}")
    if in_place and server == "gunicorn" and gunicorn_script() is None:
        raise DemoError(
            f"--nodes 1 with a WSGI app runs gunicorn's console script, which is not beside "
            f"{sys.executable}; install gunicorn into this Python's environment, or give "
            "--nodes 2 or more"
        )
    app = UserApp(spec, kind, args.path or "/", args.post_path)
    write_module(app, folder)
    return dataclasses.replace(settings, server=server, app=app)

"""integrations/: the Kubernetes, systemd and Docker files parsed and held to the budget, and
every README under integrations/ held to the files it describes (each file path it names exists;
each nginx or HAProxy directive and option it quotes is in the shipped configuration)."""

from __future__ import annotations

import configparser
import contextlib
import copy
import dataclasses
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

from graceful import Config
from graceful._balancers import haproxy as haproxy
from graceful._balancers import nginx as nginx
from graceful._tools import cli as cli
from graceful.budget import (
    DOCKER_STOP_TIMEOUT,
    SERVER_STOP,
    check_budget,
    kubernetes_budget,
    parse_timespan,
    systemd_budget,
)

INTEGRATIONS = Path(__file__).resolve().parent.parent / "integrations"
MANIFEST = INTEGRATIONS / "kubernetes" / "deployment.yaml"
UNIT = INTEGRATIONS / "systemd" / "graceful-app.service"
SOCKET_UNIT = INTEGRATIONS / "systemd" / "graceful-app.socket"
DOCKERFILE = INTEGRATIONS / "docker" / "Dockerfile"

# -- Kubernetes ----------------------------------------------------------------------------


def load_manifest() -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")))
    return {doc["kind"]: doc for doc in documents}


def app_container(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {var["name"]: var for var in container["env"]}


def test_the_kubernetes_manifest_fits_the_budget() -> None:
    assert kubernetes_budget(load_manifest()["Deployment"]) == []


def test_the_kubernetes_manifest_states_its_budget_in_the_header_comment() -> None:
    deployment = load_manifest()["Deployment"]
    env = env_of(app_container(deployment))
    delay, drain = env["GRACEFUL_DELAY"]["value"], env["GRACEFUL_DRAIN_TIMEOUT"]["value"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    header = MANIFEST.read_text(encoding="utf-8").split("apiVersion", 1)[0]
    assert f"GRACEFUL_DELAY ({delay}) + GRACEFUL_DRAIN_TIMEOUT ({drain})" in header
    assert f"terminationGracePeriodSeconds ({grace})" in header
    assert f"= {float(delay) + float(drain) + SERVER_STOP:g} s" in header


def test_the_kubernetes_manifest_probes_drain_fast_and_never_restart_a_draining_pod() -> None:
    container = app_container(load_manifest()["Deployment"])
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready["httpGet"]["path"] == "/readyz"
    assert ready["failureThreshold"] == 1
    assert ready["periodSeconds"] <= 2
    assert live["httpGet"]["path"] == "/livez"
    ports = {port["name"] for port in container["ports"]}
    assert ready["httpGet"]["port"] in ports
    assert live["httpGet"]["port"] in ports


def test_the_kubernetes_manifest_has_no_pre_stop_sleep_and_takes_the_token_from_a_secret() -> None:
    container = app_container(load_manifest()["Deployment"])
    assert "lifecycle" not in container
    token = env_of(container)["GRACEFUL_TOKEN"]
    assert "value" not in token
    assert set(token["valueFrom"]["secretKeyRef"]) == {"name", "key"}


def test_the_kubernetes_rollout_never_drops_below_the_replica_count() -> None:
    manifests = load_manifest()
    deployment, service = manifests["Deployment"], manifests["Service"]
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    ports = {port["name"] for port in app_container(deployment)["ports"]}
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports


def test_a_mutated_manifest_with_a_short_grace_period_is_caught() -> None:
    deployment = load_manifest()["Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    [warning] = kubernetes_budget(deployment)
    assert "= 32 s does not fit terminationGracePeriodSeconds (30 s)" in warning


def test_a_mutated_manifest_with_a_pre_stop_sleep_is_caught() -> None:
    deployment = copy.deepcopy(load_manifest()["Deployment"])
    hook = {"preStop": {"exec": {"command": ["sh", "-c", "sleep 5"]}}}
    app_container(deployment)["lifecycle"] = hook
    sleep, budget = kubernetes_budget(deployment)
    assert "preStop sleep of 5 s is not needed" in sleep
    assert "= 37 s does not fit terminationGracePeriodSeconds (35 s)" in budget


# -- systemd -------------------------------------------------------------------------------


def read_unit(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)  # Environment= may repeat
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_the_systemd_unit_fits_the_budget() -> None:
    assert systemd_budget(UNIT.read_text(encoding="utf-8")) == []


def test_the_systemd_unit_signals_the_gunicorn_master_only_and_runs_the_hooks() -> None:
    service = read_unit(UNIT.read_text(encoding="utf-8"))["Service"]
    assert service["KillMode"] == "mixed"
    assert service["KillSignal"] == "SIGTERM"
    assert "gunicorn -c python:graceful.gunicorn " in service["ExecStart"]
    header = UNIT.read_text(encoding="utf-8").split("[Unit]", 1)[0]
    assert f"<= TimeoutStopSec ({service['TimeoutStopSec']})" in header


def test_the_systemd_unit_stop_timeout_leaves_room_for_the_server_stop() -> None:
    text = UNIT.read_text(encoding="utf-8")
    timeout = parse_timespan(read_unit(text)["Service"]["TimeoutStopSec"])
    config = Config.from_env(
        {"GRACEFUL_DELAY": "2", "GRACEFUL_DRAIN_TIMEOUT": "25"}
    )  # as in the unit
    assert "Environment=GRACEFUL_DELAY=2\n" in text
    assert "Environment=GRACEFUL_DRAIN_TIMEOUT=25\n" in text
    assert config.delay + config.drain_timeout + SERVER_STOP <= timeout


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("KillMode=mixed\n", "", "KillMode is not set (default control-group)"),
        ("TimeoutStopSec=35\n", "TimeoutStopSec=20\n", "does not fit TimeoutStopSec (20 s)"),
        ("KillSignal=SIGTERM\n", "KillSignal=SIGINT\n", "KillSignal=SIGINT: only SIGTERM"),
    ],
)
def test_a_mutated_unit_is_caught(old: str, new: str, expected: str) -> None:
    text = UNIT.read_text(encoding="utf-8")
    assert old in text
    [warning] = systemd_budget(text.replace(old, new))
    assert expected in warning


def systemd_verify(tmp_path: Path, text: str, socket: str | None = None) -> list[str]:
    """``systemd-analyze verify`` on a copy of the unit (and of the socket unit that activates
    it, when given, verified with it): their complaints about them."""
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists: point it at an installed one.
    gunicorn = Path(sys.executable).with_name("gunicorn")
    program = gunicorn if gunicorn.exists() else Path(sys.executable)
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={program}", text, flags=re.MULTILINE)
    unit = tmp_path / UNIT.name
    unit.write_text(text, encoding="utf-8")
    units = [unit]
    if socket is not None:
        units.insert(0, tmp_path / SOCKET_UNIT.name)
        units[0].write_text(socket, encoding="utf-8")
    result = subprocess.run(
        [binary, "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    names = [each.name for each in units]
    complaints = [line for line in result.stderr.splitlines() if any(n in line for n in names)]
    assert result.returncode == 0 or complaints, result.stderr
    return complaints


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert systemd_verify(tmp_path, UNIT.read_text(encoding="utf-8")) == []


def test_systemd_analyze_verify_would_catch_a_bad_line(tmp_path: Path) -> None:
    text = UNIT.read_text(encoding="utf-8").replace("KillMode=mixed", "KillMode=mixd")
    [complaint] = systemd_verify(tmp_path, text)
    assert "kill mode" in complaint.lower()


def test_systemd_analyze_verify_accepts_the_socket_unit_with_the_service(tmp_path: Path) -> None:
    socket = SOCKET_UNIT.read_text(encoding="utf-8")
    assert systemd_verify(tmp_path, UNIT.read_text(encoding="utf-8"), socket) == []


def test_systemd_analyze_verify_would_catch_a_bad_socket_line(tmp_path: Path) -> None:
    socket = SOCKET_UNIT.read_text(encoding="utf-8").replace("Accept=no", "Accept=maybe")
    [complaint] = systemd_verify(tmp_path, UNIT.read_text(encoding="utf-8"), socket)
    assert SOCKET_UNIT.name in complaint and "failed to parse boolean value" in complaint.lower()


def test_the_socket_unit_hands_the_service_one_listening_socket_on_its_bind_address() -> None:
    """One ``ListenStream=`` (the uvicorn runner refuses more), on the address the service's
    ``--bind`` names (used when it runs without the socket), passed as it is (``Accept=no``) to
    the service of the same name; the socket starts with the sockets, before the services."""
    socket = read_unit(SOCKET_UNIT.read_text(encoding="utf-8"))
    listen = [
        line.split("=", 1)[1]
        for line in SOCKET_UNIT.read_text(encoding="utf-8").splitlines()
        if line.startswith("ListenStream=")
    ]
    service = read_unit(UNIT.read_text(encoding="utf-8"))["Service"]
    assert listen == ["127.0.0.1:8000"]
    assert f"--bind {listen[0]} " in service["ExecStart"]
    assert socket["Socket"]["Accept"] == "no"
    assert socket["Socket"]["NoDelay"] == "true"
    assert "Service" not in socket["Socket"] and SOCKET_UNIT.stem == UNIT.stem
    assert socket["Install"]["WantedBy"] == "sockets.target"


# -- Docker --------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "a continuation line runs off the end of the file"
    return instructions


def exec_form(arguments: str) -> list[str] | None:
    """The argument list of an exec-form instruction (a JSON array of strings), else None."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return None
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    return None


def docker_instructions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for word, arguments in dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8")):
        found.setdefault(word, []).append(arguments)
    return found


def test_the_dockerfile_runs_gunicorn_in_exec_form_so_sigterm_reaches_it() -> None:
    found = docker_instructions()
    [entrypoint], [cmd] = found["ENTRYPOINT"], found["CMD"]
    argv = exec_form(entrypoint)
    assert argv is not None, f"ENTRYPOINT {entrypoint} is in shell form"
    assert exec_form(cmd) is not None, f"CMD {cmd} is in shell form"
    assert argv[:3] == ["gunicorn", "-c", "python:graceful.gunicorn"]
    assert not {"sh", "/bin/sh", "bash", "/bin/bash"} & set(argv)


def test_the_dockerfile_stops_with_sigterm() -> None:
    assert docker_instructions()["STOPSIGNAL"] == ["SIGTERM"]


def test_the_dockerfile_health_check_is_liveness_not_readiness() -> None:
    [healthcheck] = docker_instructions()["HEALTHCHECK"]
    _, _, command = healthcheck.partition(" CMD ")
    argv = exec_form(command)
    assert argv is not None
    assert "/livez" in argv[-1]
    assert "/readyz" not in healthcheck


def test_shell_form_is_recognised_as_not_exec_form() -> None:
    text = 'FROM x\nENTRYPOINT gunicorn -c python:graceful.gunicorn\nCMD ["a", \\\n "b"]\n'
    instructions = dict(dockerfile_instructions(text))
    assert exec_form(instructions["ENTRYPOINT"]) is None
    assert exec_form(instructions["CMD"]) == ["a", "b"]


def test_the_docker_stop_timeout_in_the_instructions_fits_the_budget() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    match = re.search(r"docker run --stop-timeout (\d+) ", text)
    assert match is not None
    stop_timeout = float(match.group(1))
    config = Config.from_env({})  # the image sets no GRACEFUL_* timings: the defaults
    assert check_budget(config, stop_timeout) == []
    assert check_budget(config, DOCKER_STOP_TIMEOUT) != []  # why the flag is needed


# -- the READMEs under integrations/ match the shipped files --------------------------------

ROOT = INTEGRATIONS.parent
READMES = sorted(INTEGRATIONS.glob("*/README.md"))

#: What a README may name that is not a shipped file, and why.
NOT_SHIPPED = {
    "requirements.txt": "the app's own dependencies, which the Dockerfile copies in",
    "shop.service": "the reader's own unit, in an example call",
    "shop.socket": "the reader's own socket unit, in an example call",
    "system.conf": "systemd's own configuration",
    "/etc/nginx/nginx.conf": "nginx's own main configuration, in an example call",
}
#: Inline code in the nginx and HAProxy READMEs that is neither a file, a command-line option
#: of graceful, a setting, nor a directive of the shipped files, and why.
NOT_A_DIRECTIVE = {
    "nginx": {
        "-c": "nginx's own flag, which --nginx-conf passes",
        "-p": "nginx's own flag, which --nginx-prefix passes",
        "PATH": "a placeholder",
        "FILE.lock": "a file graceful.nginx keeps next to the managed file",
        "FILE.prev": "a file graceful.nginx keeps next to the managed file",
        ".FILE.*.tmp": "graceful.nginx's temporary files",
        "flock": "the system call that locks an edit",
        "nginx": "the nginx binary",
        "nginx -t": "nginx's own command line",
        "nginx -s reload": "nginx's own command line",
        "pid": "the pid directive of the reader's nginx.conf, which the controller reads",
        "listen 80": "the reader's own server block, around the shipped files",
    },
    "haproxy": {
        "POST /-/graceful/drain": "the library's control route",
        "ready": "a server state of the runtime API",
        "drain": "a server state of the runtime API",
        "maint": "a server state of the runtime API",
        "up": "an operational state of the runtime API",
        "down": "an operational state of the runtime API",
        "show stat": "a runtime API command",
        "user": "a stats socket parameter the example does not set",
        "group": "a stats socket parameter the example does not set",
        "inter \u00d7 fall": "arithmetic on two parameters quoted apart",
        "haproxy -c -f haproxy.cfg": "the command that validates the file",
        "tune.bufsize": "a global tunable named for its default, not set in the file",
        "response-timeout": "named as left out on purpose (checked: not in the file)",
    },
}
#: Quoted as deliberately left out of the shipped files: must not be in them.
LEFT_OUT = {"haproxy": ["response-timeout"]}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FILE_NAME = re.compile(
    r"(\.\./|/)?([\w-]+/)*[\w.-]+\.(py|cfg|conf|yaml|yml|service|socket|txt|sock|env)"
    r"|(\.\./)?([\w-]+/)+|Dockerfile"
)


@dataclasses.dataclass
class Readme:
    folder: Path
    spans: list[str]
    """Inline code, whitespace collapsed (a span may run over a line break)."""
    blocks: list[tuple[str, str]]
    """Fenced code blocks: (language, text)."""

    @classmethod
    def parse(cls, folder: Path, text: str) -> Readme:
        blocks = [(match.group(1), match.group(2)) for match in FENCE.finditer(text)]
        prose = FENCE.sub("", text)
        spans = [" ".join(match.group(1).split()) for match in re.finditer(r"`([^`]+)`", prose)]
        return cls(folder, spans, blocks)

    def shipped(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file() and p.name != "README.md")


def file_names(texts: Iterable[str]) -> list[str]:
    return [
        token
        for text in texts
        for token in re.findall(r"[\w./*-]+", text)
        if FILE_NAME.fullmatch(token)
    ]


def missing_files(readme: Readme) -> list[str]:
    """Each file a README names must exist (beside it, or from the repository's root); an
    absolute path (where to install a file) must be the one the shipped files use."""
    shipped_text = "\n".join(path.read_text(encoding="utf-8") for path in readme.shipped())
    problems = []
    for name in file_names([*readme.spans, *(text for _, text in readme.blocks)]):
        if name in NOT_SHIPPED:
            continue
        if name.startswith("/"):
            if name not in shipped_text:
                problems.append(f"{name}: no shipped file of {readme.folder.name}/ uses it")
        elif not ((readme.folder / name).exists() or (ROOT / name).exists()):
            problems.append(f"{name}: no such file")
    return problems


def statements(config: str) -> list[str]:
    """nginx: each statement (comments dropped), and each one of the example configuration in
    the comments (comment lines indented by four spaces or more)."""
    active = "\n".join(line.split("#", 1)[0] for line in config.splitlines())
    examples = [
        line.split("#", 1)[1] for line in config.splitlines() if re.match(r"\s*# {4,}[^#\s]", line)
    ]
    found = []
    for text in (active, *examples):
        for statement in re.split(r"[;{}]", text):
            if statement.split():
                found.append(" ".join(statement.split()))
    return found


def haproxy_lines(config: str) -> list[str]:
    lines = (" ".join(line.split("#", 1)[0].split()) for line in config.splitlines())
    return [line for line in lines if line]


def quoted(quote: str) -> re.Pattern[str]:
    """A quote as a pattern over a statement's words: ``...`` and ``[parameters]`` stand for
    any words, an upper-case word (``ADDRESS``) for one; ``{}`` and a final ``;`` are dropped."""
    words = [word for word in quote.rstrip(";").split() if word not in ("{", "}", "{}")]
    parts = []
    for word in words:
        if word == "..." or re.fullmatch(r"\[\w+\]", word):
            parts.append(r"(?: \S+)*")
        elif re.fullmatch(r"[A-Z][A-Z_]+", word):
            parts.append(r" \S+")
        else:
            parts.append(" " + re.escape(word))
    return re.compile(r"(?:^|(?<= ))" + "".join(parts).lstrip() + r"(?= |$)")


def cli_help(words: list[str]) -> str | None:
    """``graceful WORDS --help``, or None when that is no command of graceful."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            cli.main([*words, "--help"])
    except SystemExit as exc:
        return out.getvalue() if exc.code == 0 else None
    return None


def cli_problems(text: str) -> list[str]:
    """A ``graceful ...`` command must exist, and each ``--option`` it (or any text) quotes
    must be an option of it (of ``graceful nginx`` or ``graceful rollout`` otherwise)."""
    words = text.split()
    helps: list[str | None]
    if words[:1] == ["graceful"]:
        verbs = [word for word in words[1:3] if re.fullmatch(r"[a-z]+", word)]
        helps = [cli_help(verbs)]
        if helps[0] is None:
            return [f"{text}: graceful has no command {' '.join(verbs)!r}"]
    else:
        helps = [cli_help(["nginx", "status"]), cli_help(["rollout"])]
    every = "\n".join(h for h in helps if h)
    return [
        f"{text}: graceful has no option {option}"
        for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)
        if not re.search(rf"(?<![\w-]){option}(?![\w-])", every)
    ]


def is_setting(span: str) -> bool:
    name = span.split("=", 1)[0]
    fields = {field.name for field in dataclasses.fields(Config)}
    return name.startswith("GRACEFUL_") and name[len("GRACEFUL_") :].lower() in fields


def quotes_of(readme: Readme, kind: str) -> list[str]:
    """Inline code that is not a file name, and the statements of ``kind`` code blocks."""
    quotes = [span for span in readme.spans if not FILE_NAME.fullmatch(span)]
    for language, text in readme.blocks:
        if language == kind:
            quotes += [" ".join(s.split()) for s in re.split(r"[;{}]", text) if s.split()]
    return quotes


def directive_problems(readme: Readme, kind: str) -> list[str]:
    """Each quote of an nginx directive (or an HAProxy line) must be in the shipped files."""
    configs = [p.read_text(encoding="utf-8") for p in readme.shipped()]
    if kind == "nginx":
        known = [statement for config in configs for statement in statements(config)]
        grammar = nginx.UPSTREAM_DIRECTIVES | nginx.SERVER_FLAGS  # what the controller parses
        api: set[str] = set()
    else:
        known = [line for config in configs for line in haproxy_lines(config)]
        grammar = frozenset()
        api = set(dir(haproxy)) | set(dir(haproxy.RuntimeAPI))
    allowed = NOT_A_DIRECTIVE[kind]
    problems = []
    for language, text in readme.blocks:
        if language == "sh":
            problems += [p for line in text.splitlines() if line for p in cli_problems(line)]
    for quote in quotes_of(readme, kind):
        if quote in allowed or is_setting(quote):
            continue
        if quote.startswith(("graceful ", "--")):
            problems += cli_problems(quote)
        elif re.fullmatch(r"(\w+)(\(.*\))?", quote) and quote.split("(")[0] in api:
            continue  # a name of graceful.haproxy (an error, a RuntimeAPI method)
        elif quote not in grammar and not any(quoted(quote).search(s) for s in known):
            problems.append(f"{quote!r}: not in {', '.join(p.name for p in readme.shipped())}")
    for word in LEFT_OUT.get(kind, []):
        if any(word in line.split() for line in known):
            problems.append(f"{word!r} is quoted as left out, but the shipped file has it")
    return problems


def readme(name: str, text: str | None = None) -> Readme:
    folder = INTEGRATIONS / name
    return Readme.parse(folder, (folder / "README.md").read_text() if text is None else text)


@pytest.mark.parametrize("path", READMES, ids=[path.parent.name for path in READMES])
def test_every_file_an_integrations_readme_names_exists(path: Path) -> None:
    assert missing_files(readme(path.parent.name)) == []


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_every_directive_and_option_the_readme_quotes_is_in_the_shipped_files(kind: str) -> None:
    assert directive_problems(readme(kind), kind) == []


def test_the_readmes_quote_what_the_checks_look_for() -> None:
    """The checks above see the quotes that matter (a parser that found nothing would pass)."""
    nginx_readme, haproxy_readme = readme("nginx"), readme("haproxy")
    nginx_quotes = set(quotes_of(nginx_readme, "nginx"))
    assert {"max_fails=0", "server ADDRESS [parameters];", "listen 80"} <= nginx_quotes
    assert "include /etc/nginx/graceful-proxy.conf" in nginx_quotes  # from the code block
    haproxy_quotes = set(quotes_of(haproxy_readme, "haproxy"))
    assert {"inter 500ms fall 1", "retry-on conn-failure empty-response 503"} <= haproxy_quotes
    assert "tests/test_nginx.py" in file_names(nginx_readme.spans)
    assert "/run/haproxy/admin.sock" in file_names(t for _, t in haproxy_readme.blocks)


@pytest.mark.parametrize(
    ("kind", "old", "new", "expected"),
    [
        ("nginx", "`max_fails=0` in", "`max_fails=1` in", "'max_fails=1': not in"),
        ("nginx", "`proxy_pass`", "`proxy_pass_header`", "'proxy_pass_header': not in"),
        ("nginx", "listen 80;", "listen 80; proxy_buffering off;", "'proxy_buffering off'"),
        ("nginx", "`--pid-file PATH`", "`--pidfile PATH`", "no option --pidfile"),
        ("nginx", "graceful nginx status $F", "graceful nginx show $F", "no command 'nginx show'"),
        ("haproxy", "`rise 2`", "`rise 3`", "'rise 3': not in haproxy.cfg"),
        ("haproxy", "`option redispatch 1`", "`option redispatch`", None),  # a prefix: fine
        ("haproxy", "`option redispatch 1`", "`option allbackups`", "'option allbackups'"),
        ("haproxy", "`UnknownServerError`", "`NoSuchServerError`", "'NoSuchServerError'"),
    ],
)
def test_a_readme_quoting_what_the_shipped_files_do_not_have_is_caught(
    kind: str, old: str, new: str, expected: str | None
) -> None:
    text = (INTEGRATIONS / kind / "README.md").read_text()
    assert old in text
    problems = directive_problems(readme(kind, text.replace(old, new)), kind)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(
    ("kind", "old", "new", "expected"),
    [
        ("nginx", "`tests/test_nginx.py`", "`tests/test_upstream.py`", "tests/test_upstream.py"),
        ("haproxy", "`haproxy.cfg` is", "`haproxy.conf` is", "haproxy.conf: no such file"),
        ("kubernetes", "`../docker/`", "`../podman/`", "../podman/: no such file"),
        ("systemd", "/etc/shop/graceful.env", "/etc/shop/env", None),  # not a file name
        ("systemd", "/etc/shop/graceful.env", "/etc/app/graceful.env", "no shipped file"),
    ],
)
def test_a_readme_naming_a_file_that_is_not_shipped_is_caught(
    kind: str, old: str, new: str, expected: str | None
) -> None:
    text = (INTEGRATIONS / kind / "README.md").read_text()
    assert old in text
    problems = missing_files(readme(kind, text.replace(old, new)))
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems

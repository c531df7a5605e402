"""integrations/kubernetes, systemd and docker: every file parsed and held to the budget."""

from __future__ import annotations

import configparser
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from graceful import Config
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


def systemd_verify(tmp_path: Path, text: str) -> list[str]:
    """``systemd-analyze verify`` on a copy of the unit: its complaints about the unit."""
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart's program exists: point it at an installed one.
    gunicorn = Path(sys.executable).with_name("gunicorn")
    program = gunicorn if gunicorn.exists() else Path(sys.executable)
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={program}", text, flags=re.MULTILINE)
    unit = tmp_path / "graceful-app.service"
    unit.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [binary, "verify", str(unit)], capture_output=True, text=True, timeout=30, check=False
    )
    complaints = [line for line in result.stderr.splitlines() if unit.name in line]
    assert result.returncode == 0 or complaints, result.stderr
    return complaints


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert systemd_verify(tmp_path, UNIT.read_text(encoding="utf-8")) == []


def test_systemd_analyze_verify_would_catch_a_bad_line(tmp_path: Path) -> None:
    text = UNIT.read_text(encoding="utf-8").replace("KillMode=mixed", "KillMode=mixd")
    [complaint] = systemd_verify(tmp_path, text)
    assert "kill mode" in complaint.lower()


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

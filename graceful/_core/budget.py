"""One budget: the delay, the drain timeout and the server's own stop must fit the kill deadline.

After SIGTERM a node keeps serving for ``delay``, waits up to ``drain_timeout`` for what is in
flight, then the server stops. The platform waits only so long before SIGKILL: Kubernetes'
``terminationGracePeriodSeconds`` (default 30 s, counted from the start of any ``preStop``
hook), systemd's ``TimeoutStopSec`` (default ``DefaultTimeoutStopSec``, 90 s unless changed in
``system.conf``), ``docker stop --time`` (default 10 s). When the sum does not fit, a drain that
runs long is cut off by SIGKILL: the requests it was waiting for fail.

Sans-io: every function takes what was already read (a settings object, a parsed manifest, the
text of a unit) and returns warnings, one sentence each, naming the setting and the numbers.
Malformed input (a duration like ``30x``) raises :class:`BudgetError`. A warning that means
requests fail (the budget does not fit, no drain at all) is a :class:`Problem`, still a ``str``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import shlex
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from .config import ENV_PREFIX, Config, ConfigError

__all__ = [
    "DOCKER_STOP_TIMEOUT",
    "KUBERNETES_GRACE_PERIOD",
    "SERVER_STOP",
    "SYSTEMD_TIMEOUT_STOP",
    "BudgetError",
    "Problem",
    "check_budget",
    "kubernetes_budget",
    "parse_timespan",
    "pod_spec",
    "systemd_budget",
]

#: Seconds allowed for the server's own stop once drained (gunicorn and uvicorn need well under
#: a second when nothing is in flight; the rest is margin for logging and process exit).
SERVER_STOP = 2.0
#: Kubernetes' default ``terminationGracePeriodSeconds``.
KUBERNETES_GRACE_PERIOD = 30.0
#: systemd's default ``TimeoutStopSec`` (``DefaultTimeoutStopSec`` in ``system.conf``).
SYSTEMD_TIMEOUT_STOP = 90.0
#: ``docker stop``'s default ``--time`` (and Compose's ``stop_grace_period``).
DOCKER_STOP_TIMEOUT = 10.0


class BudgetError(ConfigError):
    """A manifest, unit or duration could not be read. The message names the setting."""


class Problem(str):
    """A warning that means failed requests (a drain cut short, or none at all), not just advice.

    ``graceful check-config`` reports these as errors. A ``str``, like every other warning.
    """

    __slots__ = ()


def check_budget(
    config: Config,
    kill_deadline: float,
    *,
    server_stop: float = SERVER_STOP,
    before_signal: float = 0.0,
    deadline_name: str = "the kill deadline",
) -> list[str]:
    """Warnings when ``before_signal + delay + drain_timeout + server_stop`` exceeds the deadline.

    ``before_signal`` is time the platform spends before SIGTERM but counts against the same
    deadline (a Kubernetes ``preStop`` hook). ``kill_deadline`` may be ``math.inf`` (no SIGKILL).
    """
    for name, value in (
        ("kill_deadline", kill_deadline),
        ("server_stop", server_stop),
        ("before_signal", before_signal),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise BudgetError(f"{name}={value!r} is not a number of seconds")
        if value < 0 or (name != "kill_deadline" and math.isinf(value)):
            raise BudgetError(f"{name}={value!r} is not allowed; expected seconds >= 0")
    parts = [(before_signal, "preStop")] if before_signal else []
    parts += [
        (config.delay, "delay"),
        (config.drain_timeout, "drain_timeout"),
        (server_stop, "server stop"),
    ]
    needed = sum(seconds for seconds, _ in parts)
    if needed <= kill_deadline:
        return []
    terms = " + ".join(f"{name} ({_s(seconds)})" for seconds, name in parts)
    return [
        Problem(
            f"{terms} = {_s(needed)} does not fit {deadline_name} ({_s(kill_deadline)}): the "
            "process is killed before a long drain can end; lower GRACEFUL_DELAY or "
            f"GRACEFUL_DRAIN_TIMEOUT, or raise {deadline_name} to at least {math.ceil(needed)} s"
        )
    ]


# -- durations -----------------------------------------------------------------------------

_UNITS = {
    **dict.fromkeys(("us", "usec", "µs", "μs"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 1e-3),
    **dict.fromkeys(("", "s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
    **dict.fromkeys(("M", "month", "months"), 2629800.0),
    **dict.fromkeys(("y", "year", "years"), 31557600.0),
}
_SPAN_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([^\d\s.]*)")


def parse_timespan(text: str, *, setting: str = "duration") -> float:
    """Seconds in a systemd time span: ``90``, ``90s``, ``1min 30s``, ``500ms``, ``infinity``.

    A bare number is seconds. Raises :class:`BudgetError` naming ``setting`` when malformed.
    """
    raw = text.strip()
    if raw == "infinity":
        return math.inf
    total, pos = 0.0, 0
    while pos < len(raw):
        match = _SPAN_PART.match(raw, pos)
        if match is None or match.group(2) not in _UNITS:
            break
        if not match.group(2) and match.end() < len(raw) and not raw[match.end()].isspace():
            break  # "1..5", "1.5.3": a number must end in a unit or a space
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    else:
        if raw:
            return total
    raise BudgetError(
        f"{setting}={text!r} is not a duration; expected seconds like '30', '30s', "
        "'1min 30s' or 'infinity'"
    )


# -- Kubernetes ----------------------------------------------------------------------------


def pod_spec(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod spec of a Pod, a workload (Deployment, StatefulSet, ...) or a CronJob, else None."""
    spec = manifest.get("spec")
    if not isinstance(spec, Mapping):
        return None
    if manifest.get("kind") == "Pod":
        return spec
    if manifest.get("kind") == "CronJob":
        spec = _get(spec, "jobTemplate", "spec")
    found = _get(spec, "template", "spec")
    return found if isinstance(found, Mapping) and "containers" in found else None


def kubernetes_budget(
    manifest: Mapping[str, Any],
    *,
    container: str | None = None,
    server_stop: float = SERVER_STOP,
) -> list[str]:
    """Warnings for one parsed Kubernetes manifest (a Pod or a workload with a pod template).

    Reads ``terminationGracePeriodSeconds``, each checked container's ``GRACEFUL_*`` env (the
    delay defaults to 5 s under Kubernetes), its probes and ``preStop`` hook. Checked: the named
    ``container``, else the containers that set a ``GRACEFUL_*`` variable, else the first one.
    """
    kind = manifest.get("kind", "manifest")
    spec = pod_spec(manifest)
    if spec is None:
        raise BudgetError(f"{kind} has no pod template (spec.template.spec): nothing to check")
    grace = spec.get("terminationGracePeriodSeconds")
    warnings: list[str] = []
    if grace is None:
        deadline = KUBERNETES_GRACE_PERIOD
        warnings.append(
            "terminationGracePeriodSeconds is not set: Kubernetes' default of "
            f"{_s(deadline)} applies; set it explicitly to the budget"
        )
    elif isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        raise BudgetError(
            f"terminationGracePeriodSeconds={grace!r} is not allowed; expected whole seconds >= 0"
        )
    else:
        deadline = float(grace)
    for item in _containers(spec, container):
        name = item.get("name", "?")
        where = f"container {name!r}"
        env, env_warnings = _container_env(item, where)
        warnings += env_warnings
        try:
            config = Config.from_env({**env, "KUBERNETES_SERVICE_HOST": "kubernetes"})
        except ConfigError as exc:
            raise BudgetError(f"{where}: {exc}") from None
        sleep, hook_warnings = _pre_stop(item, where, config)
        warnings += hook_warnings
        warnings += _probes(item, where, config)
        warnings += [
            Problem(f"{where}: {text}")
            for text in check_budget(
                config,
                deadline,
                server_stop=server_stop,
                before_signal=sleep,
                deadline_name="terminationGracePeriodSeconds",
            )
        ]
    return warnings


def _containers(spec: Mapping[str, Any], name: str | None) -> list[Mapping[str, Any]]:
    items = spec.get("containers")
    if not isinstance(items, Sequence) or not items or isinstance(items, str):
        raise BudgetError("the pod spec has no containers")
    containers = [item for item in items if isinstance(item, Mapping)]
    if name is not None:
        chosen = [item for item in containers if item.get("name") == name]
        if not chosen:
            known = ", ".join(str(item.get("name")) for item in containers)
            raise BudgetError(f"no container named {name!r}; containers: {known}")
        return chosen
    ours = [
        item
        for item in containers
        if any(str(var.get("name", "")).startswith(ENV_PREFIX) for var in _env_list(item))
    ]
    return ours or containers[:1]


def _env_list(item: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    env = item.get("env") or []
    return [var for var in env if isinstance(var, Mapping)] if isinstance(env, list) else []


def _container_env(item: Mapping[str, Any], where: str) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    warnings: list[str] = []
    for var in _env_list(item):
        key = str(var.get("name", ""))
        if not key.startswith(ENV_PREFIX):
            continue
        if "value" in var:
            env[key] = str(var["value"])
            if key == "GRACEFUL_TOKEN":
                warnings.append(
                    f"{where}: GRACEFUL_TOKEN is written in the manifest; keep it in a Secret "
                    "(valueFrom.secretKeyRef)"
                )
        elif key != "GRACEFUL_TOKEN":
            warnings.append(
                f"{where}: {key} comes from valueFrom and is not read here; "
                "the check assumes its default"
            )
    if item.get("envFrom"):
        warnings.append(
            f"{where}: envFrom is not read here; GRACEFUL_* settings from it are assumed "
            "at their defaults"
        )
    unknown, known = _split_known(env)
    warnings += [f"{where}: unknown setting {key}; known: {', '.join(known)}" for key in unknown]
    return {key: value for key, value in env.items() if key not in unknown}, warnings


def _split_known(env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    known = sorted(
        ENV_PREFIX + field.name.upper()
        for field in dataclasses.fields(Config)
        if field.metadata["kind"] != "checks"
    )
    return sorted(key for key in env if key not in known), known


def _pre_stop(item: Mapping[str, Any], where: str, config: Config) -> tuple[float, list[str]]:
    """The seconds a ``preStop`` sleep takes (0 when there is none), and warnings about it."""
    hook = _get(item, "lifecycle", "preStop")
    if not isinstance(hook, Mapping):
        return 0.0, []
    sleep: float | None = None
    native = _get(hook, "sleep", "seconds")
    if native is not None:
        sleep = _number(native, f"{where}: lifecycle.preStop.sleep.seconds")
    command = _get(hook, "exec", "command")
    if isinstance(command, list):
        words = " ".join(str(word) for word in command).split()
        for index, word in enumerate(words[:-1]):
            if word.rsplit("/", 1)[-1] == "sleep":
                with contextlib.suppress(BudgetError):  # "sleep $(X)": an unknown hook
                    sleep = parse_timespan(words[index + 1].strip("'\";"), setting="sleep")
                break
    if sleep is None or math.isinf(sleep):
        return 0.0, [
            f"{where}: a preStop hook runs before SIGTERM and its time counts against "
            "terminationGracePeriodSeconds; it is not part of this check"
        ]
    if config.delay == 0:  # the sleep does the delay's job: it is only counted
        return sleep, []
    return sleep, [
        f"{where}: preStop sleep of {_s(sleep)} is not needed: the library's own delay "
        f"(GRACEFUL_DELAY, {_s(config.delay)}) keeps serving while endpoints update, and the "
        "sleep only adds to the budget; remove the preStop hook"
    ]


def _probes(item: Mapping[str, Any], where: str, config: Config) -> list[str]:
    warnings: list[str] = []
    ready = item.get("readinessProbe")
    if not isinstance(ready, Mapping):
        warnings.append(
            f"{where}: no readinessProbe: Kubernetes cannot see a drain; add a readinessProbe "
            f"with httpGet.path {config.readyz_path}"
        )
    else:
        path = _get(ready, "httpGet", "path")
        if path != config.readyz_path:
            warnings.append(
                f"{where}: readinessProbe checks {_probe_target(ready)}, not "
                f"httpGet.path {config.readyz_path}: it does not fail while the node drains"
            )
        period = _number(ready.get("periodSeconds", 10), f"{where}: readinessProbe.periodSeconds")
        failures = _number(
            ready.get("failureThreshold", 3), f"{where}: readinessProbe.failureThreshold"
        )
        if period * failures > config.delay:
            warnings.append(
                f"{where}: readinessProbe notices a drain after up to periodSeconds "
                f"({_s(period)}) x failureThreshold ({failures:g}) = {_s(period * failures)}, "
                f"longer than the delay ({_s(config.delay)}): a drain started by "
                "`graceful drain` or a drain file still gets traffic after the delay; use a "
                "small periodSeconds and failureThreshold 1"
            )
    live = item.get("livenessProbe")
    if isinstance(live, Mapping):
        path = _get(live, "httpGet", "path")
        if path == config.readyz_path:
            warnings.append(
                Problem(
                    f"{where}: livenessProbe checks {config.readyz_path}: a draining pod fails "
                    f"it and is restarted mid-drain; point it at {config.livez_path}"
                )
            )
        elif path != config.livez_path:
            warnings.append(
                f"{where}: livenessProbe checks {_probe_target(live)}, not httpGet.path "
                f"{config.livez_path}"
            )
    return warnings


def _probe_target(probe: Mapping[str, Any]) -> str:
    path = _get(probe, "httpGet", "path")
    if path is not None:
        return f"httpGet.path {path}"
    kinds = [key for key in ("tcpSocket", "exec", "grpc") if key in probe]
    return kinds[0] if kinds else "nothing"


def _number(value: Any, setting: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise BudgetError(f"{setting}={value!r} is not allowed; expected a number >= 0")
    return float(value)


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


# -- systemd -------------------------------------------------------------------------------


def systemd_budget(unit_text: str, *, server_stop: float = SERVER_STOP) -> list[str]:
    """Warnings for the text of a systemd service unit running a graceful server.

    Reads ``TimeoutStopSec`` (or ``TimeoutSec``), ``KillMode``, ``KillSignal`` and the
    ``GRACEFUL_*`` variables of ``Environment=`` (the delay defaults to 2 s outside Kubernetes).
    Drop-in files and ``EnvironmentFile=`` are not read.
    """
    service = _service_section(unit_text)
    warnings: list[str] = []
    kill_mode = service.get("KillMode", ["control-group"])[-1]
    if kill_mode != "mixed":
        why = {
            "control-group": "SIGTERM goes to every process of the service at once, so the "
            "server's workers stop on their own instead of serving through the drain",
            "process": "when TimeoutStopSec runs out only the main process is killed and its "
            "workers are left running",
            "none": "systemd kills nothing: workers outlive the stop",
        }.get(kill_mode, "it is not a kill mode systemd knows")
        shown = (
            "KillMode is not set (default control-group)"
            if "KillMode" not in service
            else (f"KillMode={kill_mode}")
        )
        warnings.append(
            Problem(
                f"{shown}: {why}; set KillMode=mixed (SIGTERM to the main process only, "
                "SIGKILL to the rest at the end)"
            )
        )
    kill_signal = _signal_name(service.get("KillSignal", ["SIGTERM"])[-1])
    if kill_signal != "SIGTERM":
        warnings.append(
            Problem(
                f"KillSignal={kill_signal}: only SIGTERM drains (SIGINT is a quick stop without "
                "the delay, SIGQUIT stops at once); remove KillSignal or set KillSignal=SIGTERM"
            )
        )
    timeout_key = next((k for k in ("TimeoutStopSec", "TimeoutSec") if k in service), None)
    if timeout_key is None:
        deadline = SYSTEMD_TIMEOUT_STOP
        warnings.append(
            f"TimeoutStopSec is not set: systemd's default applies ({_s(deadline)} unless "
            "DefaultTimeoutStopSec in system.conf says otherwise); set it explicitly to the budget"
        )
    else:
        deadline = parse_timespan(service[timeout_key][-1], setting=timeout_key)
        if deadline == 0:  # systemd reads 0 as "no timeout"
            deadline = math.inf
    if "EnvironmentFile" in service:
        warnings.append(
            "EnvironmentFile= is not read here: GRACEFUL_* settings in it are assumed at "
            "their defaults"
        )
    env = _unit_environment(service.get("Environment", []))
    unknown, known = _split_known(env)
    warnings += [
        f"unknown setting {key} in Environment=; known: {', '.join(known)}" for key in unknown
    ]
    try:
        config = Config.from_env({k: v for k, v in env.items() if k not in unknown})
    except ConfigError as exc:
        raise BudgetError(f"Environment=: {exc}") from None
    name = timeout_key if timeout_key is not None else "TimeoutStopSec"
    return warnings + check_budget(config, deadline, server_stop=server_stop, deadline_name=name)


def _service_section(text: str) -> dict[str, list[str]]:
    """The ``[Service]`` settings: key -> values in order (repeated keys accumulate)."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    section: str | None = None
    service: dict[str, list[str]] | None = None
    for line in lines:
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            if section == "Service":
                service = {} if service is None else service
            continue
        if section != "Service" or service is None:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise BudgetError(f"[Service] line {line!r} is not Key=Value")
        key, value = key.strip(), value.strip()
        if key == "Environment" and not value:
            service.pop(key, None)  # an empty assignment resets the list
            continue
        service.setdefault(key, []).append(value)
    if service is None:
        raise BudgetError("the unit has no [Service] section: not a service unit")
    return service


def _unit_environment(values: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in values:
        try:
            words = shlex.split(value)
        except ValueError as exc:
            raise BudgetError(f"Environment={value} cannot be read: {exc}") from None
        for word in words:
            key, sep, assigned = word.partition("=")
            if not sep or not key:
                raise BudgetError(f"Environment={value}: {word!r} is not VARIABLE=value")
            env[key] = assigned
    return env


def _signal_name(value: str) -> str:
    text = value.strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text)).name
        except ValueError:
            raise BudgetError(f"KillSignal={value!r} is not a signal") from None
    return text if text.startswith("SIG") else "SIG" + text


def _s(seconds: float) -> str:
    return "no limit" if math.isinf(seconds) else f"{seconds:g} s"

"""graceful.budget: delay + drain timeout + server stop against the platform's kill deadline."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from graceful import Config
from graceful.budget import (
    BudgetError,
    check_budget,
    kubernetes_budget,
    parse_timespan,
    pod_spec,
    systemd_budget,
)

# -- check_budget ---------------------------------------------------------------------------


def test_a_budget_that_fits_gives_no_warning() -> None:
    config = Config(delay=5, drain_timeout=20)
    assert check_budget(config, 30, server_stop=2) == []
    assert check_budget(config, 27, server_stop=2) == []  # exactly full still fits


def test_a_budget_over_the_deadline_names_every_term_and_the_minimum() -> None:
    config = Config(delay=5, drain_timeout=25)
    [warning] = check_budget(
        config, 30, server_stop=2, deadline_name="terminationGracePeriodSeconds"
    )
    assert "delay (5 s) + drain_timeout (25 s) + server stop (2 s) = 32 s" in warning
    assert "does not fit terminationGracePeriodSeconds (30 s)" in warning
    assert "at least 32 s" in warning


def test_time_before_the_signal_counts_against_the_same_deadline() -> None:
    config = Config(delay=2, drain_timeout=10)
    assert check_budget(config, 20, server_stop=1) == []
    [warning] = check_budget(config, 20, server_stop=1, before_signal=10)
    assert warning.startswith("preStop (10 s) + delay (2 s)")


def test_no_deadline_means_no_warning() -> None:
    assert check_budget(Config(delay=5, drain_timeout=3600), math.inf) == []


@pytest.mark.parametrize("deadline", [-1, math.nan, "30", True])
def test_a_deadline_that_is_not_seconds_is_an_error(deadline: Any) -> None:
    with pytest.raises(BudgetError, match="kill_deadline"):
        check_budget(Config(delay=1), deadline)


def test_budget_errors_are_config_errors() -> None:
    from graceful import ConfigError

    assert issubclass(BudgetError, ConfigError)


# -- parse_timespan ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        (" 35 ", 35.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("1min 30s", 90.0),
        ("1m30s", 90.0),
        ("2h", 7200.0),
        ("1 min", 60.0),
        ("infinity", math.inf),
    ],
)
def test_systemd_time_spans_are_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_timespan(text) == seconds


@pytest.mark.parametrize("text", ["30x", "", "s", "-5", "30 s x", "1..5", "thirty"])
def test_a_malformed_time_span_is_an_error_naming_the_setting(text: str) -> None:
    with pytest.raises(BudgetError, match=r"TimeoutStopSec=.* is not a duration"):
        parse_timespan(text, setting="TimeoutStopSec")


# -- kubernetes_budget --------------------------------------------------------------------


def deployment(**container: Any) -> dict[str, Any]:
    app: dict[str, Any] = {
        "name": "app",
        "env": [
            {"name": "GRACEFUL_DELAY", "value": "5"},
            {"name": "GRACEFUL_DRAIN_TIMEOUT", "value": "20"},
            {
                "name": "GRACEFUL_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}},
            },
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz"},
            "periodSeconds": 2,
            "failureThreshold": 1,
        },
        "livenessProbe": {"httpGet": {"path": "/livez"}},
    }
    app.update(container)
    return {
        "kind": "Deployment",
        "spec": {"template": {"spec": {"terminationGracePeriodSeconds": 30, "containers": [app]}}},
    }


def spec_of(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]["template"]["spec"]
    return spec


def test_a_deployment_within_its_grace_period_gives_no_warning() -> None:
    assert kubernetes_budget(deployment()) == []


def test_a_grace_period_too_short_is_named_with_the_numbers() -> None:
    manifest = deployment()
    spec_of(manifest)["terminationGracePeriodSeconds"] = 20
    [warning] = kubernetes_budget(manifest)
    assert warning.startswith("container 'app': delay (5 s) + drain_timeout (20 s)")
    assert "does not fit terminationGracePeriodSeconds (20 s)" in warning


def test_without_a_grace_period_kubernetes_default_of_30_s_is_assumed_and_said() -> None:
    manifest = deployment()
    del spec_of(manifest)["terminationGracePeriodSeconds"]
    assert kubernetes_budget(manifest) == [
        "terminationGracePeriodSeconds is not set: Kubernetes' default of 30 s applies; "
        "set it explicitly to the budget"
    ]
    spec_of(manifest)["containers"][0]["env"][1]["value"] = "25"  # 5 + 25 + 2 > 30
    assert "does not fit terminationGracePeriodSeconds (30 s)" in kubernetes_budget(manifest)[1]


def test_the_delay_defaults_to_five_seconds_under_kubernetes() -> None:
    manifest = deployment(env=[{"name": "GRACEFUL_DRAIN_TIMEOUT", "value": "25"}])
    [warning] = kubernetes_budget(manifest)
    assert "delay (5 s) + drain_timeout (25 s) + server stop (2 s) = 32 s" in warning


@pytest.mark.parametrize(
    "hook",
    [
        {"exec": {"command": ["sleep", "10"]}},
        {"exec": {"command": ["/bin/sh", "-c", "sleep 10"]}},
        {"sleep": {"seconds": 10}},
    ],
)
def test_a_pre_stop_sleep_is_reported_and_counted_in_the_budget(hook: dict[str, Any]) -> None:
    sleep, budget = kubernetes_budget(deployment(lifecycle={"preStop": hook}))
    assert "preStop sleep of 10 s is not needed" in sleep
    assert "GRACEFUL_DELAY, 5 s" in sleep
    assert "preStop (10 s) + delay (5 s) + drain_timeout (20 s) + server stop (2 s) = 37 s" in (
        budget
    )


def test_a_pre_stop_sleep_in_place_of_the_delay_is_only_counted() -> None:
    manifest = deployment(lifecycle={"preStop": {"exec": {"command": ["sleep", "5"]}}})
    spec_of(manifest)["containers"][0]["env"][0]["value"] = "0"
    assert not any("preStop" in w for w in kubernetes_budget(manifest))
    spec_of(manifest)["containers"][0]["env"][1]["value"] = "25"
    budget = kubernetes_budget(manifest)[-1]
    assert "preStop (5 s) + delay (0 s) + drain_timeout (25 s) + server stop (2 s) = 32 s" in budget


def test_another_pre_stop_hook_is_reported_as_unchecked() -> None:
    hook = {"httpGet": {"path": "/shutdown", "port": 8000}}
    [warning] = kubernetes_budget(deployment(lifecycle={"preStop": hook}))
    assert "preStop hook runs before SIGTERM" in warning


def test_a_liveness_probe_on_readyz_is_reported() -> None:
    [warning] = kubernetes_budget(deployment(livenessProbe={"httpGet": {"path": "/readyz"}}))
    assert "livenessProbe checks /readyz: a draining pod fails it" in warning


def test_a_missing_or_tcp_readiness_probe_is_reported() -> None:
    manifest = deployment()
    del spec_of(manifest)["containers"][0]["readinessProbe"]
    [missing] = kubernetes_budget(manifest)
    assert "no readinessProbe" in missing
    probe = {"tcpSocket": {"port": 8000}, "periodSeconds": 1, "failureThreshold": 1}
    [tcp] = kubernetes_budget(deployment(readinessProbe=probe))
    assert "readinessProbe checks tcpSocket, not httpGet.path /readyz" in tcp


def test_a_slow_readiness_probe_is_reported_with_its_numbers() -> None:
    [warning] = kubernetes_budget(deployment(readinessProbe={"httpGet": {"path": "/readyz"}}))
    assert "periodSeconds (10 s) x failureThreshold (3) = 30 s" in warning
    assert "longer than the delay (5 s)" in warning


def test_probe_paths_follow_the_configured_routes() -> None:
    manifest = deployment(readinessProbe={"httpGet": {"path": "/health/ready"}})
    assert "not httpGet.path /readyz" in kubernetes_budget(manifest)[0]
    container = spec_of(manifest)["containers"][0]
    container["env"].append({"name": "GRACEFUL_READYZ_PATH", "value": "/health/ready"})
    container["readinessProbe"].update(periodSeconds=1, failureThreshold=1)
    assert kubernetes_budget(manifest) == []


def test_settings_that_cannot_be_read_or_are_misplaced_are_reported() -> None:
    manifest = deployment(envFrom=[{"configMapRef": {"name": "graceful"}}])
    env = spec_of(manifest)["containers"][0]["env"]
    env[0] = {"name": "GRACEFUL_DELAY", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "d"}}}
    env[2] = {"name": "GRACEFUL_TOKEN", "value": "s3cret-manifest-token"}
    env.append({"name": "GRACEFUL_DELAYY", "value": "1"})
    warnings = kubernetes_budget(manifest)
    assert any("GRACEFUL_DELAY comes from valueFrom" in w for w in warnings)
    assert any("envFrom is not read" in w for w in warnings)
    assert any("GRACEFUL_TOKEN is written in the manifest" in w for w in warnings)
    assert any("unknown setting GRACEFUL_DELAYY" in w for w in warnings)
    assert not any("s3cret-manifest-token" in w for w in warnings)


def test_the_container_that_sets_graceful_variables_is_the_one_checked() -> None:
    manifest = deployment()
    containers = spec_of(manifest)["containers"]
    containers.insert(0, {"name": "sidecar", "image": "envoy"})  # no probes: not checked
    assert kubernetes_budget(manifest) == []
    assert any("no readinessProbe" in w for w in kubernetes_budget(manifest, container="sidecar"))
    with pytest.raises(BudgetError, match="no container named 'nope'; containers: sidecar, app"):
        kubernetes_budget(manifest, container="nope")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"terminationGracePeriodSeconds": "30x"}, "terminationGracePeriodSeconds='30x'"),
        ({"terminationGracePeriodSeconds": -1}, "terminationGracePeriodSeconds=-1"),
        ({"containers": []}, "no containers"),
    ],
)
def test_a_malformed_pod_spec_is_an_error(change: dict[str, Any], message: str) -> None:
    manifest = deployment()
    spec_of(manifest).update(change)
    with pytest.raises(BudgetError, match=message):
        kubernetes_budget(manifest)


def test_a_bad_setting_in_the_env_is_an_error_naming_container_and_variable() -> None:
    manifest = deployment()
    spec_of(manifest)["containers"][0]["env"][0]["value"] = "5x"
    with pytest.raises(BudgetError, match=r"container 'app': GRACEFUL_DELAY='5x' is not a number"):
        kubernetes_budget(manifest)


def test_a_manifest_without_a_pod_template_is_an_error() -> None:
    service = {"kind": "Service", "spec": {"ports": [{"port": 80}]}}
    assert pod_spec(service) is None
    with pytest.raises(BudgetError, match="Service has no pod template"):
        kubernetes_budget(service)


def test_pods_and_cronjobs_are_read_too() -> None:
    spec = spec_of(deployment())
    assert pod_spec({"kind": "Pod", "spec": spec}) is spec
    cron = {"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": {"spec": spec}}}}}
    assert pod_spec(cron) is spec
    assert kubernetes_budget(copy.deepcopy(cron)) == []


# -- systemd_budget ------------------------------------------------------------------------

UNIT = """\
[Unit]
Description=app
# TimeoutStopSec=1 in a comment is not a setting

[Service]
ExecStart=/srv/venv/bin/gunicorn -c python:graceful.gunicorn \\
    --workers 4 app:app
Environment="GRACEFUL_DELAY=2" GRACEFUL_DRAIN_TIMEOUT=25
KillMode=mixed
TimeoutStopSec=35

[Install]
WantedBy=multi-user.target
"""


def unit(**changes: str | None) -> str:
    """UNIT with [Service] keys replaced (value), removed (None) or added."""
    lines = UNIT.splitlines()
    for key, value in changes.items():
        lines = [line for line in lines if not line.startswith(key + "=")]
        if value is not None:
            lines.insert(lines.index("[Install]") - 1, f"{key}={value}")
    return "\n".join(lines) + "\n"


def test_a_unit_within_its_stop_timeout_gives_no_warning() -> None:
    assert systemd_budget(UNIT) == []


def test_a_stop_timeout_too_short_is_named_with_the_numbers() -> None:
    [warning] = systemd_budget(unit(TimeoutStopSec="20s"))
    assert "delay (2 s) + drain_timeout (25 s) + server stop (2 s) = 29 s" in warning
    assert "does not fit TimeoutStopSec (20 s)" in warning
    [warning] = systemd_budget(unit(TimeoutStopSec=None, TimeoutSec="20"))
    assert "does not fit TimeoutSec (20 s)" in warning


def test_without_a_stop_timeout_systemd_default_of_90_s_is_assumed_and_said() -> None:
    [warning] = systemd_budget(unit(TimeoutStopSec=None))
    assert "TimeoutStopSec is not set: systemd's default applies (90 s unless" in warning
    assert "DefaultTimeoutStopSec" in warning
    text = unit(TimeoutStopSec=None, Environment="GRACEFUL_DRAIN_TIMEOUT=100")
    assert "does not fit TimeoutStopSec (90 s)" in systemd_budget(text)[1]


@pytest.mark.parametrize("value", ["infinity", "0"])
def test_no_stop_timeout_fits_any_budget(value: str) -> None:
    assert (
        systemd_budget(unit(TimeoutStopSec=value, Environment="GRACEFUL_DRAIN_TIMEOUT=999")) == []
    )


@pytest.mark.parametrize(
    ("kill_mode", "why"),
    [
        (None, "KillMode is not set (default control-group): SIGTERM goes to every process"),
        ("control-group", "KillMode=control-group: SIGTERM goes to every process"),
        ("process", "KillMode=process: when TimeoutStopSec runs out only the main process"),
        ("none", "KillMode=none: systemd kills nothing"),
    ],
)
def test_a_kill_mode_other_than_mixed_is_reported(kill_mode: str | None, why: str) -> None:
    [warning] = systemd_budget(unit(KillMode=kill_mode))
    assert warning.startswith(why)
    assert "set KillMode=mixed" in warning


@pytest.mark.parametrize(
    ("value", "name"), [("SIGINT", "SIGINT"), ("QUIT", "SIGQUIT"), ("2", "SIGINT")]
)
def test_a_kill_signal_other_than_sigterm_is_reported(value: str, name: str) -> None:
    [warning] = systemd_budget(unit(KillSignal=value))
    assert warning.startswith(f"KillSignal={name}: only SIGTERM drains")
    assert systemd_budget(unit(KillSignal="15")) == systemd_budget(unit(KillSignal="TERM")) == []


def test_environment_lines_accumulate_and_an_empty_one_resets_them() -> None:
    text = unit(Environment=None).replace(
        "KillMode=mixed",
        "Environment=GRACEFUL_DELAY=50\nEnvironment=\n"
        "Environment='GRACEFUL_DELAY=9' GRACEFUL_QUIET_PERIOD=1\n"
        "Environment=GRACEFUL_DRAIN_TIMEOUT=30\nKillMode=mixed",
    )
    [warning] = systemd_budget(text)
    assert "delay (9 s) + drain_timeout (30 s)" in warning


def test_an_environment_file_and_unknown_settings_are_reported() -> None:
    text = unit(EnvironmentFile="/etc/app.env").replace("GRACEFUL_DRAIN", "GRACEFUL_DRIAN")
    warnings = systemd_budget(text)
    assert any(w.startswith("EnvironmentFile= is not read here") for w in warnings)
    assert any(
        w.startswith("unknown setting GRACEFUL_DRIAN_TIMEOUT in Environment=") for w in warnings
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (unit(TimeoutStopSec="30x"), "TimeoutStopSec='30x' is not a duration"),
        (unit(Environment="GRACEFUL_DELAY=soon"), "Environment=: GRACEFUL_DELAY='soon'"),
        (unit(Environment='"GRACEFUL_DELAY=1'), "cannot be read"),
        (unit(Environment="GRACEFUL_DELAY"), "is not VARIABLE=value"),
        (unit(KillSignal="99"), "KillSignal='99' is not a signal"),
        (UNIT.replace("KillMode=mixed", "KillMode mixed"), "'KillMode mixed' is not Key=Value"),
        ("[Unit]\nDescription=x\n", "no \\[Service\\] section"),
    ],
)
def test_a_malformed_unit_is_an_error(text: str, message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        systemd_budget(text)


def test_settings_outside_the_service_section_are_ignored() -> None:
    text = UNIT.replace("[Install]", "[Install]\nTimeoutStopSec=1\nKillMode=none")
    assert systemd_budget(text) == []

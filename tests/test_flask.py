"""graceful.flask: the extension, its app.config settings, and what a view can ask of it."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from flask import Flask, Response, stream_with_context

import graceful
from graceful import Config, ConfigError, Lifecycle, Phase, WSGIMiddleware
from graceful.flask import Graceful, GracefulState, get_state, hold, is_draining
from graceful.pytest_plugin import FakeClock, RequestDrain

TOKEN = "flask-token-0123"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, graceful_lifecycle: Lifecycle) -> None:
    """No ``GRACEFUL_*`` variables of the test run; the process-wide lifecycle, which the
    extension takes by default, is the pytest plugin's fresh one (on ``graceful_clock``)."""
    for key in [k for k in os.environ if k.startswith("GRACEFUL_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def make_app(**config: object) -> Flask:
    app = Flask(__name__)
    app.config.update(config)

    @app.get("/hello")
    def hello() -> str:
        return "hello"

    @app.get("/draining")
    def draining() -> str:
        return "yes" if is_draining() else "no"

    return app


def test_graceful_app_wraps_wsgi_app_and_answers_probes_before_flask() -> None:
    app = make_app()
    original = app.wsgi_app
    lifecycle = Graceful(app).lifecycle
    assert isinstance(app, Flask)  # the app itself is left alone ...
    assert isinstance(app.wsgi_app, WSGIMiddleware)  # ... its wsgi_app is wrapped
    assert app.wsgi_app.app == original
    assert lifecycle is graceful.get_lifecycle()  # the process-wide one, which the shims link
    client = app.test_client()
    assert client.get("/readyz").status_code == 200  # ready at once: WSGI has no start-up
    assert client.get("/hello").data == b"hello"
    extension_state = app.extensions["graceful"]
    assert isinstance(extension_state, GracefulState)
    assert extension_state.middleware is app.wsgi_app


def test_app_factory_sets_up_each_app_from_one_extension() -> None:
    ext = Graceful()

    def create_app(**config: object) -> Flask:
        app = make_app(**config)
        ext.init_app(app)
        return app

    first, second = create_app(), create_app(GRACEFUL_READYZ_PATH="/ready")
    for app in (first, second):
        state = get_state(app)
        assert state.extension is ext
        assert state.lifecycle is graceful.get_lifecycle()
        with app.app_context():
            assert ext.lifecycle is state.lifecycle
    assert get_state(first).config.readyz_path == "/readyz"
    assert get_state(second).config.readyz_path == "/ready"
    assert second.test_client().get("/ready").status_code == 200
    assert second.test_client().get("/hello").data == b"hello"


def test_an_extension_not_set_up_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"init_app"):
        _ = Graceful().lifecycle
    with make_app().app_context(), pytest.raises(RuntimeError, match=r"init_app"):
        is_draining()


def test_init_app_twice_on_one_app_is_refused() -> None:
    app = make_app()
    ext = Graceful(app)
    with pytest.raises(RuntimeError, match="already set up"):
        ext.init_app(app)
    manual = make_app()
    manual.wsgi_app = WSGIMiddleware(manual.wsgi_app)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="already set up"):
        Graceful(manual)


def test_graceful_prefixed_config_keys_become_settings() -> None:
    app = make_app(
        GRACEFUL_DELAY=3,
        GRACEFUL_DRAIN_TIMEOUT="12.5",  # strings are parsed, as from a .env file
        GRACEFUL_TOKEN=TOKEN,
        GRACEFUL_READYZ_PATH="/health/ready",
        GRACEFUL_CHECKS={"db": lambda: False},
        SECRET_KEY="not graceful's",
    )
    Graceful(app)
    state = get_state(app)
    assert (state.config.delay, state.config.drain_timeout) == (3.0, 12.5)
    assert state.lifecycle.config is state.config
    client = app.test_client()
    ready = client.get("/health/ready")
    assert ready.status_code == 503  # the db check fails
    assert ready.json is not None and "db" in ready.json["checks"]
    assert client.get("/readyz").status_code == 404  # Flask's own 404: the route moved
    assert client.get("/-/graceful/status").status_code == 401
    status = client.get("/-/graceful/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status.status_code == 200


def _setup(app: Flask) -> Flask:
    Graceful(app)
    return app


def test_app_config_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRACEFUL_DELAY", "7")
    monkeypatch.setenv("GRACEFUL_DRAIN_TIMEOUT", "9")
    state = get_state(_setup(make_app(GRACEFUL_DELAY=1.5)))
    assert (state.config.delay, state.config.drain_timeout) == (1.5, 9.0)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("GRACEFUL_DELAY", "soon", "GRACEFUL_DELAY='soon' is not a number"),
        ("GRACEFUL_DELAY", -1, "GRACEFUL_DELAY=-1 is not allowed"),
        ("GRACEFUL_EVENTS_MAX_SUBSCRIBERS", 2.5, "GRACEFUL_EVENTS_MAX_SUBSCRIBERS=2.5"),
        ("GRACEFUL_READYZ_PATH", "readyz", "GRACEFUL_READYZ_PATH='readyz' is not allowed"),
        ("GRACEFUL_CHECKS", {"db": "SELECT 1"}, "GRACEFUL_CHECKS['db']='SELECT 1'"),
        ("GRACEFUL_DELAI", 1, "GRACEFUL_DELAI is not a graceful setting; known: GRACEFUL_CHECKS"),
    ],
)
def test_a_bad_config_value_raises_config_error_naming_the_key(
    key: str, value: object, says: str
) -> None:
    app = make_app(**{key: value})
    original = app.wsgi_app
    with pytest.raises(ConfigError) as raised:
        Graceful(app)
    assert str(raised.value).startswith("app.config ")
    assert says in str(raised.value)
    assert app.wsgi_app == original and "graceful" not in app.extensions  # left untouched


def test_a_bad_token_is_named_but_never_echoed() -> None:
    secret = "has space"
    with pytest.raises(ConfigError, match="GRACEFUL_TOKEN") as raised:
        Graceful(make_app(GRACEFUL_TOKEN=secret))
    assert secret not in str(raised.value)


def test_settings_that_clash_together_name_the_app_config_keys() -> None:
    app = make_app(GRACEFUL_LIVEZ_PATH="/health", GRACEFUL_READYZ_PATH="/health")
    with pytest.raises(ConfigError, match=r"GRACEFUL_LIVEZ_PATH, GRACEFUL_READYZ_PATH"):
        Graceful(app)


def test_a_view_sees_the_drain_and_the_response_announces_it() -> None:
    app = make_app()
    lifecycle = Graceful(app).lifecycle
    client = app.test_client()
    assert client.get("/draining").data == b"no"
    lifecycle.drain("test")
    response = client.get("/draining")
    assert response.data == b"yes"  # served, not refused, while draining
    assert response.headers["Graceful-State"] == "draining"
    assert client.get("/readyz").status_code == 503


def test_counting_ends_when_the_server_closes_a_streamed_response() -> None:
    app = make_app()
    lifecycle = Graceful(app).lifecycle

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            yield "a"
            yield "b"

        return Response(stream_with_context(chunks()))

    response = app.test_client().get("/stream", buffered=False)
    assert lifecycle.inflight == 1  # the view has returned; its body is not sent yet
    assert response.get_data() == b"ab"
    response.close()
    assert lifecycle.inflight == 0


def test_a_drain_during_a_streamed_response_waits_until_the_server_closes_it(
    graceful_drain_during_request: Callable[..., RequestDrain],
) -> None:
    app = make_app()
    Graceful(app)

    @app.get("/stream")
    def stream() -> Response:
        def chunks() -> Iterator[str]:
            yield "a"
            yield "draining" if is_draining() else "serving"  # sent after the drain began

        return Response(stream_with_context(chunks()))

    outcome = graceful_drain_during_request(app, "/stream")
    assert (outcome.status, outcome.body) == (200, b"adraining")  # served to its end
    assert outcome.inflight_at_drain == 1
    assert outcome.phase_in_flight is Phase.DRAINING  # the delay is over: the stream holds it
    assert outcome.phase_after is Phase.DRAINED  # closed by the server: the drain completes


def test_a_hold_keeps_a_drain_open_until_the_work_ends(
    graceful_lifecycle: Lifecycle, graceful_clock: FakeClock
) -> None:
    lifecycle = graceful_lifecycle
    app = make_app()
    ext = Graceful(app)
    assert ext.lifecycle is lifecycle
    with app.test_request_context("/"):
        job = hold("report").__enter__()
    assert lifecycle.inflight == 1
    lifecycle.drain("deploy")
    graceful_clock.advance(lifecycle.config.delay + 5.0)  # the delay is long over ...
    assert lifecycle.phase is Phase.DRAINING  # ... but the report is still being built
    job.__exit__()
    assert lifecycle.tick() is Phase.DRAINED
    with ext.hold("outside a request"):  # the extension's own handle works anywhere
        assert lifecycle.inflight == 1
    assert lifecycle.inflight == 0


def test_an_explicit_lifecycle_keeps_its_settings_under_the_app_s() -> None:
    lifecycle = Lifecycle(Config(delay=4.0, drain_timeout=8.0))
    state = get_state(_setup_with(make_app(GRACEFUL_DELAY=2), lifecycle))
    assert state.lifecycle is lifecycle and lifecycle is not graceful.get_lifecycle()
    assert (lifecycle.config.delay, lifecycle.config.drain_timeout) == (2.0, 8.0)


def _setup_with(app: Flask, lifecycle: Lifecycle) -> Flask:
    Graceful(app, lifecycle=lifecycle)
    return app


class LinkedNode:
    """What a gunicorn worker's lifecycle is linked to (graceful._runtime.lifecycle.Node), alone."""

    poll_interval = 0.02

    def others_inflight(self) -> int:
        return 0

    def by_worker(self, own: int) -> dict[str, int]:
        return {"1": own}

    def announce(self, phase: Phase, reason: str, *, final: bool, since: float | None) -> None:
        pass

    def drain_state(self) -> tuple[float | None, bool]:
        return None, False

    def stuck(self, now: float) -> list[tuple[str, str, float]]:
        return []


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        ({"GRACEFUL_DELAY": 3, "GRACEFUL_TOKEN": TOKEN}, "GRACEFUL_DELAY"),
        ({"GRACEFUL_DRAIN_TIMEOUT": 25.0}, None),  # the environment's value (the default)
        ({"GRACEFUL_TOKEN": TOKEN}, None),  # not a timing: the master does not use it
    ],
)
def test_timings_the_gunicorn_master_cannot_see_are_warned_about_in_a_worker(
    caplog: pytest.LogCaptureFixture, settings: dict[str, object], warned: str | None
) -> None:
    lifecycle = Lifecycle(Config.from_env())
    lifecycle.node = LinkedNode()
    with caplog.at_level("WARNING", logger="graceful"):
        Graceful(make_app(**settings), lifecycle=lifecycle)
    warnings = [r.getMessage() for r in caplog.records if "gunicorn's master" in r.getMessage()]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0] and "--preload" in warnings[0]
        assert TOKEN not in warnings[0]


def test_timings_in_app_config_are_not_warned_about_outside_gunicorn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="graceful"):
        Graceful(make_app(GRACEFUL_DELAY=3))  # also: gunicorn --preload, before any fork
    assert not [r for r in caplog.records if "gunicorn's master" in r.getMessage()]


def test_auto_ready_off_leaves_readiness_to_the_app() -> None:
    app = make_app()
    lifecycle = Graceful(app, auto_ready=False).lifecycle
    client = app.test_client()
    assert client.get("/readyz").status_code == 503
    lifecycle.mark_ready()
    assert client.get("/readyz").status_code == 200


def test_without_flask_the_import_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "graceful.flask")
    monkeypatch.setitem(sys.modules, "flask", None)
    with pytest.raises(ImportError, match=r"pip install 'graceful-drain\[flask\]'"):
        importlib.import_module("graceful.flask")


def test_importing_graceful_does_not_import_flask() -> None:
    code = "import sys, graceful, graceful.wsgi; sys.exit('flask' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=30).returncode == 0

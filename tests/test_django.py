"""graceful.django: settings, wrapped entry points, the probe middleware and the system checks.

Django runs in this process with settings configured below (this module is the URLconf). Each
test gets a fresh process-wide lifecycle, which the entry points and the middleware pick up.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

import django
import pytest
from django.conf import settings
from django.core.asgi import get_asgi_application as django_asgi
from django.core.checks import CheckMessage, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.wsgi import get_wsgi_application as django_wsgi
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from django.urls import path

import graceful
import graceful.django
from graceful import Lifecycle, Phase
from graceful._core.types import Message
from graceful.pytest_plugin import RequestDrain

if not settings.configured:
    settings.configure(
        SECRET_KEY="test-only",
        DEBUG=False,
        ALLOWED_HOSTS=["good.example"],
        INSTALLED_APPS=["graceful.django"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        DATABASES={},
        USE_TZ=True,
        TIME_ZONE="UTC",
        WSGI_APPLICATION=None,
        LOGGING_CONFIG=None,
    )
    django.setup()

GRACEFUL_MW = "graceful.django.middleware.GracefulMiddleware"
SECURITY_MW = "django.middleware.security.SecurityMiddleware"
COMMON_MW = "django.middleware.common.CommonMiddleware"
TOKEN = "django-test-token"
THIS = sys.modules[__name__]

#: Each test gets the pytest plugin's fresh process-wide lifecycle (on ``graceful_clock``):
#: the entry points and the middleware use it.
pytestmark = pytest.mark.usefixtures("graceful_lifecycle")


# -- the URLconf -----------------------------------------------------------------------------


def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"pong", content_type="text/plain")


def inflight(request: HttpRequest) -> HttpResponse:
    return HttpResponse(str(graceful.get_lifecycle().inflight).encode(), content_type="text/plain")


def busy(request: HttpRequest) -> HttpResponse:
    """The app's own 503, carrying (by mistake or malice) the reject-mode mark."""
    response = HttpResponse(b"busy", status=503, content_type="text/plain")
    response["Graceful-Rejected"] = "1"
    return response


urlpatterns = [path("ping", ping), path("inflight", inflight), path("busy", busy)]


# -- helpers ---------------------------------------------------------------------------------


class Answer:
    def __init__(self, status: str, headers: list[tuple[str, str]], body: Iterable[bytes]):
        self.status = int(status.split()[0])
        self.headers = dict(headers)
        self.result = body

    def read(self) -> bytes:
        """The body; closes the response, as a WSGI server does."""
        try:
            return b"".join(self.result)
        finally:
            close = getattr(self.result, "close", None)
            if close is not None:
                close()

    def json(self) -> Any:
        return json.loads(self.read())


def call(
    app: Any,
    target: str,
    *,
    method: str = "GET",
    host: str = "good.example",
    headers: dict[str, str] | None = None,
) -> Answer:
    """Call a WSGI app as a server would, over plain http; the answer is not closed yet."""
    path, _, query = target.partition("?")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "good.example",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": host,
        "CONTENT_LENGTH": "0",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, response_headers: list[tuple[str, str]], *exc: Any) -> Any:
        started.append((status, response_headers))
        return lambda data: None

    result = app(environ, start_response)
    return Answer(*started[-1], result)


def get(app: Any, target: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    answer = call(app, target, **kwargs)
    body = answer.read()
    return answer.status, answer.headers, body


async def call_asgi(app: Any, target: str, *, host: str = "good.example") -> tuple[int, bytes]:
    path, _, query = target.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", host.encode())],
        "server": ("good.example", 80),
        "client": ("127.0.0.1", 50000),
    }
    requested = False
    never = asyncio.Event()  # the client never goes away: Django cancels its listener
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body


def phase_of(lifecycle: Lifecycle) -> Phase:
    return lifecycle.phase  # a call: mypy does not narrow across it


def graceful_messages() -> list[CheckMessage]:
    return run_checks(tags=["graceful"])


def ids() -> list[str]:
    return sorted(str(message.id) for message in graceful_messages())


def use_entry(monkeypatch: pytest.MonkeyPatch, name: str, app: Any) -> str:
    """Make ``app`` importable as ``<this module>.<name>`` (for WSGI_/ASGI_APPLICATION)."""
    monkeypatch.setattr(THIS, name, app, raising=False)
    return f"{__name__}.{name}"


class OuterWrapper:
    """Another WSGI middleware around graceful's (as Sentry's or WhiteNoise's would be)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


# -- settings --------------------------------------------------------------------------------


def test_settings_dict_keys_are_config_fields() -> None:
    with override_settings(GRACEFUL={"delay": 3, "drain_timeout": 7, "token": TOKEN}):
        config = graceful.django.get_config()
    assert (config.delay, config.drain_timeout, config.token) == (3.0, 7.0, TOKEN)


def test_settings_dict_wins_over_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRACEFUL_DELAY", "9")
    monkeypatch.setenv("GRACEFUL_DRAIN_TIMEOUT", "11")
    with override_settings(GRACEFUL={"delay": 3}):
        config = graceful.django.get_config()
    assert (config.delay, config.drain_timeout) == (3.0, 11.0)


def test_an_unknown_key_is_an_error_that_names_it() -> None:
    with override_settings(GRACEFUL={"dealy": 3}), pytest.raises(graceful.ConfigError) as err:
        graceful.django.get_config()
    assert "GRACEFUL['dealy']" in str(err.value)
    assert "delay" in str(err.value)  # the known names are listed
    assert isinstance(err.value, ImproperlyConfigured)


def test_a_bad_value_is_an_error_that_names_the_key() -> None:
    with override_settings(GRACEFUL={"delay": "soon"}), pytest.raises(graceful.ConfigError) as err:
        graceful.django.get_config()
    assert "GRACEFUL" in str(err.value) and "delay='soon'" in str(err.value)
    assert isinstance(err.value, ImproperlyConfigured)


#: Every way a Django app starts graceful: the two entry points, and Django's own handler
#: building the probe middleware (with the MIDDLEWARE each needs).
START_UPS: dict[str, tuple[Callable[[], Any], list[str]]] = {
    "wsgi-entry": (graceful.django.get_wsgi_application, []),
    "asgi-entry": (graceful.django.get_asgi_application, []),
    "middleware": (django_wsgi, [GRACEFUL_MW]),
}


def start_up(name: str, graceful_setting: object) -> None:
    entry, middleware = START_UPS[name]
    with override_settings(GRACEFUL=graceful_setting, MIDDLEWARE=middleware):
        entry()


@pytest.mark.parametrize("start", sorted(START_UPS))
@pytest.mark.parametrize("deadline", [0, -5, "30s", float("inf"), True, None])
def test_a_bad_kill_deadline_is_a_config_error_naming_it_at_start_up(
    start: str, deadline: object
) -> None:
    with pytest.raises(graceful.ConfigError) as err:
        start_up(start, {"kill_deadline": deadline})
    assert str(err.value).startswith(f"settings.GRACEFUL['kill_deadline']={deadline!r} ")
    assert isinstance(err.value, ImproperlyConfigured)  # what Django's own tools expect
    assert isinstance(err.value, graceful.django.SettingsError)


@pytest.mark.parametrize("start", sorted(START_UPS))
@pytest.mark.parametrize("value", ["drain_timeout=20", [("delay", 1)], None])
def test_a_graceful_setting_that_is_not_a_dict_is_a_config_error_at_start_up(
    start: str, value: object
) -> None:
    with pytest.raises(graceful.ConfigError, match=r"^settings\.GRACEFUL must be a dict") as err:
        start_up(start, value)
    assert isinstance(err.value, ImproperlyConfigured)
    if isinstance(value, str):
        assert value not in str(err.value)  # never echoed: it could be a misplaced token


def test_the_kill_deadline_is_read_from_the_settings_with_kubernetes_default() -> None:
    assert graceful.django.get_kill_deadline() == 30.0
    with override_settings(GRACEFUL={"kill_deadline": 45}):
        assert graceful.django.get_kill_deadline() == 45.0
    with override_settings(GRACEFUL={"kill_deadline": 0}), pytest.raises(graceful.ConfigError):
        graceful.django.get_kill_deadline()


def test_the_entry_point_uses_the_settings_and_the_process_wide_lifecycle(
    graceful_lifecycle: Lifecycle,
) -> None:
    with override_settings(GRACEFUL={"readyz_path": "/healthz/ready"}):
        app = graceful.django.get_wsgi_application()
    assert app.lifecycle is graceful_lifecycle  # the one the gunicorn shim links
    assert graceful_lifecycle.phase is Phase.SERVING
    assert get(app, "/healthz/ready")[0] == 200
    assert get(app, "/ping")[2] == b"pong"


def test_without_django_the_import_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "django", None)  # None: "import django" fails
    for name in [n for n in sys.modules if n == "graceful.django" or n.startswith("graceful.dj")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install 'graceful-drain\[django\]'"):
        importlib.import_module("graceful.django")


# -- probes win over SECURE_SSL_REDIRECT, ALLOWED_HOSTS and APPEND_SLASH ---------------------

STRICT = {
    "SECURE_SSL_REDIRECT": True,
    "ALLOWED_HOSTS": ["good.example"],
    "APPEND_SLASH": True,
}


def assert_the_strict_settings_bite(app: Any) -> None:
    """Ordinary requests get the redirect and the 400 the probes must not get."""
    assert get(app, "/ping")[0] == 301
    assert get(app, "/ping", host="evil.example")[0] == 400


def test_probe_middleware_answers_503_to_a_foreign_host_despite_ssl_redirect(
    graceful_lifecycle: Lifecycle,
) -> None:
    with override_settings(MIDDLEWARE=[GRACEFUL_MW, SECURITY_MW, COMMON_MW], **STRICT):
        app = django_wsgi()
        assert_the_strict_settings_bite(app)
        assert get(app, "/readyz", host="evil.example")[0] == 200
        graceful_lifecycle.drain("test")
        status, headers, body = get(app, "/readyz", host="evil.example")
        assert status == 503, body
        assert headers["Content-Type"] == "application/health+json"
        assert json.loads(body)["output"] == "draining"
        assert get(app, "/livez", host="evil.example")[0] == 200


def test_wrapped_wsgi_entry_answers_503_to_a_foreign_host_despite_ssl_redirect(
    graceful_lifecycle: Lifecycle,
) -> None:
    with override_settings(MIDDLEWARE=[SECURITY_MW, COMMON_MW], **STRICT):
        app = graceful.django.get_wsgi_application()
        assert_the_strict_settings_bite(app)
        graceful_lifecycle.drain("test")
        status, _, body = get(app, "/readyz", host="evil.example")
        assert status == 503, body
        assert json.loads(body)["output"] == "draining"


def test_wrapped_asgi_entry_answers_503_to_a_foreign_host_despite_ssl_redirect(
    graceful_lifecycle: Lifecycle,
) -> None:
    async def scenario() -> None:
        app = graceful.django.get_asgi_application()
        assert (await call_asgi(app, "/ping"))[0] == 301
        assert (await call_asgi(app, "/ping", host="evil.example"))[0] == 400
        assert (await call_asgi(app, "/readyz", host="evil.example"))[0] == 200
        graceful_lifecycle.drain("test")
        status, body = await call_asgi(app, "/readyz", host="evil.example")
        assert status == 503, body
        assert json.loads(body)["output"] == "draining"

    with override_settings(MIDDLEWARE=[SECURITY_MW, COMMON_MW], **STRICT):
        asyncio.run(scenario())


def test_probe_middleware_under_asgi_answers_503_and_releases_the_count(
    graceful_lifecycle: Lifecycle,
) -> None:
    async def scenario() -> None:
        app = django_asgi()
        assert (await call_asgi(app, "/ping", host="evil.example"))[0] == 400
        assert graceful_lifecycle.inflight == 0  # Django closed the response: released
        graceful_lifecycle.drain("test")
        status, body = await call_asgi(app, "/readyz", host="evil.example")
        assert status == 503, body

    with override_settings(MIDDLEWARE=[GRACEFUL_MW, SECURITY_MW, COMMON_MW], **STRICT):
        asyncio.run(scenario())


def test_behind_the_security_middleware_a_draining_readyz_becomes_a_redirect(
    graceful_lifecycle: Lifecycle,
) -> None:
    """Why graceful.W001 exists: not first, the probe never sees the 503."""
    with override_settings(MIDDLEWARE=[SECURITY_MW, GRACEFUL_MW, COMMON_MW], **STRICT):
        app = django_wsgi()
        graceful_lifecycle.drain("test")
        assert get(app, "/readyz")[0] == 301
        assert get(app, "/readyz", host="evil.example")[0] == 400
        assert ids() == ["graceful.W001"]


# -- counting and control routes through the middleware ---------------------------------------


def test_probe_middleware_counts_a_request_until_django_closes_the_response(
    graceful_lifecycle: Lifecycle,
) -> None:
    with override_settings(MIDDLEWARE=[GRACEFUL_MW, COMMON_MW]):
        app = django_wsgi()
        answer = call(app, "/inflight")
        assert graceful_lifecycle.inflight == 1  # answered, but the server has not closed it yet
        assert answer.read() == b"1"
        assert graceful_lifecycle.inflight == 0
        assert get(app, "/readyz")[0] == 200  # probes are not counted
        assert graceful_lifecycle.inflight == 0


@pytest.mark.parametrize(
    ("middleware", "entry"),
    [
        ([GRACEFUL_MW, COMMON_MW], django_wsgi),
        ([COMMON_MW], graceful.django.get_wsgi_application),
        ([COMMON_MW], graceful.django.get_asgi_application),
    ],
    ids=["middleware", "wsgi-entry", "asgi-entry"],
)
def test_a_drain_during_a_request_is_held_open_until_django_has_answered_it(
    graceful_drain_during_request: Callable[..., RequestDrain],
    middleware: list[str],
    entry: Callable[[], Any],
) -> None:
    with override_settings(MIDDLEWARE=middleware):
        app = entry()
        outcome = graceful_drain_during_request(app, "/inflight", headers={"Host": "good.example"})
    assert (outcome.status, outcome.body) == (200, b"1")  # served, and counted while served
    assert outcome.inflight_at_drain == 1
    assert outcome.phase_in_flight is Phase.DRAINING  # the delay is over: the request holds it
    assert outcome.phase_after is Phase.DRAINED


def test_behind_the_wrapped_entry_point_the_middleware_does_not_count_twice(
    graceful_lifecycle: Lifecycle,
) -> None:
    with override_settings(MIDDLEWARE=[GRACEFUL_MW, COMMON_MW]):
        app = graceful.django.get_wsgi_application()
        assert get(app, "/inflight")[2] == b"1"
        assert graceful_lifecycle.inflight == 0


def test_probe_middleware_marks_responses_while_draining(graceful_lifecycle: Lifecycle) -> None:
    with override_settings(MIDDLEWARE=[GRACEFUL_MW, COMMON_MW]):
        app = django_wsgi()
        assert "Graceful-State" not in get(app, "/ping")[1]
        graceful_lifecycle.drain("test")
        status, headers, body = get(app, "/ping")
        assert (status, body) == (200, b"pong")  # still served while draining
        assert headers["Graceful-State"] == "draining"


@pytest.mark.parametrize("draining", [False, True])
def test_probe_middleware_removes_the_reject_mark_from_djangos_own_503(
    graceful_lifecycle: Lifecycle, draining: bool
) -> None:
    # Only graceful's own rejection may carry the mark: a pool re-sends a POST on it.
    with override_settings(MIDDLEWARE=[GRACEFUL_MW, COMMON_MW]):
        app = django_wsgi()
        if draining:
            graceful_lifecycle.drain("test")
        status, headers, body = get(app, "/busy")
        assert (status, body) == (503, b"busy")
        assert "Graceful-Rejected" not in headers


def test_probe_middleware_serves_the_control_routes_with_the_token(
    graceful_lifecycle: Lifecycle,
) -> None:
    with override_settings(
        MIDDLEWARE=[GRACEFUL_MW, SECURITY_MW, COMMON_MW], GRACEFUL={"token": TOKEN}, **STRICT
    ):
        app = django_wsgi()
        assert get(app, "/-/graceful/drain", method="POST", host="evil.example")[0] == 401
        assert phase_of(graceful_lifecycle) is Phase.SERVING
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = get(app, "/-/graceful/drain", method="POST", headers=auth)
        assert status == 200, body
        assert phase_of(graceful_lifecycle) is Phase.DRAINING
        assert get(app, "/-/graceful/status", headers=auth)[0] == 200


def test_probe_middleware_streams_events_and_releases_the_subscriber(
    graceful_lifecycle: Lifecycle,
) -> None:
    with override_settings(MIDDLEWARE=[GRACEFUL_MW, COMMON_MW]):
        app = django_wsgi()
        answer = call(app, "/-/graceful/events")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    chunks = iter(answer.result)
    seen = b""
    while b"serving" not in seen:  # the retry line, then the current phase
        seen += next(chunks)
    assert len(graceful_lifecycle.events) == 1
    close = getattr(answer.result, "close", None)
    assert close is not None
    close()
    assert len(graceful_lifecycle.events) == 0


# -- system checks ---------------------------------------------------------------------------


def test_no_warning_when_the_middleware_is_first() -> None:
    with override_settings(MIDDLEWARE=[GRACEFUL_MW, SECURITY_MW, COMMON_MW]):
        assert ids() == []


def test_warns_w001_when_the_middleware_is_not_first() -> None:
    with override_settings(MIDDLEWARE=[SECURITY_MW, GRACEFUL_MW]):
        (message,) = graceful_messages()
    assert message.id == "graceful.W001"
    assert SECURITY_MW in message.msg and "first" in message.msg


def test_warns_w002_when_the_wsgi_entry_is_not_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = use_entry(monkeypatch, "plain_wsgi", django_wsgi())
    with override_settings(WSGI_APPLICATION=plain, MIDDLEWARE=[COMMON_MW]):
        (message,) = graceful_messages()
    assert message.id == "graceful.W002"
    assert plain in message.msg
    assert message.hint is not None and "get_wsgi_application" in message.hint


def test_no_w002_when_the_wsgi_entry_is_wrapped_or_the_middleware_is_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrapped = graceful.django.get_wsgi_application()
    for name, app in [("wrapped_wsgi", wrapped), ("outer_wsgi", OuterWrapper(wrapped))]:
        entry = use_entry(monkeypatch, name, app)
        with override_settings(WSGI_APPLICATION=entry, MIDDLEWARE=[COMMON_MW]):
            assert ids() == [], name
    plain = use_entry(monkeypatch, "plain_wsgi", django_wsgi())
    with override_settings(WSGI_APPLICATION=plain, MIDDLEWARE=[GRACEFUL_MW, COMMON_MW]):
        assert ids() == []


def test_warns_w003_when_the_asgi_entry_is_not_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = use_entry(monkeypatch, "plain_asgi", django_asgi())
    # The middleware does not help under ASGI: the warning stays.
    with override_settings(ASGI_APPLICATION=plain, MIDDLEWARE=[GRACEFUL_MW]):
        (message,) = graceful_messages()
    assert message.id == "graceful.W003"
    assert message.hint is not None and "get_asgi_application" in message.hint
    wrapped = use_entry(monkeypatch, "wrapped_asgi", graceful.django.get_asgi_application())
    with override_settings(ASGI_APPLICATION=wrapped, MIDDLEWARE=[GRACEFUL_MW]):
        assert ids() == []


@pytest.mark.parametrize(
    ("setting", "warned"),
    [
        # The defaults under Kubernetes leave no room for the server's own stop in 30 s.
        ({"delay": 5, "drain_timeout": 25}, True),
        ({"delay": 5, "drain_timeout": 25, "kill_deadline": 35}, False),
        ({"delay": 10, "drain_timeout": 25}, True),
        ({"delay": 5, "drain_timeout": 25, "kill_deadline": 20}, True),
        ({"delay": 10, "drain_timeout": 25, "kill_deadline": 60}, False),
    ],
)
def test_warns_w004_when_the_drain_does_not_fit_the_kill_deadline(
    setting: dict[str, float], warned: bool
) -> None:
    with override_settings(GRACEFUL=setting):
        messages = graceful_messages()
    assert [m.id for m in messages] == (["graceful.W004"] if warned else [])
    if warned:
        assert "kill_deadline" in messages[0].msg


@pytest.mark.parametrize(
    ("setting", "named"),
    [({"dealy": 1}, "'dealy'"), ({"kill_deadline": "30s"}, "'kill_deadline'")],
)
def test_reports_e001_for_invalid_settings(setting: dict[str, object], named: str) -> None:
    with override_settings(GRACEFUL=setting):
        (message,) = graceful_messages()
    assert message.id == "graceful.E001"
    assert named in message.msg

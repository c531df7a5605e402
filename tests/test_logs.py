"""Log lines: every phase change is logged with its reason and in-flight count, and the token
never reaches a log."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from wsgiref.util import setup_testing_defaults

import pytest

import graceful
from graceful._core.types import Environ, StartResponse

TOKEN = "s3cret-Token-never-logged"


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def call(
    middleware: graceful.WSGIMiddleware, method: str, path: str, token: str | None = None
) -> str:
    environ: Environ = {}
    setup_testing_defaults(environ)
    environ.update(REQUEST_METHOD=method, PATH_INFO=path)
    if token is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    status: list[str] = []

    def start_response(code: str, headers: list[tuple[str, str]], exc_info: object = None) -> None:
        status.append(code)

    result = middleware(environ, start_response)  # type: ignore[arg-type]
    b"".join(result)
    getattr(result, "close", lambda: None)()
    return status[0]


def test_phase_changes_are_logged_with_reason_and_inflight_and_the_token_never_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = graceful.Config(token=TOKEN, delay=0.0)
    lifecycle = graceful.Lifecycle(config)
    middleware = graceful.WSGIMiddleware(app, lifecycle)
    assert call(middleware, "GET", "/-/graceful/status", TOKEN) == "200 OK"
    assert call(middleware, "POST", "/-/graceful/drain", TOKEN + "x").startswith("401")
    with lifecycle.hold("job"):
        assert call(middleware, "POST", "/-/graceful/drain", TOKEN) == "200 OK"
    assert call(middleware, "POST", "/-/graceful/resume", TOKEN) == "200 OK"
    lifecycle.stop("test over")
    logging.getLogger("graceful").info("config: %r", config)
    with pytest.raises(graceful.ConfigError) as error:
        graceful.Config(token=TOKEN + " with a space")
    logging.getLogger("graceful").info("error: %s", error.value)

    text = caplog.text
    assert "phase starting -> serving (ready), 0 in flight" in text
    assert "phase serving -> draining (drained by control route), 1 in flight" in text
    assert "phase draining -> drained (drained), 0 in flight" in text
    assert "phase drained -> serving (resumed by control route)" in text
    assert "phase serving -> stopping (test over)" in text
    assert TOKEN not in text

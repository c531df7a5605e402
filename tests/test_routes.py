"""Probes and control routes, answered the same way by the WSGI and the ASGI middleware."""

from __future__ import annotations

import threading
import time

import pytest
from _apps import (
    AUTH,
    KINDS,
    TOKEN,
    Client,
    FakeClock,
    Kind,
    Reply,
    make_client,
    new_lifecycle,
    phase_of,
    wait_until,
)

import graceful

Phase = graceful.Phase


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    return value


def _client(kind: Kind, *, token: str | None = TOKEN, **settings: object) -> Client:
    lc = new_lifecycle(FakeClock(), token=token, **settings)
    return make_client(kind, lc)


def _assert_health(reply: Reply, status: int, verdict: str, output: str | None = None) -> None:
    assert reply.status == status, reply
    assert reply.header("Content-Type") == "application/health+json"
    assert reply.header("Cache-Control") == "no-store"
    body = reply.json()
    assert body["status"] == verdict
    if output is not None:
        assert body["output"] == output


# -- /livez ----------------------------------------------------------------------------------


def test_livez_answers_200_while_serving_and_while_draining(kind: Kind) -> None:
    client = _client(kind)
    _assert_health(client.request("GET", "/livez"), 200, "pass")
    client.lifecycle.drain("deploy")
    _assert_health(client.request("GET", "/livez"), 200, "pass")


def test_livez_head_answers_200_without_a_body(kind: Kind) -> None:
    client = _client(kind)
    reply = client.request("HEAD", "/livez")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.header("Cache-Control") == "no-store"


# -- /readyz ---------------------------------------------------------------------------------


def test_readyz_passes_while_serving(kind: Kind) -> None:
    client = _client(kind)
    _assert_health(client.request("GET", "/readyz"), 200, "pass", "serving")


def test_readyz_fails_while_starting(kind: Kind) -> None:
    lc = new_lifecycle(FakeClock())
    client = make_client(kind, lc, auto_ready=False)
    _assert_health(client.request("GET", "/readyz"), 503, "fail", "starting")


def test_readyz_fails_while_draining_and_drained(kind: Kind) -> None:
    clock = FakeClock()
    lc = new_lifecycle(clock, delay=5.0)
    client = make_client(kind, lc)
    lc.drain("deploy")
    reply = client.request("GET", "/readyz")
    _assert_health(reply, 503, "fail", "draining")
    assert reply.json()["notes"] == ["deploy"]
    clock.advance(5.0)
    _assert_health(client.request("GET", "/readyz"), 503, "fail", "drained")


def test_readyz_fails_while_stopping(kind: Kind) -> None:
    client = _client(kind)
    client.lifecycle.stop("shutting down")
    _assert_health(client.request("GET", "/readyz"), 503, "fail", "stopping")


def test_readyz_passes_again_after_resume(kind: Kind) -> None:
    client = _client(kind)
    client.lifecycle.drain()
    client.lifecycle.resume()
    _assert_health(client.request("GET", "/readyz"), 200, "pass", "serving")


@pytest.mark.parametrize("draining", [False, True])
def test_readyz_head_has_status_and_no_body(kind: Kind, draining: bool) -> None:
    client = _client(kind)
    if draining:
        client.lifecycle.drain()
    reply = client.request("HEAD", "/readyz")
    assert reply.status == (503 if draining else 200)
    assert reply.body == b""
    assert reply.header("Content-Type") == "application/health+json"


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_probes_answer_405_with_allow_for_other_methods(kind: Kind, path: str, method: str) -> None:
    client = _client(kind)
    reply = client.request(method, path)
    assert reply.status == 405
    assert reply.header("Allow") == "GET, HEAD"
    assert reply.json()["status"] == "fail"
    assert client.calls == []


# -- control routes: who may call them -------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/-/graceful/status"),
        ("POST", "/-/graceful/drain"),
        ("POST", "/-/graceful/resume"),
    ],
)
def test_control_routes_are_404_without_a_configured_token(
    kind: Kind, method: str, path: str
) -> None:
    client = _client(kind, token=None)
    reply = client.request(method, path, headers=AUTH)
    assert reply.status == 404
    assert phase_of(client.lifecycle) is Phase.SERVING
    assert client.calls == []


def test_resume_without_a_configured_token_is_404_and_keeps_draining(kind: Kind) -> None:
    client = _client(kind, token=None)
    client.lifecycle.drain("deploy")
    assert client.request("POST", "/-/graceful/resume").status == 404
    assert phase_of(client.lifecycle) is Phase.DRAINING


BAD_AUTH: dict[str, tuple[tuple[str, str], ...]] = {
    "missing": (),
    "wrong token": (("Authorization", "Bearer not-the-token"),),
    "token prefix": (("Authorization", f"Bearer {TOKEN[:-1]}"),),
    "wrong scheme": (("Authorization", f"Basic {TOKEN}"),),
    "no scheme": (("Authorization", TOKEN),),
    "empty": (("Authorization", ""),),
    "duplicated": (("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}")),
}


@pytest.mark.parametrize("auth", list(BAD_AUTH), ids=list(BAD_AUTH))
def test_drain_with_bad_authorization_is_401_and_changes_nothing(kind: Kind, auth: str) -> None:
    client = _client(kind)
    reply = client.request("POST", "/-/graceful/drain", headers=BAD_AUTH[auth])
    assert reply.status == 401
    assert reply.header("WWW-Authenticate") == 'Bearer realm="graceful"'
    assert TOKEN not in reply.body.decode()
    assert phase_of(client.lifecycle) is Phase.SERVING
    assert client.calls == []


@pytest.mark.parametrize("auth", list(BAD_AUTH), ids=list(BAD_AUTH))
def test_resume_with_bad_authorization_is_401_and_keeps_draining(kind: Kind, auth: str) -> None:
    client = _client(kind)
    client.lifecycle.drain("deploy")
    assert client.request("POST", "/-/graceful/resume", headers=BAD_AUTH[auth]).status == 401
    assert phase_of(client.lifecycle) is Phase.DRAINING


@pytest.mark.parametrize("auth", list(BAD_AUTH), ids=list(BAD_AUTH))
def test_status_with_bad_authorization_is_401(kind: Kind, auth: str) -> None:
    client = _client(kind)
    reply = client.request("GET", "/-/graceful/status", headers=BAD_AUTH[auth])
    assert reply.status == 401
    assert "inflight" not in reply.json()


def test_bearer_scheme_is_case_insensitive(kind: Kind) -> None:
    client = _client(kind)
    reply = client.request(
        "GET", "/-/graceful/status", headers=(("Authorization", f"bearer {TOKEN}"),)
    )
    assert reply.status == 200


# -- control routes: what they do ------------------------------------------------------------


def test_status_reports_the_lifecycle_as_json(kind: Kind) -> None:
    client = _client(kind)
    reply = client.request("GET", "/-/graceful/status", headers=AUTH)
    assert reply.status == 200
    assert reply.header("Content-Type") == "application/json"
    assert reply.header("Cache-Control") == "no-store"
    body = reply.json()
    assert body["phase"] == "serving"
    assert body["version"] == graceful.__version__
    assert body["inflight"] == 0  # the status request itself is not counted


def test_drain_answers_200_and_the_node_is_draining(kind: Kind) -> None:
    client = _client(kind)
    reply = client.request("POST", "/-/graceful/drain", headers=AUTH)
    assert reply.status == 200
    assert reply.json()["phase"] == "draining"
    assert phase_of(client.lifecycle) is Phase.DRAINING
    assert client.lifecycle.reason == "drained by control route"
    # Draining again is accepted and changes nothing (scripts can retry).
    assert client.request("POST", "/-/graceful/drain", headers=AUTH).status == 200
    assert phase_of(client.lifecycle) is Phase.DRAINING


def test_drain_while_starting_is_409_and_stays_starting(kind: Kind) -> None:
    lc = new_lifecycle(FakeClock(), token=TOKEN)
    client = make_client(kind, lc, auto_ready=False)
    reply = client.request("POST", "/-/graceful/drain", headers=AUTH)
    assert reply.status == 409
    body = reply.json()
    assert body["phase"] == "starting"
    assert "starting" in body["output"]
    assert phase_of(lc) is Phase.STARTING


def test_resume_answers_200_and_the_node_serves_again(kind: Kind) -> None:
    client = _client(kind)
    client.lifecycle.drain("deploy")
    reply = client.request("POST", "/-/graceful/resume", headers=AUTH)
    assert reply.status == 200
    assert reply.json()["phase"] == "serving"
    assert phase_of(client.lifecycle) is Phase.SERVING


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/-/graceful/drain", "POST"),
        ("GET", "/-/graceful/resume", "POST"),
        ("POST", "/-/graceful/status", "GET, HEAD"),
    ],
)
def test_control_routes_answer_405_with_allow(
    kind: Kind, method: str, path: str, allow: str
) -> None:
    client = _client(kind)
    reply = client.request(method, path, headers=AUTH)
    assert reply.status == 405
    assert reply.header("Allow") == allow
    assert phase_of(client.lifecycle) is Phase.SERVING


@pytest.mark.parametrize(
    ("path", "status", "auth"),
    [
        ("/-/graceful/drain", 405, True),
        ("/-/graceful/resume", 405, True),
        ("/-/graceful/events", 405, False),
        ("/-/graceful/status", 401, False),
        ("/-/graceful/nope", 404, True),
    ],
)
def test_head_on_a_control_route_answers_without_a_body(
    kind: Kind, path: str, status: int, auth: bool
) -> None:
    client = _client(kind)
    reply = client.request("HEAD", path, headers=AUTH if auth else ())
    assert reply.status == status
    assert reply.body == b""
    assert phase_of(client.lifecycle) is Phase.SERVING


def test_head_on_a_control_route_of_a_node_without_a_token_answers_without_a_body(
    kind: Kind,
) -> None:
    client = _client(kind, token=None)
    reply = client.request("HEAD", "/-/graceful/status")
    assert reply.status == 404
    assert reply.body == b""


@pytest.mark.parametrize("path", ["/-/graceful/nope", "/-/graceful", "/-/graceful/drain/x"])
def test_unknown_control_route_is_404_and_never_reaches_the_app(kind: Kind, path: str) -> None:
    client = _client(kind)
    for method in ("GET", "POST"):
        assert client.request(method, path, headers=AUTH).status == 404
    assert client.calls == []
    assert phase_of(client.lifecycle) is Phase.SERVING


BAD_QUERIES = [
    "wait=2",
    "wait=maybe",
    "timeout=abc",
    "timeout=-1",
    "timeout=0",
    "timeout=nan",
    "timeout=inf",
    "wait=1&timeout=1e9",
    "force=1",
    "wait=1&wait=1",
    "timeout=1&timeout=2",
    "wait=1&&",
    # Only plain decimals, as the README documents: float() takes all of these.
    "wait=1&timeout=1_0",
    "wait=1&timeout=%D9%A3",
    "wait=1&timeout=1e1",
    "wait=1&timeout=%2B5",
    "wait=1&timeout=%205",
]


@pytest.mark.parametrize("query", BAD_QUERIES)
def test_drain_with_a_bad_query_is_400_and_changes_nothing(kind: Kind, query: str) -> None:
    # Real clock and no delay: a bad value let through would answer at once, never hang.
    client = make_client(kind, new_lifecycle(token=TOKEN, delay=0.0))
    reply = client.request("POST", "/-/graceful/drain", query=query, headers=AUTH)
    assert reply.status == 400
    assert reply.json()["status"] == "fail"
    assert phase_of(client.lifecycle) is Phase.SERVING


@pytest.mark.parametrize("query", ["timeout=5", "wait=0&timeout=5", "timeout=5&wait=no"])
def test_drain_timeout_without_wait_is_400_and_changes_nothing(kind: Kind, query: str) -> None:
    client = _client(kind)
    reply = client.request("POST", "/-/graceful/drain", query=query, headers=AUTH)
    assert reply.status == 400
    assert reply.json() == {"status": "fail", "output": "timeout applies only with wait=1"}
    assert phase_of(client.lifecycle) is Phase.SERVING


def test_resume_with_a_query_is_400_and_keeps_draining(kind: Kind) -> None:
    client = _client(kind)
    client.lifecycle.drain("deploy")
    reply = client.request("POST", "/-/graceful/resume", query="wait=1", headers=AUTH)
    assert reply.status == 400
    assert phase_of(client.lifecycle) is Phase.DRAINING


def test_drain_wait_answers_200_once_drained(kind: Kind) -> None:
    lc = new_lifecycle(delay=0.0, token=TOKEN)  # real clock: the request really waits
    client = make_client(kind, lc)
    replies: list[Reply] = []
    hold = lc.hold("job")
    hold.__enter__()
    thread = threading.Thread(
        target=lambda: replies.append(
            client.request("POST", "/-/graceful/drain", query="wait=1", headers=AUTH)
        )
    )
    thread.start()
    try:
        wait_until(lambda: phase_of(lc) is Phase.DRAINING, what="the drain to start")
        thread.join(0.2)  # the answer must wait for the held work; this bounded join proves it
        assert replies == []
    finally:
        hold.__exit__(None, None, None)
        thread.join(10)
    assert len(replies) == 1
    assert replies[0].status == 200
    assert replies[0].json()["phase"] == "drained"


def test_drain_wait_answers_202_when_the_timeout_passes_first(kind: Kind) -> None:
    lc = new_lifecycle(delay=0.0, token=TOKEN)
    client = make_client(kind, lc)
    with lc.hold("job"):
        started = time.monotonic()
        reply = client.request(
            "POST", "/-/graceful/drain", query="wait=1&timeout=0.2", headers=AUTH
        )
        waited = time.monotonic() - started
        assert reply.status == 202
        assert reply.json()["phase"] == "draining"  # the drain goes on
        assert phase_of(lc) is Phase.DRAINING
    assert 0.15 <= waited < 5.0
    assert phase_of(lc) is Phase.DRAINED


def test_drain_wait_0_answers_at_once(kind: Kind) -> None:
    client = _client(kind)
    with client.lifecycle.hold("job"):
        reply = client.request("POST", "/-/graceful/drain", query="wait=0", headers=AUTH)
    assert reply.status == 200
    assert reply.json()["phase"] == "draining"


# -- probes and control requests are not the app's business ---------------------------------


def test_probes_and_control_requests_never_reach_the_app_and_are_not_counted(
    kind: Kind,
) -> None:
    seen_inflight: list[int] = []
    lc = new_lifecycle(FakeClock(), token=TOKEN)
    lc.configure(lc.config.replace(checks={"spy": lambda: seen_inflight.append(lc.inflight)}))
    client = make_client(kind, lc)
    client.request("GET", "/livez")
    client.request("HEAD", "/readyz")
    client.request("GET", "/readyz")
    status = client.request("GET", "/-/graceful/status", headers=AUTH)
    client.request("POST", "/-/graceful/drain", headers=AUTH)
    client.request("POST", "/-/graceful/resume", headers=AUTH)
    client.request("GET", "/-/graceful/nope", headers=AUTH)
    assert client.calls == []
    assert seen_inflight == [0]  # during the readiness probe nothing was in flight
    assert status.json()["inflight"] == 0
    assert lc.requests.last_arrival is None  # nothing was ever counted
    app_reply = client.request("GET", "/app")
    assert app_reply.body == b"hello"
    assert client.calls == [("/app", 1)]
    assert lc.inflight == 0


def test_paths_that_only_look_like_probes_reach_the_app(kind: Kind) -> None:
    client = _client(kind)
    for path in ("/readyz/", "/livez/x", "/-/gracefulx", "/-/other"):
        assert client.request("GET", path).body == b"hello"
    assert [path for path, _ in client.calls] == [
        "/readyz/",
        "/livez/x",
        "/-/gracefulx",
        "/-/other",
    ]


def test_custom_probe_paths_and_control_prefix(kind: Kind) -> None:
    client = _client(
        kind, livez_path="/health/live", readyz_path="/health/ready", control_prefix="/ops"
    )
    _assert_health(client.request("GET", "/health/live"), 200, "pass")
    _assert_health(client.request("GET", "/health/ready"), 200, "pass", "serving")
    # The default paths are now the app's.
    assert client.request("GET", "/readyz").body == b"hello"
    assert client.request("POST", "/-/graceful/drain", headers=AUTH).body == b"hello"
    assert phase_of(client.lifecycle) is Phase.SERVING
    assert client.request("POST", "/ops/drain", headers=AUTH).status == 200
    assert phase_of(client.lifecycle) is Phase.DRAINING
    _assert_health(client.request("GET", "/health/ready"), 503, "fail", "draining")
    assert client.request("GET", "/ops/status", headers=AUTH).json()["phase"] == "draining"
    assert client.request("GET", "/ops/nope", headers=AUTH).status == 404
    assert [path for path, _ in client.calls] == ["/readyz", "/-/graceful/drain"]

"""Hypothesis fuzzing of everything the WSGI and ASGI middleware parse before the app.

Paths (probe and control prefixes with junk, percent-encoding, trailing slashes, huge ones),
methods, query strings (``?wait=`` / ``?timeout=`` with junk), headers (bearer tokens of every
shape, huge and repeated headers, non-ASCII bytes) and request bodies are thrown at both
middlewares, called directly (a WSGI environ and ``start_response``; an ASGI scope, ``receive``
and ``send`` under ``asyncio.run``). After every request:

- nothing raised out of the middleware, and the answer is well formed;
- the phase changed only if the request carried the valid token;
- a probe or control request never reached the app, every other request reached it once
  (unless the node rejects while draining);
- the in-flight count and the events subscribers are back to zero.

Example counts are bounded and the runs derandomized, so the file runs in seconds in CI.
atheris is not used: it is not installed here (and has no wheels for every Python we support).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graceful import ASGIMiddleware, Config, Lifecycle, Phase, WSGIMiddleware
from graceful._core.surface import NEVER_REJECTED
from graceful._core.types import Environ, Message, Scope, StartResponse

TOKEN = "fuzz-T0ken_9c1e-0042"
PREFIX = "/-/graceful"
PROBES = ("/livez", "/readyz")
CONTROL = tuple(f"{PREFIX}/{name}" for name in ("status", "drain", "resume", "events"))
OWN_STATUSES = {200, 202, 400, 401, 404, 405, 409, 503}

FUZZ = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,  # a shared, busy CI machine: no per-example time limit
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the oracle: written from the documented routes, not from the library's matcher ----------


def is_own(path: str) -> bool:
    """Whether the middleware must answer ``path`` itself (a probe or the control prefix)."""
    return path in PROBES or path == PREFIX or path.startswith(PREFIX + "/")


# -- strategies --------------------------------------------------------------------------------

junk = st.text(max_size=40)
latin1 = st.binary(max_size=60).map(lambda b: b.decode("latin-1"))
huge = st.integers(min_value=1_000, max_value=200_000).map(lambda n: "x" * n)

paths = st.one_of(
    st.sampled_from([*PROBES, *CONTROL, PREFIX, "/", "/app"]),
    st.builds(lambda base, tail: base + tail, st.sampled_from([*PROBES, *CONTROL, PREFIX]), junk),
    st.builds(
        lambda base, tail: base + tail,
        st.sampled_from([*PROBES, *CONTROL, PREFIX]),
        st.sampled_from(["/", "//", "%2F", "/..", "/./", "?", "#", "\x00", ";x", " ", "é"]),
    ),
    st.sampled_from(
        [
            "/-/graceful/dr%61in",
            "/-/graceful%2Fdrain",
            "/%2D/graceful/drain",
            "//-/graceful/drain",
            "/-/GRACEFUL/drain",
            "/READYZ",
            "/readyz/",
            "/livez%00",
            "/-/graceful/../drain",
        ]
    ),
    st.builds(lambda base, tail: base + "/" + tail, st.sampled_from([PREFIX, "/app"]), huge),
    st.text(max_size=60).map(lambda t: "/" + t),
    st.text(max_size=20),  # not even a leading slash
)

methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get", "post"]),
    st.text(max_size=30),
    huge,
)

_query_value = st.one_of(
    st.sampled_from(["", "1", "0", "yes", "off", "nan", "inf", "-1", "1e309", "0x10", "3601"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    junk,
)
queries = st.one_of(
    st.just(""),
    st.builds(lambda w: f"wait={w}", _query_value),
    st.builds(lambda t: f"timeout={t}", _query_value),
    st.builds(lambda w, t: f"wait={w}&timeout={t}", _query_value, _query_value),
    st.builds(lambda a, b: f"wait={a}&wait={b}", _query_value, _query_value),
    st.lists(st.sampled_from(["wait=1", "timeout=1", "x=1", "&", "=", "%", "%zz", ";"])).map(
        "&".join
    ),
    latin1,
    huge.map(lambda h: "wait=" + h),
)


def _never_valid(value: str) -> bool:
    return TOKEN not in value


bad_authorizations = st.one_of(
    st.sampled_from(
        [
            "",
            "Bearer",
            "Bearer ",
            "bearer",
            "Basic " + TOKEN[:-1],
            "Bearer " + TOKEN[:-1],
            "Bearer " + TOKEN[1:],
            "Bearer " + TOKEN.upper(),
            "Token " + "x" * 16,
            "Bearer\t" + "x" * 16,
        ]
    ),
    st.builds(lambda scheme, cred: f"{scheme} {cred}", st.sampled_from(["Bearer", "bearer"]), junk),
    latin1,
    st.text(max_size=60),  # non-latin-1 characters too (no server should pass them on)
    huge.map(lambda h: "Bearer " + h),
).filter(_never_valid)

#: Header sets that carry the valid token but must still be refused.
repeated_valid = st.integers(min_value=2, max_value=50).map(
    lambda n: [("Authorization", f"Bearer {TOKEN}")] * n
)

other_headers = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(["Host", "X-Forwarded-For", "Content-Type", "Cookie"]), latin1),
        st.one_of(latin1, huge),
    ).filter(lambda header: header[0].upper().replace("-", "_") != "AUTHORIZATION"),
    max_size=8,
)
#: The same header many times over (servers pass repeats on: WSGI joined, ASGI one by one).
repeated_headers = st.tuples(
    st.sampled_from(["X-Forwarded-For", "Cookie", "Accept", "Host"]),
    latin1,
    st.integers(min_value=2, max_value=500),
).map(lambda spec: [(spec[0], spec[1])] * spec[2])
bodies = st.one_of(st.just(b""), st.binary(max_size=200), huge.map(str.encode))


# -- the node under test -------------------------------------------------------------------------


@dataclass
class Node:
    lifecycle: Lifecycle
    calls: list[str] = field(default_factory=list)


def make_node(draining: bool, reject: bool, delay: float = 30.0) -> Node:
    lifecycle = Lifecycle(Config(token=TOKEN, delay=delay, reject_when_draining=reject))
    lifecycle.mark_ready()
    if draining:
        lifecycle.drain("fuzz")
    return Node(lifecycle)


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    streaming: bool


def _wsgi_answer(status: str, headers: list[tuple[str, str]]) -> Answer:
    code, _, text = status.partition(" ")
    assert code.isdigit() and len(code) == 3 and text, status
    for name, value in headers:
        assert isinstance(name, str) and isinstance(value, str), (name, value)
        value.encode("latin-1")  # PEP 3333: header values are latin-1 strings
    streaming = ("Content-Type", "text/event-stream; charset=utf-8") in headers
    return Answer(int(code), headers, streaming)


def wsgi_request(
    node: Node,
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
) -> Answer:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        node.calls.append(environ["PATH_INFO"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app"]

    environ: Environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.url_scheme": "http",
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    for name, value in headers:  # repeated headers are joined with ", " as servers do
        key = "HTTP_" + name.upper().replace("-", "_")
        environ[key] = f"{environ[key]}, {value}" if key in environ else value
    started: list[Answer] = []

    def start_response(
        status: str, response_headers: list[tuple[str, str]], exc_info: object = None
    ) -> Any:
        started.append(_wsgi_answer(status, response_headers))
        return lambda data: None

    middleware = WSGIMiddleware(app, node.lifecycle)
    result = middleware(environ, start_response)
    try:
        assert len(started) == 1, started
        if not started[0].streaming:  # an events stream never ends by itself: only closed
            for chunk in result:
                assert isinstance(chunk, bytes)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return started[0]


def asgi_request(
    node: Node,
    method: str,
    path: str,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    http_version: str = "1.1",
) -> Answer:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        node.calls.append(scope["path"])
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app"})

    chunks: list[Message] = [
        {"type": "http.request", "body": body[:50], "more_body": True},
        {"type": "http.request", "body": body[50:], "more_body": False},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        if chunks:
            return chunks.pop(0)
        await asyncio.sleep(0)  # then the client goes away (ends an events stream)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": http_version,
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    middleware = ASGIMiddleware(app, node.lifecycle)
    asyncio.run(asyncio.wait_for(middleware(scope, receive, send), 30))
    assert sent and sent[0]["type"] == "http.response.start", sent
    for name, value in sent[0]["headers"]:
        assert isinstance(name, bytes) and isinstance(value, bytes), (name, value)
    streaming = (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    if not streaming:
        assert not sent[-1].get("more_body", False), "response not finished"
    decoded = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in sent[0]["headers"]]
    return Answer(sent[0]["status"], decoded, streaming)


def _to_asgi_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [
        (k.lower().encode("utf-8", "replace"), v.encode("utf-8", "replace")) for k, v in headers
    ]


def check_after(
    node: Node, path: str, answer: Answer, before: Phase, reject: bool, method: str = "GET"
) -> None:
    lifecycle = node.lifecycle
    draining = before is not Phase.SERVING
    if is_own(path):
        assert node.calls == [], f"{path!r} reached the app"
        assert answer.status in OWN_STATUSES, answer
    elif reject and draining and method not in NEVER_REJECTED:  # POST, PATCH, LOCK: served
        assert node.calls == [] and answer.status == 503, answer
    else:
        assert node.calls == [path], node.calls
        assert answer.status == 200, answer
    assert lifecycle.inflight == 0
    assert len(lifecycle.events) == 0, "an events subscriber was left behind"


# -- without the valid token: any request, nothing changes -------------------------------------


request_parts = st.fixed_dictionaries(
    {
        "method": methods,
        "path": paths,
        "query": queries,
        "auth": st.one_of(st.just([]), bad_authorizations.map(lambda a: [("Authorization", a)])),
        "others": st.one_of(other_headers, repeated_headers),
        "body": bodies,
        "draining": st.booleans(),
        "reject": st.booleans(),
        "http_version": st.one_of(st.sampled_from(["1.0", "1.1", "2", "3"]), junk),
    }
)


@FUZZ
@given(parts=request_parts)
def test_wsgi_requests_without_the_token_never_crash_change_nothing_or_leak_to_the_app(
    parts: dict[str, Any],
) -> None:
    node = make_node(parts["draining"], parts["reject"])
    before = node.lifecycle.phase

    answer = wsgi_request(
        node,
        parts["method"],
        parts["path"],
        parts["query"],
        [*parts["auth"], *parts["others"]],
        parts["body"],
    )

    assert node.lifecycle.phase is before
    check_after(node, parts["path"], answer, before, parts["reject"], parts["method"])


@FUZZ
@given(parts=request_parts)
def test_asgi_requests_without_the_token_never_crash_change_nothing_or_leak_to_the_app(
    parts: dict[str, Any],
) -> None:
    node = make_node(parts["draining"], parts["reject"])
    before = node.lifecycle.phase

    answer = asgi_request(
        node,
        parts["method"],
        parts["path"],
        parts["query"].encode("utf-8", "replace"),
        _to_asgi_headers([*parts["auth"], *parts["others"]]),
        parts["body"],
        parts["http_version"],
    )

    assert node.lifecycle.phase is before
    check_after(node, parts["path"], answer, before, parts["reject"], parts["method"])


@FUZZ
@given(
    route=st.sampled_from([f"{PREFIX}/drain", f"{PREFIX}/resume", f"{PREFIX}/status"]),
    headers=st.one_of(
        bad_authorizations.map(lambda auth: [("Authorization", auth)]),
        st.tuples(bad_authorizations, st.integers(min_value=2, max_value=50)).map(
            lambda pair: [("Authorization", pair[0])] * pair[1]
        ),
        repeated_valid,
    ),
    draining=st.booleans(),
)
def test_control_routes_refuse_wrong_or_repeated_authorization_on_both_adapters(
    route: str, headers: list[tuple[str, str]], draining: bool
) -> None:
    # A repeated Authorization header is refused even when every copy holds the token: a
    # WSGI server joins the copies with ", ", an ASGI server passes each one on.
    for kind in ("wsgi", "asgi"):
        node = make_node(draining, reject=False)
        before = node.lifecycle.phase
        if kind == "wsgi":
            answer = wsgi_request(node, "POST", route, "", headers, b"")
        else:
            answer = asgi_request(node, "POST", route, b"", _to_asgi_headers(headers), b"")
        assert answer.status == 401, (kind, answer)
        assert node.lifecycle.phase is before
        check_after(node, route, answer, before, reject=False)


# -- with the valid token: junk queries and bodies on the control routes -----------------------


token_parts = st.fixed_dictionaries(
    {
        "method": st.one_of(st.sampled_from(["POST", "GET", "HEAD"]), methods),
        "route": st.sampled_from([f"{PREFIX}/drain", f"{PREFIX}/resume", f"{PREFIX}/status"]),
        "query": queries,
        "scheme": st.sampled_from(["Bearer", "bearer", "BEARER"]),
        "pad": st.sampled_from(["", " ", "  ", "\t"]),
        "others": other_headers,
        "body": bodies,
        "draining": st.booleans(),
    }
)

_EXPECTED_PHASE = {
    # (route, was draining) -> the phase after a 200 (delay 0, nothing in flight: drained at once)
    ("drain", False): Phase.DRAINED,
    ("drain", True): Phase.DRAINED,
    ("resume", False): Phase.SERVING,
    ("resume", True): Phase.SERVING,
    ("status", False): Phase.SERVING,
    ("status", True): Phase.DRAINED,
}


def _check_with_token(node: Node, parts: dict[str, Any], answer: Answer) -> None:
    name = parts["route"].rsplit("/", 1)[1]
    phase = node.lifecycle.phase
    check_after(node, parts["route"], answer, Phase.SERVING, reject=False)
    assert answer.status in (200, 400, 405), answer
    if answer.status == 200:
        assert phase is _EXPECTED_PHASE[(name, parts["draining"])], (answer, phase)
    else:  # refused: nothing changed
        assert phase is (Phase.DRAINED if parts["draining"] else Phase.SERVING), (answer, phase)


@FUZZ
@given(parts=token_parts)
def test_wsgi_control_routes_with_the_token_answer_junk_queries_with_400_and_no_change(
    parts: dict[str, Any],
) -> None:
    node = make_node(parts["draining"], reject=False, delay=0.0)
    auth = f"{parts['pad']}{parts['scheme']} {parts['pad']}{TOKEN}{parts['pad']}"

    answer = wsgi_request(
        node,
        parts["method"],
        parts["route"],
        parts["query"],
        [("Authorization", auth), *parts["others"]],
        parts["body"],
    )

    _check_with_token(node, parts, answer)


@FUZZ
@given(parts=token_parts)
def test_asgi_control_routes_with_the_token_answer_junk_queries_with_400_and_no_change(
    parts: dict[str, Any],
) -> None:
    node = make_node(parts["draining"], reject=False, delay=0.0)
    auth = f"{parts['pad']}{parts['scheme']} {parts['pad']}{TOKEN}{parts['pad']}"

    answer = asgi_request(
        node,
        parts["method"],
        parts["route"],
        parts["query"].encode("utf-8", "replace"),
        _to_asgi_headers([("Authorization", auth), *parts["others"]]),
        parts["body"],
    )

    _check_with_token(node, parts, answer)


@FUZZ
@given(query=st.binary(max_size=300), others=other_headers)
def test_asgi_raw_query_bytes_of_any_kind_never_crash_the_drain_route(
    query: bytes, others: list[tuple[str, str]]
) -> None:
    node = make_node(draining=False, reject=False, delay=0.0)
    headers = _to_asgi_headers([("Authorization", f"Bearer {TOKEN}"), *others])

    answer = asgi_request(node, "POST", f"{PREFIX}/drain", query, headers, b"")

    assert answer.status in (200, 202, 400), answer
    assert node.lifecycle.phase is (Phase.DRAINED if answer.status != 400 else Phase.SERVING)
    check_after(node, f"{PREFIX}/drain", answer, Phase.SERVING, reject=False)

"""The drain file: while it exists the node drains; removing it resumes a drain it started."""

from __future__ import annotations

from pathlib import Path

import pytest
from _apps import (
    AUTH,
    KINDS,
    TOKEN,
    Client,
    FakeClock,
    Kind,
    WSGIStream,
    hello_wsgi,
    make_client,
    make_environ,
    new_lifecycle,
    phase_of,
    sse_data,
)

import graceful

Phase = graceful.Phase


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    return value


def test_creating_the_file_drains_and_removing_it_resumes(kind: Kind, tmp_path: Path) -> None:
    drain_file = tmp_path / "drain"
    lc = new_lifecycle(FakeClock(), drain_file=str(drain_file))
    client = make_client(kind, lc)
    assert client.request("GET", "/readyz").status == 200

    drain_file.touch()
    reply = client.request("GET", "/readyz")
    assert (reply.status, reply.json()["output"]) == (503, "draining")
    assert lc.reason == "drain file present"

    drain_file.unlink()
    reply = client.request("GET", "/readyz")
    assert (reply.status, reply.json()["output"]) == (200, "serving")


def test_removing_the_file_resumes_a_drained_node(kind: Kind, tmp_path: Path) -> None:
    drain_file = tmp_path / "drain"
    clock = FakeClock()
    lc = new_lifecycle(clock, drain_file=str(drain_file), delay=1.0)
    client = make_client(kind, lc)
    drain_file.touch()
    assert client.request("GET", "/readyz").status == 503
    clock.advance(1.0)
    assert client.request("GET", "/readyz").json()["output"] == "drained"
    drain_file.unlink()
    assert client.request("GET", "/readyz").status == 200


def test_a_file_present_at_start_keeps_the_node_out_from_the_first_probe(
    kind: Kind, tmp_path: Path
) -> None:
    drain_file = tmp_path / "drain"
    drain_file.touch()
    client = make_client(kind, new_lifecycle(FakeClock(), drain_file=str(drain_file)))
    assert client.request("GET", "/readyz").status == 503


def drained_by_the_control_route(kind: Kind, drain_file: Path) -> tuple[graceful.Lifecycle, Client]:
    """A node watching ``drain_file`` (absent), drained by ``POST /-/graceful/drain``."""
    lc = new_lifecycle(FakeClock(), drain_file=str(drain_file), token=TOKEN)
    client = make_client(kind, lc)
    assert client.request("POST", "/-/graceful/drain", headers=AUTH).status == 200
    return lc, client


def test_a_drain_from_the_control_route_is_not_resumed_by_the_files_absence(
    kind: Kind, tmp_path: Path
) -> None:
    lc, client = drained_by_the_control_route(kind, tmp_path / "drain")
    for _ in range(3):
        reply = client.request("GET", "/readyz")
        assert (reply.status, reply.json()["output"]) == (503, "draining")
    assert phase_of(lc) is Phase.DRAINING
    assert lc.reason == "drained by control route"


def test_a_drain_from_the_control_route_outlives_the_files_coming_and_going(
    kind: Kind, tmp_path: Path
) -> None:
    drain_file = tmp_path / "drain"
    lc, client = drained_by_the_control_route(kind, drain_file)
    drain_file.touch()
    client.request("GET", "/readyz")
    drain_file.unlink()
    assert client.request("GET", "/readyz").status == 503
    assert phase_of(lc) is Phase.DRAINING


def test_ordinary_requests_look_at_the_file_at_most_once_per_interval(
    kind: Kind, tmp_path: Path
) -> None:
    drain_file = tmp_path / "drain"
    clock = FakeClock()
    lc = new_lifecycle(clock, drain_file=str(drain_file), drain_file_interval=1.0)
    client = make_client(kind, lc)
    assert client.request("GET", "/app").header("Graceful-State") is None  # looked: no file
    drain_file.touch()
    clock.advance(0.5)
    assert client.request("GET", "/app").header("Graceful-State") is None  # too soon to look
    assert phase_of(lc) is Phase.SERVING
    clock.advance(0.5)
    # Looked again: this very response already tells the caller the node is draining.
    assert client.request("GET", "/app").header("Graceful-State") == "draining"
    assert phase_of(lc) is Phase.DRAINING


def test_an_open_events_stream_notices_the_file(tmp_path: Path) -> None:
    drain_file = tmp_path / "drain"
    lc = new_lifecycle(drain_file=str(drain_file), drain_file_interval=0.02, events_heartbeat=60.0)
    middleware = graceful.WSGIMiddleware(hello_wsgi, lifecycle=lc)
    with WSGIStream(middleware, make_environ(path="/-/graceful/events")) as stream:
        assert stream.next_chunk().startswith(b"retry:")
        first = sse_data(stream.next_chunk())
        assert first is not None
        assert first["phase"] == "serving"
        drain_file.touch()
        # No request arrives: the stream itself looks at the file between its waits.
        notice = sse_data(stream.next_chunk())
        assert notice is not None
        assert (notice["phase"], notice["reason"]) == ("draining", "drain file present")

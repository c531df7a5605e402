"""The wire contract (``graceful._core.protocol``): the headers, paths, status document and
events encoding every side of graceful speaks, and the bounded incremental events decoder."""

from __future__ import annotations

import json
from typing import Any

import pytest
from _apps import AUTH, TOKEN, make_client, new_lifecycle

import graceful
from graceful._core import protocol as wire
from graceful._core.protocol import (
    MAX_EVENT,
    MAX_LINE,
    EventDecoder,
    EventStreamError,
    ProtocolError,
    Status,
)


def test_the_header_names_and_values_are_the_documented_ones() -> None:
    assert (wire.STATE_HEADER, wire.STATE_DRAINING) == ("Graceful-State", "draining")
    assert (wire.REJECTED_HEADER, wire.REJECTED_VALUE) == ("Graceful-Rejected", "1")
    assert (wire.EVENTS_HEADER, wire.EVENTS_OFF) == ("Graceful-Events", "off")
    assert wire.is_draining({"Graceful-State": " Draining "})
    assert not wire.is_draining({})
    assert wire.is_rejected({"Graceful-Rejected": "1"})
    assert not wire.is_rejected({"Graceful-Rejected": "0"})


@pytest.mark.parametrize(("delay", "expected"), [(0.0, "1"), (0.2, "1"), (5.0, "5"), (5.1, "6")])
def test_retry_after_is_the_delay_rounded_up_and_at_least_one_second(
    delay: float, expected: str
) -> None:
    assert wire.retry_after(delay) == expected


def test_the_default_paths_are_the_configs_defaults() -> None:
    config = graceful.Config()
    assert config.livez_path == wire.LIVEZ_PATH
    assert config.readyz_path == wire.READYZ_PATH
    assert config.control_prefix == wire.CONTROL_PREFIX
    assert wire.control_path(wire.EVENTS) == "/-/graceful/events"
    assert wire.control_path(wire.DRAIN, "/ops") == "/ops/drain"


# -- the status document ------------------------------------------------------------------


def test_the_status_route_answers_a_document_the_contract_parses() -> None:
    lifecycle = new_lifecycle(token=TOKEN)
    lifecycle.mark_ready()
    reply = make_client("wsgi", lifecycle).request("GET", "/-/graceful/status", headers=AUTH)
    status = Status.from_json(reply.body)
    assert status.phase == "serving"
    assert status.inflight == 0
    assert status.version == graceful.__version__
    assert json.loads(status.to_json()) == status.to_dict()


def test_a_status_document_round_trips() -> None:
    status = Status(phase="draining", inflight=3, reason="deploy", inflight_by_worker={"7": 3})
    assert Status.from_json(status.to_json()) == status


def test_a_status_document_from_a_newer_node_parses_ignoring_what_it_does_not_know() -> None:
    text = '{"phase":"serving","inflight":1,"shiny_new_field":[1,2],"delay_remaining":null}'
    status = Status.from_json(text)
    assert (status.phase, status.inflight, status.delay_remaining) == ("serving", 1, None)


@pytest.mark.parametrize(
    ("document", "says"),
    [
        (b"not json", "must be JSON"),
        (b"[1, 2]", "must be a JSON object, not list"),
        (b'{"inflight": 0}', "needs a 'phase' string"),
        (b'{"phase": "serving"}', "needs an integer 'inflight'"),
        (b'{"phase": "serving", "inflight": true}', "needs an integer 'inflight'"),
        (b'{"phase": "serving", "inflight": 0, "websockets": "2"}', "'websockets'"),
        (b'{"phase": "serving", "inflight": 0, "inflight_by_worker": [1]}', "inflight_by_worker"),
    ],
)
def test_a_bad_status_document_is_refused_saying_what_is_wrong(document: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says) as caught:
        Status.from_json(document)
    assert isinstance(caught.value, ValueError)  # its standard base
    assert isinstance(caught.value, graceful.GracefulError)


# -- the events stream --------------------------------------------------------------------


def _notice(phase: str, ident: int = 1) -> dict[str, Any]:
    return {"id": ident, "phase": phase, "reason": "r", "retry_after": 2}


def test_events_decode_to_what_was_encoded_whatever_the_chunking() -> None:
    stream = (
        wire.EVENT_RETRY
        + wire.format_comment("heartbeat")
        + wire.format_event(_notice("serving", 1))
        + wire.PROBE_COMMENT
        + wire.format_event(_notice("draining", 2)).replace(b"\n", b"\r\n")
    )
    expected = [_notice("serving", 1), _notice("draining", 2)]
    for size in (1, 2, 7, len(stream)):
        decoder = EventDecoder()
        got = []
        for start in range(0, len(stream), size):
            got += decoder.feed(stream[start : start + size])
        assert got == expected, size
        assert decoder.notices == 2


def test_an_event_without_a_json_object_is_dropped() -> None:
    decoder = EventDecoder()
    assert decoder.feed(b"data: [1]\n\ndata: nope\n\nevent: phase\n\n") == []
    assert decoder.notices == 0


def test_a_line_past_the_limit_breaks_the_stream_before_it_is_held() -> None:
    decoder = EventDecoder()
    decoder.feed(b"x" * MAX_LINE)  # exactly the limit: held
    with pytest.raises(EventStreamError, match=f"longer than {MAX_LINE}"):
        decoder.feed(b"x")
    assert decoder.largest_pending == MAX_LINE


def test_an_event_past_the_limit_breaks_the_stream() -> None:
    decoder = EventDecoder()
    line = b"data: " + b"x" * (MAX_LINE - 10) + b"\n"
    fits = MAX_EVENT // (MAX_LINE - 9)
    assert decoder.feed(line * fits) == []  # within the limit: held
    with pytest.raises(EventStreamError, match=f"longer than {MAX_EVENT}"):
        decoder.feed(line)

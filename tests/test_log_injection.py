"""Values a client sent reach the log escaped: no forged lines, no terminal escapes."""

from __future__ import annotations

import logging

import pytest

import graceful
from graceful._core.logsafe import escape
from graceful._runtime.shutdown import log_stuck

FORGED = "/orders\nWARNING graceful: forged line\r\x1b[2J\u2028end"


def test_escape_keeps_printable_text_and_escapes_control_characters() -> None:
    assert escape("/caf\u00e9/\u4e2d") == "/caf\u00e9/\u4e2d"
    assert escape("a\nb\rc\td\\e\x1b\x00\x7f") == "a\\nb\\rc\\td\\\\e\\x1b\\x00\\x7f"
    assert escape("x\u2028y\u200bz") == "x\\u2028y\\u200bz"


def test_escape_cuts_long_values_and_says_so() -> None:
    assert escape("a" * 500, limit=10) == "a" * 10 + "..."
    assert escape("a" * 10, limit=10) == "a" * 10


@pytest.mark.parametrize("method", ["GET", "GE\nT"])
def test_a_stuck_request_with_a_forged_path_is_logged_on_one_line(
    caplog: pytest.LogCaptureFixture, method: str
) -> None:
    caplog.set_level(logging.INFO, logger="graceful")
    lifecycle = graceful.Lifecycle(graceful.Config(delay=0.0))
    lifecycle.requests.begin(method, FORGED, lifecycle.clock())
    log_stuck(lifecycle, "drain timeout (1s) passed")
    messages = [r.getMessage() for r in caplog.records if "stopping anyway" in r.getMessage()]
    assert len(messages) == 1
    message = messages[0]
    assert "\n" not in message and "\r" not in message and "\x1b" not in message
    assert "\u2028" not in message
    assert "/orders\\nWARNING graceful: forged line\\r\\x1b[2J\\u2028end" in message

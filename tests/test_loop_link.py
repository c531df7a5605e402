"""The loop's stop-signal handlers (:class:`graceful._servers.loop_link.LoopLink`) leave each
signal as they found it: asyncio's own removal would put Python's defaults back."""

from __future__ import annotations

import asyncio
import signal
from types import FrameType

import pytest

from graceful import Config, Lifecycle
from graceful._servers.loop_link import SIGNALS, LoopLink


def _own(signum: int, frame: FrameType | None) -> None:
    """A program's own handler."""


@pytest.mark.parametrize("found", [signal.SIG_IGN, _own], ids=["ignored", "own-handler"])
def test_uninstall_puts_back_the_handlers_install_found(found: object) -> None:
    before = {signum: signal.getsignal(signum) for signum in SIGNALS}
    loop = asyncio.new_event_loop()
    try:
        for signum in SIGNALS:
            signal.signal(signum, found)  # type: ignore[arg-type]
        link = LoopLink(Lifecycle(Config()), loop, lambda: None, lambda: None).install()
        assert all(signal.getsignal(signum) is not found for signum in SIGNALS)
        link.uninstall()
        assert {signum: signal.getsignal(signum) for signum in SIGNALS} == dict.fromkeys(
            SIGNALS, found
        )
    finally:
        loop.close()
        for signum, handler in before.items():
            signal.signal(signum, handler)

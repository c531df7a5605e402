"""The Hypercorn and Granian sections of graceful._servers.compat: an installed release that
lacks an internal graceful relies on is refused with the checked range and what to install."""

from __future__ import annotations

import sys
import types

import pytest

from graceful import GracefulError
from graceful._servers import compat


def test_a_granian_without_the_signal_installers_is_refused_with_the_range_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("granian")
    monkeypatch.setitem(sys.modules, "granian._signals", types.ModuleType("granian._signals"))
    with pytest.raises(compat.GranianInternalsError) as caught:
        compat.wrap_granian_signal_installers(lambda loop, stop: None, lambda stop: None)
    first, last = compat.GRANIAN_CHECKED
    message = str(caught.value)
    assert "granian._signals.set_loop_signals and set_sync_signals" in message
    assert f"pip install 'granian>={first},<={last}'" in message
    assert isinstance(caught.value, GracefulError) and isinstance(caught.value, RuntimeError)


def test_a_hypercorn_without_worker_serve_is_refused_with_the_range_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("hypercorn")
    monkeypatch.setitem(
        sys.modules, "hypercorn.asyncio.run", types.ModuleType("hypercorn.asyncio.run")
    )
    with pytest.raises(compat.HypercornInternalsError) as caught:
        compat.hypercorn_worker_serve(None, None, None, None)
    first, last = compat.HYPERCORN_CHECKED
    message = str(caught.value)
    assert "hypercorn.asyncio.run.worker_serve" in message
    assert f"pip install 'hypercorn>={first},<={last}'" in message
    assert isinstance(caught.value, RuntimeError)

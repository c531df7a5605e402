"""The Hypercorn, Granian and Daphne sections of graceful._servers.compat: an installed release that
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


def test_a_twisted_reactor_without_its_asyncio_loop_is_refused_with_the_range_to_install() -> None:
    pytest.importorskip("twisted")
    with pytest.raises(compat.DaphneInternalsError) as caught:
        compat.reactor_loop(object())
    first, last = compat.TWISTED_CHECKED
    message = str(caught.value)
    assert "reactor._asyncioEventloop" in message
    assert f"pip install 'twisted>={first},<={last}'" in message


def test_only_the_reactors_own_sigterm_handler_counts_as_daphnes() -> None:
    class Reactor:
        def sigTerm(self, number: int, frame: object) -> None: ...

        def sigInt(self, number: int, frame: object) -> None: ...

    reactor = Reactor()
    assert compat.is_reactor_handler(reactor.sigTerm, reactor)
    assert not compat.is_reactor_handler(reactor.sigInt, reactor)
    assert not compat.is_reactor_handler(Reactor().sigTerm, reactor)
    assert not compat.is_reactor_handler(None, reactor)


def test_outside_daphne_there_is_no_reactor_to_link(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "daphne.server", raising=False)
    assert compat.daphne_reactor() is None

"""The gunicorn internals graceful still touches (graceful._servers.compat, gunicorn section):
all there on the installed gunicorn, and a clear error naming the version where one is not."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("gunicorn")

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter

from graceful import GracefulError
from graceful._servers import compat


class _App(BaseApplication):  # type: ignore[misc]
    """The smallest gunicorn application: no config file, no command line."""

    def load_config(self) -> None:
        return None

    def load(self) -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
        return lambda environ, start_response: [b""]


def test_the_installed_gunicorn_has_every_internal_graceful_uses() -> None:
    arbiter = Arbiter(_App())
    compat.check_arbiter(arbiter)
    assert compat.worker_pids(arbiter) == []
    assert compat.holds_listeners_alone(arbiter) is True
    assert "SyncWorker" in compat.worker_class_names(arbiter)
    term, quit_now = compat.take_over_stop_handlers(arbiter, lambda: None, lambda: None)
    with pytest.raises(StopIteration):
        term()  # gunicorn's graceful halt is asked for by raising StopIteration
    assert callable(quit_now)


def test_an_arbiter_without_an_internal_fails_at_start_up_naming_the_gunicorn_version() -> None:
    with pytest.raises(compat.GunicornInternalsError) as caught:
        compat.check_arbiter(SimpleNamespace(handle_term=lambda: None))
    message = str(caught.value)
    assert f"gunicorn {compat.gunicorn_version()} does not have" in message
    assert "Arbiter.handle_int" in message
    assert "22.0.0" in message and "pip install" in message
    assert isinstance(caught.value, GracefulError)


def test_queueing_a_signal_goes_through_the_master_s_own_handler() -> None:
    seen: list[int] = []
    compat.queue_signal(SimpleNamespace(signal=lambda signum, frame: seen.append(signum)), 15)
    assert seen == [signal.SIGTERM]
    with pytest.raises(compat.GunicornInternalsError, match=r"Arbiter\.signal"):
        compat.queue_signal(SimpleNamespace(), signal.SIGTERM)

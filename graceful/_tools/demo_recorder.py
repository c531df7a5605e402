"""The recorder of ``graceful demo --app``: :mod:`graceful.testing._recorder` (the nodes'
module that ``graceful demo`` writes imports it from here)."""

from __future__ import annotations

from ..testing._recorder import (
    ID_HEADER,
    LEDGER_ENV,
    ASGIRecorder,
    WSGIRecorder,
    ran_twice,
    record,
)

__all__ = ["ID_HEADER", "LEDGER_ENV", "ASGIRecorder", "WSGIRecorder", "ran_twice", "record"]

"""The process environment, plugged into the pure config module.

:mod:`graceful._core.config` parses a mapping it is given and reads no environment itself;
this module gives it ``os.environ`` (for ``Config.from_env()`` and the ``delay`` default's
Kubernetes detection) and the ``graceful`` logger for its remarks (unknown ``GRACEFUL_*``
variables). It is imported with :mod:`graceful._runtime`, so ``graceful.Config.from_env()``
reads the process environment as the README documents.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from .._core import config

__all__ = ["environ", "warn"]

logger = logging.getLogger("graceful")


def environ() -> Mapping[str, str]:
    """The process environment, as it is now (a test's ``monkeypatch.setenv`` included)."""
    return os.environ


def warn(message: str) -> None:
    logger.warning("%s", message)


config.plug_environment(environ, warn)

"""The parts of an ``nginx.conf`` that keep a throwaway nginx inside one folder."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["nginx_head", "nginx_temp_paths"]

_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_head(site: Path, *, error_level: str = "info", connections: int = 1024) -> str:
    """The main context of an ``nginx.conf`` for an nginx run in the foreground with one worker,
    its pid file and error log in ``site``; put the ``http { ... }`` block after it.

    Run as root, the worker runs as root too, so that it may write under ``site``.
    """
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        "daemon off;\nmaster_process on;\nworker_processes 1;\n"
        f"{user}pid {site / 'nginx.pid'};\n"
        f"error_log {site / 'error.log'} {error_level};\n"
        f"events {{ worker_connections {connections}; }}\n"
    )


def nginx_temp_paths(site: Path) -> str:
    """The ``*_temp_path`` directives (http context) that keep nginx's temporary files in
    ``site`` instead of its compiled-in prefix, which a test may not write to."""
    return " ".join(f"{kind}_temp_path {site / kind};" for kind in _TEMP_KINDS)

"""The layers, read from the source with ``ast``: the core imports nothing above it and no
I/O, clock, thread, event loop, environment or logging module; each layer imports only the
ones below it. (``lint-imports`` checks the same rules in CI, from ``.importlinter``.)

Every import is collected: at module level, inside functions, under ``if TYPE_CHECKING:``,
and relative ones resolved against the module's package.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "graceful"

#: What the core may never import (any submodule of these included).
FORBIDDEN_IN_CORE = frozenset(
    {"time", "threading", "asyncio", "os", "logging", "blinker", "socket", "select"}
    | {"gunicorn", "uvicorn", "flask", "django", "starlette", "requests", "httpx", "grpc"}
)

#: The layers, bottom first: each may import its own layer and the ones below it.
LAYERS: list[frozenset[str]] = [
    frozenset({"_core"}),
    frozenset({"_runtime"}),
    frozenset({"_adapters"}),
    frozenset({"_servers", "_balancers", "_client"}),
    frozenset({"_tools"}),
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, name: str, *, is_package: bool) -> set[str]:
    """Every module ``source`` (the module ``name``) imports, relative ones resolved."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # ``from . import x`` and ``from pkg import module`` import modules too.
            found.update(
                f"{target}.{alias.name}"
                for alias in node.names
                if is_graceful_module(f"{target}.{alias.name}")
            )
    return found


def is_graceful_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of graceful (not a name inside one)."""
    parts = dotted.split(".")
    if parts[0] != "graceful":
        return False
    path = PACKAGE.parent.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules_under(folder: str) -> list[pathlib.Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def graceful_layer(module: str) -> str | None:
    """The layer a ``graceful.*`` module belongs to, "public" for the facades, else None."""
    parts = module.split(".")
    if parts[0] != "graceful":
        return None
    if len(parts) == 1:
        return "public"
    return parts[1] if parts[1] in LAYER_OF else "public"


def offences(source: str, name: str, *, is_package: bool) -> list[str]:
    """The imports of the module ``name`` that break the layers."""
    own = graceful_layer(name)
    if own is None or own == "public":
        return []
    bad = []
    for target in sorted(imports_of(source, name, is_package=is_package)):
        top = target.split(".")[0]
        if own == "_core" and top in FORBIDDEN_IN_CORE:
            bad.append(f"{name} imports {target}")
            continue
        layer = graceful_layer(target)
        if layer is None:
            continue
        if layer == "public":
            if own == "_core":
                bad.append(f"{name} imports {target} (the core imports nothing above it)")
            # The public modules the layers may use: graceful.signals (blinker's signals) and,
            # for the tools (the demo), graceful.testing (process groups, ports, waiting).
            elif target not in ("graceful", "graceful.signals", "graceful._version") and not (
                own == "_tools" and target.startswith("graceful.testing")
            ):
                bad.append(f"{name} imports the facade {target}")
            continue
        if LAYER_OF[layer] > LAYER_OF[own]:
            bad.append(f"{name} ({own}) imports {target} ({layer}), a layer above it")
        elif LAYER_OF[layer] == LAYER_OF[own] and layer != own:
            bad.append(f"{name} ({own}) imports {target} ({layer}), a sibling layer")
    return bad


def check(path: pathlib.Path) -> list[str]:
    return offences(
        path.read_text(encoding="utf-8"), module_name(path), is_package=path.name == "__init__.py"
    )


CORE = modules_under("_core")


def test_the_core_has_modules_to_check() -> None:
    names = {module_name(path) for path in CORE}
    for expected in ("phases", "machine", "stop", "config", "inflight"):
        assert f"graceful._core.{expected}" in names


@pytest.mark.parametrize("path", CORE, ids=[module_name(p) for p in CORE])
def test_the_core_imports_no_io_clock_thread_logging_framework_or_layer_above(
    path: pathlib.Path,
) -> None:
    assert check(path) == []


LAYERED = [
    path for folder in sorted(LAYER_OF) for path in modules_under(folder) if folder != "_core"
]


@pytest.mark.parametrize("path", LAYERED, ids=[module_name(p) for p in LAYERED])
def test_each_layer_imports_only_the_layers_below_it(path: pathlib.Path) -> None:
    assert check(path) == []


# -- the check itself can fail -------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import time as clock",
        "from threading import Lock",
        "import logging.handlers",
        "def f():\n    import asyncio\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import socket\n",
        "try:\n    import select\nexcept ImportError:\n    pass\n",
        "import blinker",
        "from starlette.requests import Request",
        "from .._runtime.lifecycle import Lifecycle",
        "from .. import signals",
        "from ..asgi import ASGIMiddleware",
        "from graceful._servers import node_shm",
        "import graceful.uvicorn",
    ],
)
def test_a_forbidden_import_in_the_core_is_found(source: str) -> None:
    assert offences(source, "graceful._core.example", is_package=False) != []


def test_a_relative_import_from_a_core_package_init_is_resolved() -> None:
    found = imports_of(
        "from . import phases\nfrom .. import _runtime", "graceful._core", is_package=True
    )
    assert {"graceful._core.phases", "graceful._runtime"} <= found
    assert offences("from .. import _runtime", "graceful._core", is_package=True) != []


def test_the_core_may_import_itself_and_the_pure_standard_library() -> None:
    source = "import enum, math, re\nfrom .phases import Phase\nfrom . import config\n"
    assert offences(source, "graceful._core.example", is_package=False) == []


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("graceful._runtime.x", "from .._adapters.asgi import ASGIMiddleware"),
        ("graceful._adapters.x", "from .._servers import node_shm"),
        ("graceful._servers.x", "from .._tools import cli"),
        ("graceful._servers.x", "from .._balancers import nginx"),
        ("graceful._client.x", "from ..gunicorn import on_starting"),
    ],
)
def test_an_import_upwards_sideways_or_through_a_facade_is_found(name: str, source: str) -> None:
    assert offences(source, name, is_package=False) != []


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("graceful._runtime.x", "from .._core.machine import Machine\nfrom .. import signals"),
        ("graceful._adapters.x", "from .._runtime.lifecycle import Lifecycle"),
        ("graceful._servers.x", "from .._adapters.asgi import ASGIMiddleware"),
        ("graceful._tools.x", "from .._client.pool import Pool\nfrom .._servers import backlog"),
    ],
)
def test_an_import_downwards_is_allowed(name: str, source: str) -> None:
    assert offences(source, name, is_package=False) == []

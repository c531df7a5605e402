"""The public surface is ``graceful.__all__``: sorted, importable and complete (as in httpx)."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re

import pytest

import graceful

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
VERSION_FILE = PYPROJECT.parent / "graceful" / "_version.py"


def test_all_is_sorted_without_duplicates() -> None:
    assert graceful.__all__ == sorted(graceful.__all__)
    assert len(set(graceful.__all__)) == len(graceful.__all__)


def test_every_name_in_all_is_importable() -> None:
    module = importlib.import_module("graceful")
    for name in graceful.__all__:
        assert hasattr(module, name), name
        namespace: dict[str, object] = {}
        exec(f"from graceful import {name}", namespace)
        assert namespace[name] is getattr(module, name)


def test_every_public_class_and_function_of_the_package_is_in_all() -> None:
    exported = set(graceful.__all__)
    for name, value in vars(graceful).items():
        if name.startswith("_"):
            continue
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        if value.__module__ == "graceful" or value.__module__.startswith("graceful."):
            assert name in exported, f"graceful.{name} is public but missing from __all__"


def test_the_core_names_of_the_issue_are_exported() -> None:
    for name in [
        "ASGIMiddleware",
        "Config",
        "ConfigError",
        "GracefulError",
        "Lifecycle",
        "Phase",
        "WSGIMiddleware",
        "get_lifecycle",
        "install_signal_handlers",
        "signals",
    ]:
        assert name in graceful.__all__


def test_every_error_graceful_raises_is_a_graceful_error_keeping_its_standard_base() -> None:
    assert issubclass(graceful.ConfigError, graceful.GracefulError)
    assert issubclass(graceful.ConfigError, ValueError)
    assert issubclass(graceful.LifecycleError, graceful.GracefulError)
    assert issubclass(graceful.LifecycleError, RuntimeError)
    lifecycle = graceful.Lifecycle(graceful.Config())
    with pytest.raises(graceful.GracefulError, match="starting"):
        lifecycle.drain()
    with pytest.raises(graceful.GracefulError, match="GRACEFUL_DELAY"):
        graceful.Config.from_env({"GRACEFUL_DELAY": "soon"})


def test_private_modules_are_not_exported() -> None:
    for name in graceful.__all__:
        assert not (name.startswith("_") and name != "__version__"), name


def project_version() -> str:
    """The version the package is built with: pyproject.toml reads it from graceful._version."""
    text = PYPROJECT.read_text(encoding="utf-8")
    assert re.search(r'^dynamic = \["version"\]$', text, re.MULTILINE), "version is not dynamic"
    assert 'version = { attr = "graceful._version.__version__" }' in text
    found = re.search(r'^__version__ = "([^"]+)"$', VERSION_FILE.read_text(), re.MULTILINE)
    assert found is not None
    return found.group(1)


def test_version_matches_pyproject() -> None:
    from importlib.metadata import version

    assert graceful.__version__ == project_version() == version("graceful-drain")

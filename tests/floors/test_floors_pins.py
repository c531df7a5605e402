"""The floors run tests the floors pyproject.toml declares, and CI runs it.

Every ``>=`` lower bound in ``pyproject.toml`` (dependencies and extras) must be pinned in
``tests/floors/constraints.txt`` at exactly that version, so that raising or lowering a floor
without testing it fails here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
FLOORS = Path(__file__).resolve().parent
#: They lint the code and are not run by the floors run (the main run lints with the newest).
LINT_TOOLS = frozenset({"import-linter", "mypy", "ruff"})


def declared_requirements() -> list[Requirement]:
    if sys.version_info >= (3, 11):
        import tomllib

        text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
        project: dict[str, Any] = tomllib.loads(text)["project"]
        texts = list(project["dependencies"])
        for extra in project["optional-dependencies"].values():
            texts += extra
        return [Requirement(text) for text in texts]
    pytest.skip("reads pyproject.toml with tomllib (Python 3.11+)")


def floors() -> dict[str, Version]:
    """Each declared ``>=`` bound (the name canonicalised), lint tools aside."""
    found: dict[str, Version] = {}
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        for spec in requirement.specifier:
            if spec.operator == ">=" and name not in LINT_TOOLS:
                found[name] = max(found.get(name, Version(spec.version)), Version(spec.version))
    return found


def pins() -> dict[str, Version]:
    pinned: dict[str, Version] = {}
    for line in (FLOORS / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = Version(version)
    return pinned


def test_every_declared_floor_is_pinned_at_that_version_for_the_floors_run() -> None:
    declared, pinned = floors(), pins()
    assert "uvicorn" in declared and "gunicorn" in declared, declared
    wrong = {
        name: (str(floor), str(pinned.get(name)))
        for name, floor in declared.items()
        if pinned.get(name) != floor
    }
    assert not wrong, f"floor in pyproject.toml != pin in constraints.txt: {wrong}"


def test_security_floors_hold() -> None:
    declared = floors()
    assert declared["gunicorn"] >= Version("22.0")  # CVE-2024-1135, request smuggling
    assert declared["requests"] >= Version("2.32.4")  # CVE-2024-35195, CVE-2024-47081


def test_ci_runs_the_floors_run_and_it_runs_real_servers() -> None:
    assert re.search(r"^\s*bash tests/floors/run\b", (ROOT / ".ci" / "run").read_text(), re.M)
    script = (FLOORS / "run").read_text()
    assert "-c tests/floors/constraints.txt" in script
    for path in ("tests/e2e/test_uvicorn_drain.py", "tests/e2e/test_gunicorn_drain.py"):
        assert path in script and (ROOT / path).is_file(), path

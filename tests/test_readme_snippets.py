"""Every Python snippet of the README runs as shown, each in a fresh interpreter.

A snippet gets nothing from graceful it does not import itself, with one exception the README
states by its layout: the snippets under "Quick start" build on that section's first snippet,
``import graceful`` (asserted below), so they may use what ``import graceful`` gives, and
nothing more: ``graceful.django`` or ``graceful.starlette`` need their own import, as in a
user's file. Besides that, a snippet may assume only the user's own objects (``app``, a
``server``, an ``export()``...) and their framework's usual imports, which :data:`CONTEXT`
provides per heading. A snippet that cannot run here (it starts a server on a fixed port, or
calls hosts that do not exist) is listed in :data:`NOT_RUN` with the reason: its imports run
and every name it reaches through them must exist.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import child_env

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "integrations" / "nginx" / "README.md"]
ASSUMED = "import graceful"
ASSUMED_UNDER = "Quick start"

_APP_WSGI = """\
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""

#: The user's own objects (and their framework's imports) each snippet may assume, by heading.
CONTEXT = {
    "Any WSGI app (Flask, Django, plain)": _APP_WSGI,
    "Any ASGI app (FastAPI, Starlette, Django ASGI)": (
        "from fastapi import FastAPI\napp = FastAPI()\n"
    ),
    "Flask": 'from flask import Flask\napp = Flask("shop")\n',
    "Django": """\
import os, pathlib, sys
pathlib.Path("readme_settings.py").write_text(
    "SECRET_KEY = 'readme-' * 8\\nINSTALLED_APPS = ['graceful.django']\\n"
    "ROOT_URLCONF = 'readme_settings'\\nurlpatterns = []\\n"
)
sys.path.insert(0, os.getcwd())
os.environ["DJANGO_SETTINGS_MODULE"] = "readme_settings"
""",
    "FastAPI / Starlette": """\
from contextlib import asynccontextmanager
from typing import Annotated
from fastapi import Depends, FastAPI

@asynccontextmanager
async def shop_lifespan(app):
    yield
""",
    "Your own server loop": """\
class _Server:
    def serve_forever(self):
        pass
    def shutdown(self):
        pass
server = _Server()
""",
    "Background work": "def export():\n    pass\n",
}

#: Snippets that are not run, and why; their imports run and the names they use must exist.
NOT_RUN = {
    "uvicorn": "starts uvicorn on 0.0.0.0:8000 with 4 workers (tests/test_uvicorn.py runs it)",
    "Calling a service: the drain-aware client pool": "calls hosts 10.0.0.x that do not exist",
    "Calling services: httpx": "calls hosts 10.0.0.x that do not exist "
    "(tests/e2e/test_readme_clients.py runs it against local nodes)",
    "gRPC": "serves on [::]:50051 until SIGTERM (tests/e2e/test_readme_clients.py runs both "
    "snippets on 127.0.0.1 and drains the server)",
    "The managed upstream file": "edits /etc/nginx (tests/e2e/test_nginx_controller.py does "
    "the same on a real nginx)",
}


@dataclass(frozen=True)
class Snippet:
    doc: Path
    line: int
    section: str  # the enclosing "## " heading
    heading: str  # the nearest heading
    code: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line} ({self.heading})"


def snippets(doc: Path) -> list[Snippet]:
    found: list[Snippet] = []
    section = heading = ""
    lines = doc.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        match = re.match(r"(#{1,6}) (.*)", line)
        if match:
            heading = match.group(2).strip()
            section = heading if len(match.group(1)) <= 2 else section
        elif line.strip().startswith("```"):
            language = line.strip()[3:].strip()
            end = index + 1
            while not lines[end].strip().startswith("```"):
                end += 1
            if language == "python":
                code = textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n"
                found.append(Snippet(doc, index + 2, section, heading, code))
            index = end
        index += 1
    return found


ALL = [snippet for doc in DOCS for snippet in snippets(doc)]


def imports_graceful(code: str) -> bool:
    return any(
        isinstance(node, ast.Import) and any(a.name == "graceful" for a in node.names)
        for node in ast.parse(code).body
    )


def program(snippet: Snippet) -> str:
    """The script a fresh interpreter runs: what the snippet may assume, then the snippet
    (compiled under its README location, so a traceback points there)."""
    assumed = ""
    if snippet.section == ASSUMED_UNDER and not imports_graceful(snippet.code):
        assumed = ASSUMED + "\n"
    context = CONTEXT.get(snippet.heading, "")
    if snippet.heading in NOT_RUN:
        return assumed + context + names_check(snippet.code)
    return (
        assumed
        + context
        + f"exec(compile({snippet.code!r}, {snippet.where!r}, 'exec'), globals())\n"
    )


def names_check(code: str) -> str:
    """A script that runs the snippet's imports, then looks up every ``a.b.c`` it reaches from
    an imported name (``graceful.uvicorn.run`` must exist)."""
    tree = ast.parse(code)
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    bound = {(alias.asname or alias.name).split(".")[0] for node in imports for alias in node.names}
    chains = sorted(
        {
            ast.unparse(node)
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and _root(node) in bound
            and isinstance(node.ctx, ast.Load)
        }
    )
    lines = [ast.unparse(node) for node in imports] + chains
    return "\n".join(lines) + "\n"


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_the_quick_start_begins_with_the_import_the_later_snippets_build_on() -> None:
    quick = [s for s in ALL if s.doc == DOCS[0] and s.section == ASSUMED_UNDER]
    assert quick, f"README has no Python snippet under ## {ASSUMED_UNDER}"
    assert quick[0].code.splitlines()[0] == ASSUMED


def run_fresh(snippet: Snippet, folder: Path) -> subprocess.CompletedProcess[str]:
    """``snippet`` (with its context) run by a fresh interpreter in ``folder``."""
    return subprocess.run(
        [sys.executable, "-c", program(snippet)],
        cwd=folder,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_context_and_exception_names_a_heading_that_has_a_snippet() -> None:
    headings = {snippet.heading for snippet in ALL}
    assert set(CONTEXT) <= headings, set(CONTEXT) - headings
    assert set(NOT_RUN) <= headings, set(NOT_RUN) - headings


@pytest.mark.parametrize("snippet", ALL, ids=[snippet.where for snippet in ALL])
def test_the_snippet_runs_as_shown_in_a_fresh_interpreter(snippet: Snippet, tmp_path: Path) -> None:
    compile(snippet.code, snippet.where, "exec")  # every snippet at least parses
    result = run_fresh(snippet, tmp_path)
    assert result.returncode == 0, (
        f"{snippet.where} fails as shown:\n{snippet.code}\n{result.stderr}"
    )


def test_a_snippet_using_a_submodule_it_did_not_import_fails_here(tmp_path: Path) -> None:
    """The check is honest: the README's old Django snippet (no ``import graceful.django``)
    fails it."""
    old = Snippet(
        DOCS[0],
        1,
        ASSUMED_UNDER,
        "Django",
        'INSTALLED_APPS = ["graceful.django"]\n'
        "application = graceful.django.get_wsgi_application()\n",
    )
    result = run_fresh(old, tmp_path)
    assert result.returncode != 0
    assert "has no attribute 'django'" in result.stderr

"""``graceful demo --report FILE`` for real, its page rendered by a real browser.

The demo (its own app, two nodes through the client pool, 2 s of load per round) runs as a
subprocess in a session of its own, its environment marked (the nodes inherit the mark: none
may be left), with ``--json`` and ``--report``. Headless Chromium then renders the page: a
screenshot (a valid PNG of the window's size, not blank) and the DOM it built, whose table,
plots and commands must carry what the JSON says: each round's figures, a restart marker per
node signalled, the failed requests as red dots, the demo's command and each node's.

Chromium (Debian's ``chromium``) must be installed under CI (``CI`` set: ``.ci/run`` installs
it), where its absence fails the test; elsewhere the test skips without it.
"""

from __future__ import annotations

import json
import shlex
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import child_env
from demo_runs import bounded, demo_argv
from rollout_harness import required_binary

if TYPE_CHECKING:
    from conftest import WaitUntil
    from demo_runs import Marked

pytestmark = pytest.mark.e2e

#: Bound on the demo: three rounds of 2 s of load, two nodes restarted in each, start-ups too.
RUN_TIMEOUT = 120.0
#: Bound on one Chromium run (its start-up included).
CHROMIUM_TIMEOUT = 60.0
WINDOW = (1200, 1600)
ROUNDS = ("naive", "tuned", "graceful")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chromium(binary: str, tmp_path: Path, name: str, *options: str) -> str:
    """Headless Chromium with ``options``, a fresh profile and home; its stdout."""
    profile, home = tmp_path / f"profile-{name}", tmp_path / f"home-{name}"
    profile.mkdir()
    home.mkdir()
    argv = [
        *(binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic"),
        *("--no-first-run", "--disable-background-networking", "--disable-component-update"),
        *("--disable-sync", f"--user-data-dir={profile}", *options),
    ]
    done = bounded(argv, CHROMIUM_TIMEOUT, child_env({"HOME": str(home)}), tmp_path)
    assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


def png_rows(data: bytes) -> tuple[int, int, bytes]:
    """A PNG's width, height and decompressed image data (each row: its filter byte, then
    its pixels), checked to be whole: the signature, IHDR first, IEND last, every CRC."""
    assert data[:8] == PNG_SIGNATURE, data[:8]
    chunks: list[tuple[bytes, bytes]] = []
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        at += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND", [kind for kind, _ in chunks]
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, interlace) == (8, 0) and colour in (2, 6), (depth, colour, interlace)
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + width * (3 if colour == 2 else 4))
    return width, height, pixels


class RenderedPage(HTMLParser):
    """What the test reads off the DOM Chromium built: the results table, each round section
    (its restart markers' times, its dots), the ``<pre>`` blocks and the scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.table: list[list[str]] = []
        self.sections: list[dict[str, Any]] = []
        self.pres: list[str] = []
        self.scripts = 0
        self.heading = ""
        self._text: list[str] | None = None
        self._into = ""
        self._group: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag == "tr" and not self.sections:
            self.table.append([])
        elif tag in ("td", "th") and self.table and not self.sections:
            self._text, self._into = [], "cell"
        elif tag == "section":
            self.sections.append({"restarts": [], "served": 0, "failed": 0})
        elif tag == "g":
            self._group = names.get("class")
        elif tag == "circle" and self._group in ("served", "failed") and self.sections:
            self.sections[-1][self._group] += 1
        elif tag == "line" and names.get("class") == "restart" and self.sections:
            self.sections[-1]["restarts"].append(float(names.get("data-at") or "nan"))
        elif tag == "pre":
            self._text, self._into = [], "pre"
        elif tag == "p" and names.get("class") == "heading":
            self._text, self._into = [], "heading"

    def handle_endtag(self, tag: str) -> None:
        if self._text is None:
            if tag == "g":
                self._group = None
            return
        text = "".join(self._text)
        if tag in ("td", "th") and self._into == "cell":
            self.table[-1].append(text.strip())
        elif tag == "pre" and self._into == "pre":
            self.pres.append(text)
        elif tag == "p" and self._into == "heading":
            self.heading = text
        else:
            return
        self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def test_the_report_renders_in_a_browser_with_the_json_s_figures_restarts_and_commands(
    tmp_path: Path, marked: Marked, wait_until: WaitUntil
) -> None:
    browser = required_binary("chromium")
    out = tmp_path / "out"
    out.mkdir()
    report = out / "demo report.html"  # a space: the page's commands quote it
    options = ["--via", "pool", "--nodes", "2", "--duration", "2", "--json"]
    argv = demo_argv(*options, "--report", str(report))
    done = bounded(argv, RUN_TIMEOUT, marked.env(), tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.endswith(f"report written to {report}\n"), done.stderr
    marked.none_left(wait_until)
    document: dict[str, Any] = json.loads(done.stdout)  # --json unchanged beside --report
    assert [key for key in document if key in ROUNDS] == list(ROUNDS)
    assert [path.name for path in out.iterdir()] == [report.name]  # no temporary file left

    # The screenshot: a whole PNG of the window's size, and not blank.
    shot = tmp_path / "page.png"
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    chromium(browser, tmp_path, "shot", f"--screenshot={shot}", size, report.as_uri())
    width, height, pixels = png_rows(shot.read_bytes())
    assert (width, height) == WINDOW
    assert len(set(pixels)) >= 64, "the screenshot is blank (or nearly)"
    assert pixels.count(0xFF) < 0.99 * len(pixels), "the screenshot is all white"

    # The DOM Chromium built from the page.
    page = RenderedPage(chromium(browser, tmp_path, "dom", "--dump-dom", report.as_uri()))
    assert page.scripts == 0
    assert page.heading.startswith(f"2 {document['server']} nodes, each restarted under load")
    assert page.table[0] == ["", "naive", "tuned client, no library", "graceful"], page.table
    rows = {row[0]: row[1:] for row in page.table[1:] if row[0]}
    rounds = [document[name] for name in ROUNDS]
    assert rows["requests sent"] == [str(one["sent"]) for one in rounds], rows
    assert rows["failed"] == [str(one["failed"]) for one in rounds], rows
    assert rows["p50 latency"] == [f"{one['p50_ms']:.1f} ms" for one in rounds], rows
    assert rows["p99 latency"] == [f"{one['p99_ms']:.1f} ms" for one in rounds], rows
    assert rows["wall time"] == [f"{one['wall_s']:.1f} s" for one in rounds], rows
    assert rows["nodes restarted"] == ["2", "2", "2"], rows

    # A plot per round: a marker per node signalled, in order, within the round; a dot per
    # request (those close together share one), red ones only where requests failed.
    assert len(page.sections) == 3
    for one, section in zip(rounds, page.sections, strict=True):
        at = section["restarts"]
        assert len(at) == one["restarts"] == 2, section
        assert 0 < at[0] < at[1] <= one["wall_s"], section
        assert section["served"] > 0, section
        assert (section["failed"] > 0) == (one["failed"] > 0), (one, section)
        assert section["failed"] <= one["failed"], (one, section)
    assert document["naive"]["failed"] > 0, "the naive round failed nothing: the test cannot tell"
    assert page.sections[2]["failed"] == 0

    # The commands: the demo's own as it was run, then each round's two nodes'.
    demo_command, *per_round = page.pres
    assert shlex.split(demo_command) == argv
    assert len(per_round) == 3
    for name, text in zip(ROUNDS, per_round, strict=True):
        lines = text.splitlines()
        assert lines[0::2] == ["# node 1", "# node 2"], text
        for line in lines[1::2]:
            words = shlex.split(line)
            assert document["server"] in " ".join(words) and "--port" in words, line
            settings = [word for word in words if word.startswith("GRACEFUL_")]
            expected = (
                ["GRACEFUL_DELAY=1", "GRACEFUL_DRAIN_TIMEOUT=10"] if name == "graceful" else []
            )
            assert settings[:2] == expected, (name, line)

"""``graceful demo --report FILE``: the HTML page from fixed inputs (its figures, the restart
markers, the commands, every value escaped, nothing loaded from elsewhere), the load's samples
it plots, and ``--report`` checked before anything starts.

No server runs here: the page is a pure function of the rounds (:mod:`graceful._tools.
demo_html`); ``tests/e2e/test_demo_report_browser.py`` renders a real run's page in Chromium.
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shlex
import sys
import tempfile
import threading
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from graceful._tools import cli, demo, demo_html, demo_load, demo_report, demo_user_app
from graceful._tools.demo_html import Restart, RoundTrace, Sample

if TYPE_CHECKING:
    from conftest import WaitUntil

HOSTILE = "<script>alert('x')</script>"


class Page(HTMLParser):
    """What the tests read off a page: the results table's rows, and per round section its
    restart lines' ``data-at`` and how many dots each group of the plot has."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.table: list[list[str]] = []
        self.sections: list[dict[str, Any]] = []
        self.pres: list[str] = []
        self._cell: list[str] | None = None
        self._group: str | None = None
        self._pre: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "tr":
            self.table.append([])
        elif tag in ("td", "th") and self.table:
            self._cell = []
        elif tag == "section":
            self.sections.append({"restarts": [], "served": 0, "failed": 0})
        elif tag == "g":
            self._group = names.get("class")
        elif tag == "circle" and self._group in ("served", "failed"):
            self.sections[-1][self._group] += 1
        elif tag == "line" and names.get("class") == "restart":
            self.sections[-1]["restarts"].append(float(names["data-at"] or "nan"))
        elif tag == "pre":
            self._pre = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "g":
            self._group = None
        elif tag == "pre" and self._pre is not None:
            self.pres.append("".join(self._pre))
            self._pre = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._pre is not None:
            self._pre.append(data)


def rounds() -> dict[str, tuple[demo_load.RoundResult, RoundTrace]]:
    """Three rounds of two nodes: the naive one failed 3 requests around its restarts."""
    naive = demo_load.RoundResult(40, 3, {"connection refused": 3}, 3.2, 41.0, 6.0, 2, 1)
    tuned = demo_load.RoundResult(41, 1, {"connection closed": 1}, 3.3, 30.0, 6.0, 2, 0)
    graceful = demo_load.RoundResult(42, 0, {}, 3.4, 12.5, 6.1, 2, 0)

    def samples(failed_at: set[int]) -> list[Sample]:
        return [Sample(n * 0.15, 2.0 + n % 7, n in failed_at) for n in range(40)]

    def trace(failed: set[int], env: str) -> RoundTrace:
        commands = [
            demo.shell_command(["python", "-m", "uvicorn", f"m:{HOSTILE}", "--port", str(port)], {})
            for port in (8001, 8002)
        ]
        if env:
            commands = [f"{env} {command}" for command in commands]
        return RoundTrace(
            samples(failed),
            [Restart("node 1", 1.3, 2.5), Restart("node 2", 3.0, 4.25)],
            commands,
            demo_load.through(settings(), "naive"),
        )

    return {
        "naive": (naive, trace({9, 10, 21}, "")),
        "tuned": (tuned, trace({22}, "")),
        "graceful": (graceful, trace(set(), "GRACEFUL_DELAY=1")),
    }


def settings() -> demo.Settings:
    app = demo_user_app.UserApp(f"shop.app:{HOSTILE}", "asgi", f"/{HOSTILE}", "/orders")
    return demo.Settings("uvicorn", 2, 6.0, "pool", None, app)


def make_page() -> str:
    made = rounds()
    results = {name: result for name, (result, _) in made.items()}
    traces = {name: trace for name, (_, trace) in made.items()}
    command = shlex.join(["graceful", "demo", "--app", HOSTILE, "--report", "out.html"])
    return demo_report.page(settings(), results, traces, command, f"made {HOSTILE}")


def test_the_page_shows_the_text_table_s_figures_for_every_round() -> None:
    made = rounds()
    page = Page(make_page())
    titled = demo_report.titled(settings(), {name: result for name, (result, _) in made.items()})
    assert page.table == demo_report.rows(titled)
    assert page.table[0] == ["", "naive", "tuned client, no library", "graceful"]
    by_name = {row[0]: row[1:] for row in page.table[1:] if row[0]}
    assert by_name["requests sent"] == ["40", "41", "42"]
    assert by_name["failed"] == ["3", "1", "0"]
    assert by_name["failure kinds"] == ["connection refused: 3", "connection closed: 1", "none"]
    assert by_name["POSTs run twice"] == ["1", "0", "0"]
    assert by_name["p99 latency"] == ["41.0 ms", "30.0 ms", "12.5 ms"]
    assert by_name["nodes restarted"] == ["2", "2", "2"]


def test_each_round_has_a_plot_with_its_restarts_marked_and_its_failed_requests_red() -> None:
    text = make_page()
    page = Page(text)
    assert len(page.sections) == 3
    for section in page.sections:
        assert section["restarts"] == [1.3, 3.0]  # when each node was signalled
        assert section["served"] > 0
    # The failed requests (apart on the plot: one dot each).
    assert [section["failed"] for section in page.sections] == [3, 1, 0]
    assert "node 2: signalled at 3.00 s, ready again at 4.25 s" in text
    assert text.count('<rect class="restart-window"') == 6
    assert text.count("40 requests sent, 3 failed; restarts signalled at 1.3 s, 3.0 s.") == 1


def test_the_page_carries_the_demo_s_command_and_each_node_s_per_round() -> None:
    page = Page(make_page())
    demo_command, *per_round = page.pres
    assert shlex.split(demo_command) == [
        "graceful",
        "demo",
        "--app",
        HOSTILE,
        "--report",
        "out.html",
    ]
    assert len(per_round) == 3
    for text in per_round:
        lines = text.splitlines()
        assert lines[0::2] == ["# node 1", "# node 2"]
        assert shlex.split(lines[1])[-3:] == [f"m:{HOSTILE}", "--port", "8001"]
    assert per_round[2].splitlines()[1].startswith("GRACEFUL_DELAY=1 python -m uvicorn ")


def test_every_value_from_the_user_is_escaped_and_the_page_is_self_contained() -> None:
    text = make_page()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text  # the app spec, the path, the commands: shown, escaped
    assert html.escape(f"2 uvicorn nodes of shop.app:{HOSTILE}") in text  # the heading
    assert html.escape(f"GETs of /{HOSTILE} and POSTs to /orders") in text
    # Nothing loaded from elsewhere: no address, no stylesheet, image or frame.
    assert not re.search(r"(src|href)\s*=", text, re.IGNORECASE)
    assert "http://" not in text and "https://" not in text
    for tag in ("<link", "<img", "<iframe", "<object", "<embed", "@import", "url("):
        assert tag not in text.lower(), tag


def test_a_round_without_samples_or_restarts_still_plots() -> None:
    svg = demo_html.plot(RoundTrace([], [], [], ""), 0.0, "empty")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "no request was sent" in svg


def test_the_plot_stays_small_however_many_requests() -> None:
    """A long load: 100,000 requests at a handful of latencies share dots."""
    many = [Sample(n / 2000, 3.0 + n % 5, n % 997 == 0) for n in range(100_000)]
    svg = demo_html.plot(RoundTrace(many, [Restart("node 1", 50.0, 51.0)], [], ""), 100.0)
    assert svg.count("<circle") < 5_000
    assert len(svg) < 400_000


def test_the_one_node_page_names_its_restarts_and_its_columns() -> None:
    one = demo.Settings("uvicorn", 1, 3.0, "direct", None)
    result = demo_load.RoundResult(10, 2, {"connection refused": 2}, 1.0, 9.0, 3.0, 2)
    trace = RoundTrace(
        [Sample(0.1, 1.0, False), Sample(1.0, 1.0, True)],
        [Restart("restart 1", 0.5, 0.9), Restart("restart 2", 1.4, 2.0)],
        ["python -m graceful.uvicorn demo:app"],
        demo_load.through(one, "graceful"),
    )
    text = demo_report.page(
        one, {"naive": result, "graceful": result}, {"naive": trace, "graceful": trace}, "c", ""
    )
    page = Page(text)
    assert page.table[0] == ["", "naive restart", "graceful reload"]
    assert page.table[-1][0] == "restarts"
    assert "restart 2: signalled at 1.40 s" in text


def test_the_load_keeps_each_request_s_time_latency_and_outcome(wait_until: WaitUntil) -> None:
    calls = iter(range(1_000_000))

    class Answer:
        def __init__(self, status: int) -> None:
            self.status_code = status

        def close(self) -> None:
            pass

    def call(method: str, path: str, kwargs: dict[str, Any]) -> Answer:
        number = next(calls)
        if number % 3 == 0:
            raise ConnectionRefusedError
        return Answer(201 if method == "POST" else 200)

    load = demo_load.Load(call, "t").start()
    try:
        wait_until(lambda: load.counts()[0] >= 30, timeout=20)
    finally:
        load.stop()
    samples = load.samples()
    sent, failed = load.counts()
    assert len(samples) == sent and sum(sample.failed for sample in samples) == failed > 0
    assert all(0 <= sample.at <= load.seconds and sample.ms >= 0 for sample in samples)


def test_a_node_s_command_is_quoted_with_its_settings_in_front() -> None:
    line = demo.shell_command(["python", "-m", "x", "a b"], {"PYTHONPATH": "/t/a b", "K": "1"})
    assert line == "PYTHONPATH='/t/a b' K=1 python -m x 'a b'"
    assert shlex.split(line) == ["PYTHONPATH=/t/a b", "K=1", "python", "-m", "x", "a b"]


def test_the_demo_s_command_line_is_the_one_it_was_given() -> None:
    args = argparse.Namespace(command_line=["graceful", "demo", "--report", "a b.html"])
    assert demo.command_line(args) == "graceful demo --report 'a b.html'"
    assert demo.command_line(argparse.Namespace()) == shlex.join(sys.orig_argv)


# -- --report, checked before anything starts ----------------------------------------------------


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any process started, or folder made, by the demo is recorded (and refused)."""
    started: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        started.append(args)
        raise AssertionError("the demo started something")

    monkeypatch.setattr(demo.Processes, "start", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    return started


@pytest.mark.parametrize("entry", ["demo.main", "cli.main"])
def test_a_report_in_a_missing_folder_exits_2_naming_report_before_anything_starts(
    entry: str, tmp_path: Path, nothing_starts: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "out.html"
    options = ["--via", "pool", "--report", str(target)]
    code = demo.main(options) if entry == "demo.main" else cli.main(["demo", *options])
    assert code == 2
    err = capsys.readouterr().err
    assert err == (
        f"graceful demo: --report {target}: there is no folder {target.parent}; create it first\n"
    )
    assert nothing_starts == []
    assert not target.parent.exists()


def test_a_report_that_is_a_folder_exits_2_naming_report(
    tmp_path: Path, nothing_starts: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(["--report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"graceful demo: --report {tmp_path}: a folder, not a file; give a file name\n"
    assert demo.main(["--report", ""]) == 2
    assert capsys.readouterr().err == "graceful demo: --report '': give a file name\n"
    assert nothing_starts == []


def test_a_report_in_a_folder_that_takes_no_file_exits_2_naming_report(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    nothing_starts: list[object],
    capsys: pytest.CaptureFixture[str],
) -> None:
    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert demo.main(["--report", str(tmp_path / "out.html")]) == 2
    err = capsys.readouterr().err
    target = tmp_path / "out.html"
    assert (
        err == f"graceful demo: --report {target}: cannot write in {tmp_path}: Permission denied\n"
    )
    assert nothing_starts == []


def test_a_good_report_path_is_checked_without_leaving_anything(tmp_path: Path) -> None:
    assert demo.report_target(str(tmp_path / "out.html")) == tmp_path / "out.html"
    assert list(tmp_path.iterdir()) == []
    assert demo.report_target(None) is None


def test_the_report_is_written_whole_in_one_rename(tmp_path: Path) -> None:
    target = tmp_path / "out.html"
    target.write_text("old")
    demo.write_report(target, "<p>new</p>")
    assert target.read_text() == "<p>new</p>"
    assert [path.name for path in tmp_path.iterdir()] == ["out.html"]  # no temporary file left
    assert target.stat().st_mode & 0o777 == 0o644

    renamed = threading.Event()

    def fail(src: str, dst: str) -> None:
        renamed.set()
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", fail)
        with pytest.raises(OSError, match="No space"):
            demo.write_report(target, "<p>newer</p>")
    assert renamed.is_set()
    assert target.read_text() == "<p>new</p>"  # the old page whole, no temporary file left
    assert [path.name for path in tmp_path.iterdir()] == ["out.html"]

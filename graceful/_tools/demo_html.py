"""The page ``graceful demo --report FILE`` writes: one self-contained HTML file a team can
attach to a change request.

:func:`page` takes the rounds (each one's figures, what its load saw request by request, when
each node was signalled, the commands it ran) and returns the page: the results table (the
text table's cells, :func:`graceful._tools.demo_report.rows`), a latency-over-time plot per
round in inline SVG (a dot per request, red where it failed; a dashed line where a node was
signalled, shaded until it was ready again), and the commands. No script, and nothing loaded
from elsewhere. Every value is escaped: app specs, paths and commands come from the user.

The standard library only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import TYPE_CHECKING, NamedTuple

from .demo_report import rows

if TYPE_CHECKING:
    from .demo_load import RoundResult

__all__ = ["Restart", "RoundPage", "RoundTrace", "Sample", "page", "plot"]


class Sample(NamedTuple):
    """One request: when it was sent (seconds since the round's load started), how long it
    took, and whether it failed."""

    at: float
    ms: float
    failed: bool


class Restart(NamedTuple):
    """One restart: its name (``node 2``, ``restart 1``), when the node was signalled and when
    it was ready again (None: not known), in seconds since the round's load started."""

    name: str
    at: float
    back: float | None = None


@dataclasses.dataclass(frozen=True)
class RoundTrace:
    """What a round's plot and its commands need."""

    samples: Sequence[Sample]
    restarts: Sequence[Restart]
    #: Each node's command line, shell-quoted (its settings in front: ``NAME=value ...``).
    commands: Sequence[str]
    #: How the load reached the nodes (``--via nginx``: which nginx configuration).
    front: str


@dataclasses.dataclass(frozen=True)
class RoundPage:
    """One round on the page: its column title, its figures, its trace."""

    title: str
    result: RoundResult
    trace: RoundTrace


# The plot's size and margins, in SVG user units (pixels at 100 %).
WIDTH, HEIGHT = 960, 260
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 28, 40
#: Requests closer than this (in units) share a dot: the page stays small however long the load.
GRID = 2.0

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d1d1f; margin: 2em auto;
       max-width: 1000px; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.verdict { font-weight: 600; padding: .4em .7em; border-radius: 4px; }
.verdict.ok { background: #e3f4e5; color: #17622a; }
.verdict.bad { background: #fbe3e3; color: #8a1c1c; }
table { border-collapse: collapse; }
th, td { padding: .25em .8em; border-bottom: 1px solid #e5e5e5; }
thead th { text-align: right; border-bottom: 2px solid #999; }
tbody th { text-align: left; font-weight: normal; color: #555; }
td { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f5f5f7; padding: .6em .8em; overflow-x: auto; white-space: pre-wrap;
      word-break: break-all; }
svg { display: block; max-width: 100%; height: auto; background: #fff; }
.axis { stroke: #999; } .grid { stroke: #eee; }
.tick { font-size: 11px; fill: #555; } .axis-title { font-size: 12px; fill: #333; }
.served { fill: #3b6fb6; fill-opacity: .55; } .failed { fill: #d62728; }
.restart { stroke: #333; stroke-width: 1.5; stroke-dasharray: 5 3; }
.restart-window { fill: #f2c14e; fill-opacity: .25; }
.restart-label { font-size: 11px; fill: #333; }
.legend span { margin-right: 1.5em; }
.key { display: inline-block; width: .8em; height: .8em; margin-right: .35em;
       vertical-align: -.05em; }
footer { margin-top: 2em; color: #777; font-size: .9em; }
"""


_TEMPORARY = (
    '<p class="note">The paths in the demo\'s temporary folder (<code>graceful-demo-*</code>) '
    "were removed when it ended.</p>"
)


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def page(
    heading: str,
    verdict: str,
    rounds: Sequence[RoundPage],
    command: str,
    ok: bool,
    *,
    restarts: str = "nodes restarted",
    made: str = "",
) -> str:
    """The whole page: ``heading`` (what ran) and ``verdict`` (the text's last line), the
    table of ``rounds``' figures (``restarts``: its last row's name), a plot per round, the
    demo's ``command`` and each round's node commands; ``made`` at the foot."""
    commands = [line for one in rounds for line in one.trace.commands]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>graceful demo: {_e(verdict)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        "<h1>graceful demo</h1>",
        f'<p class="heading">{_e(heading)}</p>',
        f'<p class="verdict {"ok" if ok else "bad"}">{_e(verdict)}</p>',
        "<h2>Results</h2>",
        _table(rows([(one.title, one.result) for one in rounds], restarts)),
        "<h2>Latency over time</h2>",
        '<p class="legend"><span><i class="key" style="background:#3b6fb6"></i>a request '
        'served (when it was sent, how long it took)</span><span><i class="key" '
        'style="background:#d62728"></i>a request failed</span><span><i class="key" '
        'style="border-left:2px dashed #333"></i>a node signalled to stop (shaded: until it '
        "was ready again)</span></p>",
        *(_round(number, one) for number, one in enumerate(rounds, 1)),
        "<h2>Commands</h2>",
        "<h3>The demo</h3>",
        f'<pre class="command">{_e(command)}</pre>',
        *(_commands(one) for one in rounds),
        _TEMPORARY if any("graceful-demo-" in line for line in commands) else "",
        f"<footer>{_e(made)}</footer>" if made else "",
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"


def _table(cells: Sequence[Sequence[str]]) -> str:
    header, *body = cells
    lines = ['<table id="results"><thead><tr>']
    lines.append("".join(f'<th scope="col">{_e(title)}</th>' for title in header))
    lines.append("</tr></thead><tbody>")
    for name, *values in body:
        lines.append(
            f'<tr><th scope="row">{_e(name)}</th>'
            + "".join(f"<td>{_e(value)}</td>" for value in values)
            + "</tr>"
        )
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _round(number: int, one: RoundPage) -> str:
    result, trace = one.result, one.trace
    when = ", ".join(f"{restart.at:.1f} s" for restart in trace.restarts) or "none"
    return "\n".join(
        [
            f'<section class="round" id="round-{number}">',
            f"<h3>{_e(one.title)}</h3>",
            f"<p>{_e(result.sent)} requests sent, {_e(result.failed)} failed; restarts "
            f"signalled at {_e(when)}.</p>",
            plot(trace, result.wall_s, one.title),
            "</section>",
        ]
    )


def _commands(one: RoundPage) -> str:
    lines = "\n".join(
        f"# node {number}\n{command}" for number, command in enumerate(one.trace.commands, 1)
    )
    return (
        f"<h3>{_e(one.title)}</h3>\n<p>{_e(one.trace.front)}</p>\n"
        f'<pre class="command">{_e(lines)}</pre>'
    )


def _decades(samples: Iterable[Sample]) -> tuple[float, float]:
    """The latency axis: whole powers of ten around the samples' latencies (log scale)."""
    latencies = [sample.ms for sample in samples]
    if not latencies:
        return 1.0, 1000.0
    low = 10.0 ** math.floor(math.log10(max(0.1, min(latencies))))
    high = 10.0 ** math.ceil(math.log10(max(0.1, max(latencies))))
    return low, max(high, low * 10)


def _time_step(end: float) -> float:
    return next((step for step in (0.5, 1, 2, 5, 10, 15, 30, 60, 120) if end / step <= 10), 300)


def _ms(value: float) -> str:
    return f"{value / 1000:g} s" if value >= 1000 else f"{value:g} ms"


def plot(trace: RoundTrace, wall: float, title: str = "") -> str:
    """One round's latency over time, as inline SVG: x seconds since its load started, y the
    latency on a log scale; a dot per request (those within :data:`GRID` units of each other
    share one), red where it failed; a dashed line where each node was signalled, shaded
    until it was ready again."""
    width, height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    restarts = trace.restarts
    last = max((sample.at for sample in trace.samples), default=0.0)
    end = max([1.0, wall, last, *(restart.back or restart.at for restart in restarts)])
    low, high = _decades(trace.samples)
    span = math.log10(high) - math.log10(low)

    def x(seconds: float) -> float:
        return LEFT + width * min(max(seconds, 0.0), end) / end

    def y(ms: float) -> float:
        return TOP + height * (1 - (math.log10(min(max(ms, low), high)) - math.log10(low)) / span)

    out = [
        f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{_e(title)}: latency of each request over time">',
        f"<title>{_e(title)}: latency of each request over time</title>",
    ]
    decade = low
    while decade <= high * 1.0001:
        at = y(decade)
        out += [
            f'<line class="grid" x1="{LEFT}" x2="{LEFT + width}" y1="{at:.1f}" y2="{at:.1f}"/>',
            f'<text class="tick" x="{LEFT - 6}" y="{at + 4:.1f}" text-anchor="end">'
            f"{_e(_ms(decade))}</text>",
        ]
        decade *= 10
    step = _time_step(end)
    for index in range(int(end / step) + 1):
        at = x(index * step)
        out += [
            f'<line class="axis" x1="{at:.1f}" x2="{at:.1f}" y1="{TOP + height}" '
            f'y2="{TOP + height + 5}"/>',
            f'<text class="tick" x="{at:.1f}" y="{TOP + height + 18}" text-anchor="middle">'
            f"{index * step:g}</text>",
        ]
    out += [
        f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + height}"/>',
        f'<line class="axis" x1="{LEFT}" x2="{LEFT + width}" y1="{TOP + height}" '
        f'y2="{TOP + height}"/>',
        f'<text class="axis-title" x="{LEFT + width / 2}" y="{HEIGHT - 4}" '
        'text-anchor="middle">seconds since the load started</text>',
        f'<text class="axis-title" x="14" y="{TOP + height / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + height / 2})">latency (log scale)</text>',
    ]
    for restart in restarts:
        if restart.back is not None and restart.back > restart.at:
            out.append(
                f'<rect class="restart-window" x="{x(restart.at):.1f}" y="{TOP}" '
                f'width="{x(restart.back) - x(restart.at):.1f}" height="{height}"/>'
            )
    served: set[tuple[int, int]] = set()
    failed: set[tuple[int, int]] = set()
    for sample in trace.samples:
        cell = (round(x(sample.at) / GRID), round(y(sample.ms) / GRID))
        (failed if sample.failed else served).add(cell)
    for kind, cells, radius in (("served", served - failed, 1.6), ("failed", failed, 3.2)):
        out.append(f'<g class="{kind}">')
        out.extend(
            f'<circle cx="{cx * GRID:g}" cy="{cy * GRID:g}" r="{radius}"/>'
            for cx, cy in sorted(cells)
        )
        out.append("</g>")
    if not trace.samples:
        out.append(
            f'<text class="axis-title" x="{LEFT + width / 2}" y="{TOP + height / 2}" '
            'text-anchor="middle">no request was sent</text>'
        )
    for number, restart in enumerate(restarts):
        at = x(restart.at)
        back = "" if restart.back is None else f", ready again at {restart.back:.2f} s"
        label_y = TOP - 14 + 10 * (number % 2)  # close restarts' labels on two lines
        out += [
            f'<line class="restart" x1="{at:.1f}" x2="{at:.1f}" y1="{TOP}" '
            f'y2="{TOP + height}" data-at="{restart.at:.3f}">'
            f"<title>{_e(restart.name)}: signalled at {restart.at:.2f} s{_e(back)}</title>"
            "</line>",
            f'<text class="restart-label" x="{at + 3:.1f}" y="{label_y}">{_e(restart.name)}</text>',
        ]
    out.append("</svg>")
    return "\n".join(out)

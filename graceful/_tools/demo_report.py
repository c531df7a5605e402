"""What ``graceful demo`` prints at the end: the rounds side by side in a table, or as JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .demo import Settings
    from .demo_html import RoundTrace
    from .demo_load import RoundResult

__all__ = [
    "column_titles",
    "document",
    "ok",
    "page",
    "report",
    "round_dict",
    "rows",
    "summary",
    "table",
    "titled",
]

#: How the load reaches the nodes, as the first line says it.
THROUGH = {
    "nginx": "nginx",
    "pool": "the client pool",
    "httpx": "httpx's PoolTransport",
    "grpc": "one gRPC channel",
}


def column_titles(settings: Settings) -> dict[str, str]:
    """Each round's column title."""
    if settings.via == "direct":
        return {"naive": "naive restart", "graceful": "graceful reload"}
    tuned = "tuned proxy, no library" if settings.via == "nginx" else "tuned client, no library"
    return {"naive": "naive", "tuned": tuned, "graceful": "graceful"}


def rows(
    rounds: Sequence[tuple[str, RoundResult]], restarts: str = "nodes restarted"
) -> list[list[str]]:
    """The table's cells, the header first (an empty corner, then each round's title): a row
    per figure, its name first; ``restarts``: the last row's name. A "POSTs run twice" row
    when the rounds counted them (``--app``). The text table and the HTML page show these."""

    def kinds(result: RoundResult) -> list[str]:
        return [f"{kind}: {count}" for kind, count in result.failures.items()] or ["none"]

    results = [result for _, result in rounds]
    body: list[list[str]] = [
        ["requests sent", *(str(result.sent) for result in results)],
        ["failed", *(str(result.failed) for result in results)],
    ]
    columns = [kinds(result) for result in results]
    for number in range(max(len(column) for column in columns)):
        body.append(
            [
                "failure kinds" if number == 0 else "",
                *(column[number] if number < len(column) else "" for column in columns),
            ]
        )
    if any(result.ran_twice is not None for result in results):
        body.append(
            [
                "POSTs run twice",
                *("-" if r.ran_twice is None else str(r.ran_twice) for r in results),
            ]
        )
    body += [
        ["p50 latency", *(f"{result.p50_ms:.1f} ms" for result in results)],
        ["p99 latency", *(f"{result.p99_ms:.1f} ms" for result in results)],
        ["wall time", *(f"{result.wall_s:.1f} s" for result in results)],
        [restarts, *(str(result.restarts) for result in results)],
    ]
    return [["", *(title for title, _ in rounds)], *body]


def table(rounds: Sequence[tuple[str, RoundResult]], restarts: str = "nodes restarted") -> str:
    """The rounds side by side, each under its title (:func:`rows`)."""
    cells = rows(rounds, restarts)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = []
    for row in cells:
        line = [
            f"{row[0]:<{widths[0]}}",
            *(f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        lines.append(" | ".join(line).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def round_dict(result: RoundResult) -> dict[str, Any]:
    """A round for the JSON: ``ran_twice`` only where it was counted (``--app``)."""
    fields = dataclasses.asdict(result)
    if fields["ran_twice"] is None:
        del fields["ran_twice"]
    return fields


def ok(results: Mapping[str, RoundResult]) -> bool:
    """The graceful round failed no request and ran no POST twice."""
    graceful = results["graceful"]
    return graceful.failed == 0 and not graceful.ran_twice


def document(settings: Settings, results: Mapping[str, RoundResult]) -> dict[str, Any]:
    """The ``--json`` document: the settings, each round under its name, and ``ok``."""
    out: dict[str, Any] = {
        "server": settings.server,
        "nodes": settings.nodes,
        "via": settings.via,
        "duration": settings.duration,
    }
    if settings.app is not None:
        app = settings.app
        out["app"] = {
            "spec": app.spec,
            "kind": app.kind,
            "path": app.path,
            "post_path": app.post_path,
        }
    for name, result in results.items():
        out[name] = round_dict(result)
    out["ok"] = ok(results)
    return out


def summary(settings: Settings, results: Mapping[str, RoundResult]) -> tuple[str, str, str]:
    """The heading (what ran), the name of the table's last row (``restarts`` or ``nodes
    restarted``) and the verdict line: for the text and the HTML page alike."""
    from .demo import THREADS

    graceful, naive = results["graceful"], results["naive"]
    verdict = "no request failed" if graceful.failed == 0 else f"{graceful.failed} requests failed"
    if graceful.ran_twice:
        verdict += f", {graceful.ran_twice} POSTs ran twice"
    app = f" of {settings.app.spec}" if settings.app is not None else ""
    calls = "GETs and POSTs"
    if settings.app is not None:
        calls = f"GETs of {settings.app.path}"
        if settings.app.post_path is not None:
            calls += f" and POSTs to {settings.app.post_path}"
    if settings.via == "direct":
        head = (
            f"1 {settings.server} node{app}, no load balancer, restarted in place under load "
            f"({THREADS} callers calling it directly, {calls}):"
        )
        tail = f"graceful reload: {verdict}; naive restart: {naive.failed} failed"
        return head, "restarts", tail
    kind = "gRPC" if settings.via == "grpc" else settings.server
    if settings.via == "grpc":
        calls = "Get and Create calls"
    head = (
        f"{settings.nodes} {kind} nodes{app}, each restarted under load "
        f"({THREADS} callers through {THROUGH[settings.via]}, {calls}):"
    )
    tail = f"graceful restart: {verdict}; naive restart: {naive.failed} failed"
    if "tuned" in results:
        tail += f"; tuned, no library: {results['tuned'].failed} failed"
    return head, "nodes restarted", tail


def titled(settings: Settings, results: Mapping[str, RoundResult]) -> list[tuple[str, RoundResult]]:
    """Each round under its column title, in order."""
    titles = column_titles(settings)
    return [(titles[name], result) for name, result in results.items()]


def report(settings: Settings, results: Mapping[str, RoundResult], as_json: bool) -> str:
    """The text to print: the JSON document, or a heading, the table and a verdict."""
    if as_json:
        return json.dumps(document(settings, results), indent=2)
    head, restarts, tail = summary(settings, results)
    return f"{head}\n\n{table(titled(settings, results), restarts)}\n\n{tail}"


def page(
    settings: Settings,
    results: Mapping[str, RoundResult],
    traces: Mapping[str, RoundTrace],
    command: str,
    made: str,
) -> str:
    """``--report``'s HTML page (:func:`graceful._tools.demo_html.page`): the heading, the
    table, each round's latency over time and restarts, ``command`` (the demo's own, quoted)
    and each round's nodes' commands; ``made``: when and with what, for the page's foot."""
    from .demo_html import RoundPage
    from .demo_html import page as html_page

    head, restarts, tail = summary(settings, results)
    rounds = [
        RoundPage(title, result, traces[name])
        for (title, result), name in zip(titled(settings, results), results, strict=True)
    ]
    return html_page(head, tail, rounds, command, ok(results), restarts=restarts, made=made)

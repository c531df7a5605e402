"""Run every benchmark in this folder and print a Markdown table of their figures.

Each ``benchmarks/*.py`` (this file aside) runs as its own process, one after another; its last
printed line is its figure. The table gives, per benchmark, the command run, that figure, the
goal and whether the figure meets it (read from the figure's own ``met`` / ``not met``, or from
its numbers against the goal). ``--quick`` passes smaller parameters to each (a smoke run in a
few minutes; the figures are then rougher); ``--only`` picks some by name; ``--output`` also
writes the table (and each benchmark's whole output below it) to a file.

    python benchmarks/run_all.py [--quick] [--only throughput,scale] [--output results.md]

Exit status: 0 when every benchmark ran (exit 0) and printed a figure, else 1; a goal not met
does not change it (the table says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from graceful.testing import Process

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Known:
    goal: str
    quick: tuple[str, ...]
    met: Callable[[str], bool | None] | None = None  # when the figure does not say


def _all_ms_below(limit: float) -> Callable[[str], bool | None]:
    """Every ``<n> ms`` of the figure (before its goal) is below ``limit``."""

    def check(figure: str) -> bool | None:
        values = [float(v) for v in re.findall(r"(\d+(?:\.\d+)?) ms", figure.split("(goal")[0])]
        return all(v < limit for v in values) if values else None

    return check


KNOWN: dict[str, Known] = {
    "middleware_overhead": Known(
        "added cost <= 1.2x the floor's (an in-flight counter that only records)",
        ("--requests", "5000", "--rounds", "5"),
    ),
    "throughput": Known(
        "graceful / plain req/s and CPU per request >= 0.99x; idle CPU within 1 %",
        ("--rounds", "5", "--seconds", "0.3", "--idle-seconds", "10"),
    ),
    "shutdown_overhead": Known(
        "< 300 ms after the last answer", ("--rounds", "2"), _all_ms_below(300)
    ),
    "rollout_failures": Known(
        "0 failed requests for graceful", ("--warm-up", "15", "--calls-between", "200")
    ),
    "scale": Known(
        "all 5,000 complete; tracker <= 300 bytes per request",
        ("--counts", "10,1000", "--rounds", "1"),
    ),
    "client_pool_overhead": Known(
        "Pool / Session <= 1.05x", ("--requests", "300", "--rounds", "5")
    ),
    "httpx_overhead": Known(
        "PoolTransport / plain httpx client <= 1.05x (sync and async)",
        ("--requests", "300", "--rounds", "5"),
    ),
    "grpc_overhead": Known(
        "graceful.grpc.channel / plain channel <= 1.05x", ("--requests", "300", "--rounds", "5")
    ),
    "reload_restart": Known(
        "0 failed requests during in-place restarts", ("--restarts", "1", "--steady", "2")
    ),
}
ORDER = list(KNOWN)


@dataclasses.dataclass
class Outcome:
    name: str
    argv: list[str]
    returncode: int | None
    output: str
    seconds: float

    @property
    def figure(self) -> str:
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def met(self) -> str:
        if self.returncode != 0 or not self.figure:
            return "no figure" if self.returncode == 0 else f"failed (exit {self.returncode})"
        text = self.figure.lower()
        if "not met" in text:
            return "no"
        if re.search(r"\bmet\b", text):
            return "yes"
        known = KNOWN.get(self.name)
        verdict = known.met(self.figure) if known and known.met else None
        return "see figure" if verdict is None else ("yes" if verdict else "no")


def discover() -> list[str]:
    names = [path.stem for path in HERE.glob("*.py") if path.name != Path(__file__).name]
    known = [name for name in ORDER if name in names]
    return known + sorted(name for name in names if name not in KNOWN)


def run(name: str, quick: bool, timeout: float, options: Sequence[str] = ()) -> Outcome:
    """Run one benchmark (``options`` after the ``--quick`` ones) and collect its output."""
    argv = [sys.executable, str(HERE / f"{name}.py")]
    if quick and name in KNOWN:
        argv += KNOWN[name].quick
    argv += options
    started = time.monotonic()
    killed = ""
    with Process(argv) as proc:  # its own process group: whatever it started goes with it
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.stop(grace=0)
            killed = f"\n(killed: still running after {timeout:g} s)\n"
    output = proc.output() + killed
    return Outcome(name, argv, proc.popen.returncode, output, time.monotonic() - started)


def command(outcome: Outcome) -> str:
    shown = ["python", f"benchmarks/{outcome.name}.py", *outcome.argv[2:]]
    return shlex.join(shown)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| benchmark | command | figure | goal | met? |", "|---|---|---|---|---|"]
    for outcome in outcomes:
        known = KNOWN.get(outcome.name)
        cells = [
            outcome.name,
            f"`{command(outcome)}`",
            outcome.figure.replace("|", "\\|") or "(none)",
            known.goal if known else "-",
            outcome.met(),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller parameters for each")
    parser.add_argument("--only", default="", help="comma-separated names (default: all)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per benchmark")
    parser.add_argument("--output", type=Path, help="also write the table and outputs here")
    args = parser.parse_args()
    names = discover()
    if args.only:
        wanted = [name for name in args.only.split(",") if name]
        unknown = set(wanted) - set(names)
        if unknown:
            parser.error(f"unknown benchmarks: {sorted(unknown)}; known: {', '.join(names)}")
        names = [name for name in names if name in wanted]
    outcomes: list[Outcome] = []
    for name in names:
        print(f"running {name} ...", flush=True)
        outcome = run(name, args.quick, args.timeout)
        outcomes.append(outcome)
        print(f"  {outcome.seconds:.0f} s, exit {outcome.returncode}: {outcome.figure}", flush=True)
    result = table(outcomes)
    if args.output is not None:
        details = "\n\n".join(
            f"## {o.name} (`{command(o)}`, {o.seconds:.0f} s, exit {o.returncode})\n\n"
            f"```\n{o.output.rstrip()}\n```"
            for o in outcomes
        )
        args.output.write_text(f"{result}\n\n{details}\n")
    print()
    print(result)
    ok = all(o.returncode == 0 and o.figure for o in outcomes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

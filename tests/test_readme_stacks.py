"""The README's sections for each stack are short and copied from the tested examples.

Every line of their code blocks is a line of the stack's example (``examples/<stack>/**/*.py``,
which the end-to-end tests run), whitespace aside; a README line may leave out the example
line's trailing comment, never add one of its own. A section is ten lines or fewer, counted from
its first non-blank line to its last (the heading aside).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EXAMPLES = {
    "Flask": ROOT / "examples" / "flask",
    "Django": ROOT / "examples" / "django",
    "FastAPI / Starlette": ROOT / "examples" / "fastapi",
}
MAX_LINES = 10


def section(title: str) -> list[str]:
    """The lines under ``### title`` up to the next heading (a ``#`` line in code is none)."""
    lines = README.read_text().splitlines()
    start = lines.index(f"### {title}") + 1
    body: list[str] = []
    in_code = False
    for line in lines[start:]:
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            break
        body.append(line)
    while body and not body[-1].strip():
        body.pop()
    while body and not body[0].strip():
        body.pop(0)
    return body


def code_lines(lines: list[str]) -> list[str]:
    """The non-blank lines inside the code blocks of ``lines``."""
    found: list[str] = []
    in_code = False
    for line in lines:
        if line.startswith("```"):
            in_code = not in_code
        elif in_code and line.strip():
            found.append(line)
    return found


def normal(line: str) -> str:
    return " ".join(line.split())


def without_comment(line: str) -> str:
    """``line`` without its trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote: str | None = None
    for index, char in enumerate(line):
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#":
            return line[:index]
    return line


def example_lines(directory: Path) -> set[str]:
    """Each line of the example's Python files, whole and without its comment, normalised."""
    lines: set[str] = set()
    for path in sorted(directory.rglob("*.py")):
        for line in path.read_text().splitlines():
            lines.update({normal(line), normal(without_comment(line))})
    return lines


@pytest.mark.parametrize("title", sorted(EXAMPLES))
def test_the_stack_section_is_ten_lines_or_fewer(title: str) -> None:
    lines = section(title)
    assert lines, f"README has no text under ### {title}"
    assert len(lines) <= MAX_LINES, f"### {title} is {len(lines)} lines:\n" + "\n".join(lines)


@pytest.mark.parametrize("title", sorted(EXAMPLES))
def test_every_code_line_of_the_stack_section_is_copied_from_its_example(title: str) -> None:
    code = code_lines(section(title))
    assert code, f"### {title} has no code"
    copied = example_lines(EXAMPLES[title])
    missing = [line for line in code if normal(line) not in copied]
    where = EXAMPLES[title].relative_to(ROOT)
    assert missing == [], f"### {title}: lines that are not in {where}/**/*.py: {missing}"


def test_a_line_is_matched_whole_or_without_the_example_s_comment_only() -> None:
    copied = example_lines(ROOT / "examples" / "fastapi")
    line = "app.add_middleware(graceful.ASGIMiddleware, auto_ready=False)"
    assert normal(line) in copied
    assert normal(f"  {line}   ") in copied  # whitespace aside
    assert normal(f"{line}  # a comment of the README's own") not in copied
    assert normal(without_comment("x = '#'  # note")) == "x = '#'"

"""The docs match the code: every setting is in the README's table, and CI runs the README's
test command."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import graceful
from graceful._tools.cli import EXIT_CODES, build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def settings_rows() -> dict[str, str]:
    rows = {}
    section = README.split("## Settings")[1].split("\n## ")[0]
    for line in section.splitlines():
        match = re.match(r"\| `(\w+)` \| (.*?) \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def test_every_setting_is_documented_with_its_environment_variable() -> None:
    rows = settings_rows()
    for field in dataclasses.fields(graceful.Config):
        assert field.name in rows, f"README settings table lacks {field.name}"
        if field.metadata["kind"] != "checks":
            assert f"`GRACEFUL_{field.name.upper()}`" in rows[field.name]


def test_readme_documents_no_setting_that_does_not_exist() -> None:
    names = {field.name for field in dataclasses.fields(graceful.Config)}
    assert set(settings_rows()) <= names


def test_ci_runs_the_readme_test_command() -> None:
    command = re.search(r"```sh\n(.*pytest)\n```", README)
    assert command is not None, "README lacks the test command"
    assert command.group(1) in (ROOT / ".ci" / "run").read_text()


def test_cli_help_and_readme_list_the_same_exit_codes() -> None:
    help_text = build_parser().format_help()
    for code in EXIT_CODES:
        assert f"  {code}  " in help_text
        assert f"{code} " in README.split("Exit codes:")[1]

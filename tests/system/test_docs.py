"""The README and docs/ must stay true: the README's settings tables against the code, row by row and both ways;
and in every page, what a reader copies or follows (links, SEGSERVE_* variables, make targets, python -m commands
and their flags) against what the repository has."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli import build_parser as client_parser
from gradio_ui.settings import UISettings
from server.settings import Settings
from server.settings import build_parser as server_parser

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def readme_setting_rows() -> dict[str, list[str]]:
    """The README's settings tables, by environment variable: [flag, default, description], cell by cell."""
    rows: dict[str, list[str]] = {}
    for line in README.splitlines():
        if line.startswith("| `SEGSERVE_"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            assert len(cells) == 4, f"a settings row has {len(cells)} cells, not 4: {line}"
            env = cells[0].strip("`")
            assert env not in rows, f"{env} has two rows"
            rows[env] = cells[1:]
    return rows


def settings_in_code() -> dict[str, tuple[str, str]]:
    """Every setting the code has, server's and page's: environment variable -> (flag cell, default cell)."""
    found: dict[str, tuple[str, str]] = {}
    for prefix, model in (("SEGSERVE_", Settings), ("SEGSERVE_UI_", UISettings)):
        for name, field in model.model_fields.items():
            flag = "--" + name.replace("_", "-")
            is_bool = field.annotation is bool
            flag_cell = f"`{flag}` / `--no-{flag[2:]}`" if is_bool else f"`{flag}`"
            default = str(field.default).lower() if is_bool else str(field.default)
            found[prefix + name.upper()] = (flag_cell, f"`{default}`")
    return found


def test_the_readme_settings_tables_and_the_code_agree_row_by_row_both_ways() -> None:
    rows, code = readme_setting_rows(), settings_in_code()
    assert sorted(set(code) - set(rows)) == [], "settings without a README row"
    assert sorted(set(rows) - set(code)) == [], "README rows for settings the code does not have"
    for env, (flag_cell, default_cell) in code.items():
        flag, default, description = rows[env]
        assert flag == flag_cell, f"{env}: README flag {flag}, the code's {flag_cell}"
        # The cell is the default itself, optionally followed by a gloss: "`33554432` (32 MiB)".
        assert default == default_cell or default.startswith(default_cell + " ("), (
            f"{env}: README default {default}, the code's {default_cell}"
        )
        assert description, f"{env}: README row has no description"


@pytest.mark.parametrize(("cores", "threads"), [(1, 2), (2, 2), (8, 8), (None, 2)])
def test_workers_zero_means_what_the_readme_says(
    monkeypatch: pytest.MonkeyPatch, cores: int | None, threads: int
) -> None:
    """The README's rule for SEGSERVE_WORKERS=0, one thread per CPU core and at least 2, checked on machines of 1, 2
    and 8 cores (and one whose count is unknown) by patching the count, not by recomputing the code's formula."""
    assert "(0: one per CPU core, at least 2)" in readme_setting_rows()["SEGSERVE_WORKERS"][2]
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert Settings(workers=0).worker_threads == threads
    assert Settings(workers=3).worker_threads == 3  # a number given is taken as it is, whatever the cores


def test_one_python_version_everywhere() -> None:
    """asyncio.TaskGroup, `suppress(TimeoutError)` around asyncio timeouts and the numpy/scipy pins need 3.11."""
    root = Path(__file__).resolve().parents[2]
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.11"
    assert pyproject["tool"]["ruff"]["target-version"] == "py311"
    assert pyproject["tool"]["mypy"]["python_version"] == "3.11"
    assert "(Python 3.11+;" in README
    assert "ARG PYTHON_VERSION=3.11\n" in (root / "Dockerfile").read_text()
    assert sys.version_info >= (3, 11)


# ---- Every page: what a reader follows or copies exists -------------------------------------------------------

FENCED = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
SPAN = re.compile(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`")
"""An inline code span: it may wrap lines, never a paragraph."""
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
VARIABLE = re.compile(r"SEGSERVE_[A-Z0-9_]*[A-Z0-9]")
COMMAND_ENDS = {"|", "||", "&&", ";"}


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def code_of(text: str) -> Iterator[str]:
    """What a page shows as code: each line of its fenced blocks (continuations joined), each inline span."""
    for block in FENCED.findall(text):
        yield from block.replace("\\\n", " ").splitlines()
    for span in SPAN.findall(FENCED.sub("", text)):
        yield span.replace("\n", " ")


def anchors_of(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", FENCED.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in found:
            n += 1
            anchor = f"{slug}-{n}"
        found.add(anchor)
    return found


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_reaches_a_file_and_its_heading(page: Path) -> None:
    broken = []
    for target in LINK.findall(FENCED.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check here
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors_of(linked):
            broken.append(f"{target}: no such heading in {linked.relative_to(REPO)}")
    assert broken == [], f"{page_id(page)} links to what is not there"


def variables_the_code_reads() -> set[str]:
    """The settings' variables (each field under its model's prefix) and every other SEGSERVE_* name the code
    spells out whole as a string (what os.environ is asked for: the client's target, the test switches)."""
    names = {
        str(model.model_config.get("env_prefix", "")) + field.upper()
        for model in (Settings, UISettings)
        for field in model.model_fields
    }
    for source in REPO.rglob("*.py"):
        if any(part.startswith(".") for part in source.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and VARIABLE.fullmatch(node.value):
                names.add(node.value)
    return names


def test_every_segserve_variable_the_pages_name_is_one_the_code_reads() -> None:
    known = variables_the_code_reads()
    unknown = {
        f"{page_id(page)}: {name}" for page in PAGES for name in VARIABLE.findall(page.read_text()) if name not in known
    }
    assert sorted(unknown) == []


def commands_in(page: Path, program: str) -> Iterator[tuple[str, list[str]]]:
    """Each `PROGRAM WORD ...` the page shows as code: the word and the arguments after it, up to the end of
    that command (a pipe, `&&`, `;`, a redirection or a comment)."""
    for code in code_of(page.read_text()):
        for found in re.finditer(rf"(?:^|[\s(]){program}\s+([A-Za-z0-9_.-]+)(.*)", code):
            try:
                words = shlex.split(found.group(2), comments=True)
            except ValueError:  # an unbalanced quote: prose inside a span, not a command
                words = found.group(2).split()
            ends = [i for i, word in enumerate(words) if word in COMMAND_ENDS or word.startswith((">", "2>"))]
            yield found.group(1), words[: ends[0]] if ends else words


def test_every_make_target_the_pages_name_is_in_the_makefile() -> None:
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+):", (REPO / "Makefile").read_text(), re.M))
    named = {f"{page_id(page)}: make {target}" for page in PAGES for target, _ in commands_in(page, "make")}
    assert named, "no make command found: the pattern is wrong"
    assert sorted(n for n in named if n.rsplit(" ", 1)[1] not in targets) == []


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its subcommands."""
    flags = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= flags_of(sub)
    return flags


def client_subcommand(words: list[str], parser: argparse.ArgumentParser) -> str | None:
    """The subcommand of `python -m client WORDS...`: the first word that is neither an option nor its value."""
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("-"):
            return word
        action = parser._option_string_actions.get(word.split("=")[0])
        i += 2 if action is not None and action.nargs != 0 and "=" not in word else 1
    return None


def test_every_python_m_command_the_pages_show_runs_a_module_with_those_flags() -> None:
    """Each module exists; for the server and the client, each flag is one they take, and the client's
    subcommand is one of its own (a "load/unload" or "load|unload" names both)."""
    parsers = {"server": server_parser(), "client": client_parser()}
    client_commands = next(a for a in parsers["client"]._actions if isinstance(a, argparse._SubParsersAction))
    wrong: list[str] = []
    shown = 0
    for page in PAGES:
        for module, words in commands_in(page, r"python3?\s+-m"):
            shown += 1
            where = f"{page_id(page)}: python -m {module} {' '.join(words)}"
            if importlib.util.find_spec(module) is None:
                wrong.append(f"{where}: no module {module}")
                continue
            parser = parsers.get(module)
            if parser is None:
                continue
            flags = flags_of(parser)
            wrong += [f"{where}: no flag {w}" for w in words if w.startswith("--") and w.split("=")[0] not in flags]
            if module == "client" and (command := client_subcommand(words, parser)) is not None:
                parts = re.split(r"[/|]", command)
                wrong += [f"{where}: no subcommand {p}" for p in parts if p not in client_commands.choices]
    assert shown, "no python -m command found: the pattern is wrong"
    assert wrong == []

"""The README must stay true about the settings: every row of its tables against the code, both ways."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import pytest

from gradio_ui.settings import UISettings
from server.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


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

"""The README must stay true about the settings."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from server.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_has_a_row_in_the_readme_table() -> None:
    for name, field in Settings.model_fields.items():
        env, flag = f"`SEGSERVE_{name.upper()}`", f"`--{name.replace('_', '-')}"
        rows = [line for line in README.splitlines() if line.startswith(f"| {env} |")]
        assert rows, f"README settings table lacks {env}"
        default = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
        assert flag in rows[0] and f"`{default}`" in rows[0], f"README row for {env} disagrees with the code: {rows[0]}"


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

"""The README must stay true about the settings."""

from __future__ import annotations

from pathlib import Path

from server.settings import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_has_a_row_in_the_readme_table() -> None:
    for name, field in Settings.model_fields.items():
        env, flag = f"`SEGSERVE_{name.upper()}`", f"`--{name.replace('_', '-')}"
        rows = [line for line in README.splitlines() if line.startswith(f"| {env} |")]
        assert rows, f"README settings table lacks {env}"
        default = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
        assert flag in rows[0] and f"`{default}`" in rows[0], f"README row for {env} disagrees with the code: {rows[0]}"

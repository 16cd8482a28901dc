"""The plugin that makes CI fail on a skip (tests/helpers/no_skips.py), tried on a tiny suite in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SUITE = """
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="no such tool here")
def test_marked():
    pass

def test_skips_itself():
    pytest.skip("missing something")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False

@pytest.mark.xfail(reason="flaky, they say")
def test_loose_xfail_hiding_a_failure():
    assert 1 == 2
"""

# A module skipped whole while it is collected: its tests never run, and a plain run reports one skip.
SKIPPED_MODULE = """
import pytest

pytest.importorskip("no_such_module_anywhere")

def test_never_runs():
    pass
"""


def run_suite(tmp_path: Path, no_skips: str | None, suite: str = SUITE) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_tiny.py").write_text(suite)
    env = {k: v for k, v in os.environ.items() if k != "SEGSERVE_NO_SKIPS"}
    env["PYTHONPATH"] = str(ROOT)
    if no_skips is not None:
        env["SEGSERVE_NO_SKIPS"] = no_skips
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-c", os.devnull, "-p", "tests.helpers.no_skips", "-q", "-rfs", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_skips_fail_when_no_skips_is_set(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "1")
    assert done.returncode == 1, done.stdout
    # A skip while setting up (a skipif mark, a fixture) becomes an error; one inside the test, a failure;
    # both xfails (strict or not) fail, since each hides an assertion that fails.
    assert "3 failed, 1 passed, 1 error" in done.stdout, done.stdout
    assert "no such tool here" in done.stdout and "missing something" in done.stdout
    assert "allows no xfail" in done.stdout, done.stdout


def test_a_module_skipped_while_collecting_is_an_error_when_no_skips_is_set(tmp_path: Path) -> None:
    done = run_suite(tmp_path, "1", SKIPPED_MODULE)
    assert done.returncode != 0, done.stdout
    assert "1 error" in done.stdout and "skipped while collecting" in done.stdout, done.stdout
    assert "no_such_module_anywhere" in done.stdout, done.stdout


def test_skips_stay_skips_otherwise(tmp_path: Path) -> None:
    done = run_suite(tmp_path, None)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 2 skipped, 2 xfailed" in done.stdout, done.stdout
    module = run_suite(tmp_path, None, SKIPPED_MODULE)
    assert "1 skipped" in module.stdout and "error" not in module.stdout, module.stdout

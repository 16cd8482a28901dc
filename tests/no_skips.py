"""A pytest plugin: with SEGSERVE_NO_SKIPS=1 (CI sets it), a skipped test fails instead.

A skip in CI is a gap nobody sees: a missing tool there must turn the run red, not quietly shrink it.
Deselecting (`-m "not soak"`) is not skipping and is left alone; expected failures (xfail) too.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

ENV = "SEGSERVE_NO_SKIPS"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get(ENV) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped, but {ENV}=1 allows no skips: {reason}"

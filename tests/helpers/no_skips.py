"""A pytest plugin: with SEGSERVE_NO_SKIPS=1 (CI sets it), a skip or an expected failure fails instead.

A skip in CI is a gap nobody sees: a missing tool there must turn the run red, not quietly shrink it. So are
the other ways a test can end without having passed:
- a skip while collecting (a module-level `pytest.importorskip`, `pytest.skip(allow_module_level=True)`):
  the whole module is an error;
- a skip while setting up or running: that test fails;
- an expected failure (xfail, strict or not): an xfail hides whatever assertion fails inside it, so in CI it
  fails like any test. Strict xfails that pass already fail (XPASS(strict)).
Deselecting (`-m "not soak"`) is not skipping and is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

ENV = "SEGSERVE_NO_SKIPS"


def _on() -> bool:
    return os.environ.get(ENV) == "1"


def _reason(longrepr: object) -> str:
    return str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()  # type: ignore[attr-defined]
    if _on() and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped while collecting, but {ENV}=1 allows no skips: {_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not _on():
        return
    if hasattr(report, "wasxfail"):
        if report.skipped:  # an xfail that failed as expected: still a failure nobody sees
            report.outcome = "failed"
            report.longrepr = f"expected to fail ({report.wasxfail or 'xfail'}), but {ENV}=1 allows no xfail"
            del report.wasxfail
        return
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped, but {ENV}=1 allows no skips: {_reason(report.longrepr)}"

"""A pytest plugin: the known-answer model (tests/helpers/known_model.py) is trained before the first test starts,
outside every test's timeout, when a selected test needs it and no cached copy exists.

Training takes a few minutes on two cores and 14 minutes on a loaded machine, more than pytest's per-test timeout (300 s),
so a lone `pytest tests/core/test_masks.py` on a fresh clone used to time out inside the fixture. Here it runs once,
after collection, as `python -m tests.helpers.known_model` in a child process under its own bound
(SEGSERVE_KNOWN_MODEL_TIMEOUT, seconds); its progress is shown. If it fails or runs out of time, every test that
needs the model errors with one message saying how to train it ahead; the others run as usual.
`make test` trains it before pytest starts, so there this finds the cached copy and does nothing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import known_model

TIMEOUT_ENV = "SEGSERVE_KNOWN_MODEL_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0
"""Four times the 14 minutes measured on a loaded 2-core machine; a wait for another process's training (the
cache's lock) counts in it too."""
FIXTURE = "known_weights"
_problem = pytest.StashKey[str]()


def how_to_train() -> str:
    return (
        "train it once, ahead of the tests: `make test` does, or `.venv/bin/python -m tests.helpers.known_model` "
        f"(a few minutes on 2 cores; cached in {known_model.cache_dir()})"
    )


def _timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)


def _train_in_child(config: pytest.Config) -> str | None:
    """Trains (or waits for another process's training) in a child; None when done, else what went wrong."""
    timeout = _timeout_s()
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if terminal is not None:
        terminal.write_line(
            f"The known-answer model is not cached ({known_model.weights_path()}): training it now, before the tests, "
            f"for up to {timeout:.0f} s ({TIMEOUT_ENV}); next time {how_to_train()}."
        )
    command = [sys.executable, "-m", "tests.helpers.known_model"]
    root = Path(__file__).resolve().parents[2]
    # Its progress lines (stderr) go to the terminal as they come; a timeout kills it, which frees the cache's lock.
    uncaptured = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
    try:
        with uncaptured:
            done = subprocess.run(command, cwd=root, stdout=subprocess.DEVNULL, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"the known-answer model was not trained within {timeout:.0f} s ({TIMEOUT_ENV})"
    if done.returncode != 0:
        return f"training the known-answer model failed (`{' '.join(command[1:])}` exited {done.returncode})"
    if not known_model.weights_path().is_file():
        return f"training the known-answer model left no {known_model.weights_path()}"
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.option.collectonly or known_model.weights_path().is_file():
        return
    if any(FIXTURE in getattr(item, "fixturenames", ()) for item in session.items):
        problem = _train_in_child(config)
        if problem is not None:
            config.stash[_problem] = problem


@pytest.fixture(scope="session")
def known_weights(pytestconfig: pytest.Config) -> Path:
    """The known-answer model's state_dict, trained before the first test if it was not cached; or, if that
    training failed, a failure of every test that needs it, saying how to train it."""
    problem = pytestconfig.stash.get(_problem, None)
    if problem is not None:
        pytest.fail(f"{problem}; {how_to_train()}", pytrace=False)
    return known_model.known_weights()

"""The cluster scenarios' load generator (tests/cluster/load.py) without a cluster: the tests' own server.

Its calls run in a child process so that a crash there (grpcio's C core) is one failed scenario with its
stacks, not a dead pytest that leaves the cluster behind. These need no cluster, so they run with
`make test` too.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from tests.cluster.crashes import STACKS_FILE
from tests.cluster.load import Load, wait_until
from tests.helpers.servers import ServerThread


def test_the_load_counts_its_calls_from_a_child_process(server: ServerThread, tmp_path: Path) -> None:
    with Load(server.target, kinds=("segment", "stream"), artifacts=tmp_path) as load:
        assert load.running
        time.sleep(1)
    counts = load.counts
    # The child lifted its core-size limit as far as it may, so that a crash of it leaves a core.
    assert load.core_limit == resource.getrlimit(resource.RLIMIT_CORE)[1]
    assert counts.outcomes[("segment", "ok")] > 0 and counts.outcomes[("stream", "ok")] > 0, counts.summary()
    assert not counts.failed(), f"{counts.summary()}\n" + "\n".join(counts.errors)
    assert not load.running
    assert list(tmp_path.iterdir()) == [], "a load that ended well leaves nothing behind"


def test_a_crash_of_the_load_fails_the_test_with_its_signal_and_stacks(server: ServerThread, tmp_path: Path) -> None:
    with Load(server.target, kinds=("segment",), artifacts=tmp_path, abort_after_s=0.5, core_dumps=False) as load:
        wait_until(lambda: not load.running, 60, "the load generator's abort", every=0.1)
    with pytest.raises(AssertionError) as failed:
        load.counts  # noqa: B018  (reading it is the test)
    message = str(failed.value)
    assert load.folder is not None
    stacks = load.folder / STACKS_FILE
    assert "died of SIGABRT (exit code -6)" in message and str(stacks) in message, message
    assert "core dump: none, turned off for this load" in message, message
    dump = stacks.read_text()
    assert "Fatal Python error: Aborted" in dump and "(most recent call first)" in dump, dump
    assert not list(load.folder.glob("core*"))


def a_body_that_gives_up(target: str, artifacts: Path) -> None:
    with Load(target, kinds=("segment",), artifacts=artifacts, abort_after_s=0.2, core_dumps=False) as load:
        wait_until(lambda: not load.running, 60, "the load generator's abort", every=0.1)
        raise TimeoutError("the body gave up")


def test_a_crash_during_the_with_body_is_raised_on_leaving_it(server: ServerThread, tmp_path: Path) -> None:
    """A scenario's body that fails because the load died shows the crash first, its own error as context."""
    with pytest.raises(AssertionError, match="died of SIGABRT") as failed:
        a_body_that_gives_up(server.target, tmp_path)
    assert isinstance(failed.value.__context__, TimeoutError)

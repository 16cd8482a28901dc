"""What a test needs to tell about a child process that crashed: its signal, its Python stacks, its core dump.

The child side (`prepare_for_a_crash`) works in a folder of its own, writes every thread's Python stack
there on a fatal signal (faulthandler) and lifts its core-size limit, so that a crash in C code (grpcio's
core) leaves what is needed to read it. The parent side (`how_it_ended`, `core_location`) turns its exit
code and the machine's core_pattern into a sentence for the failure message.
"""

from __future__ import annotations

import faulthandler
import os
import re
import resource
import signal
import tempfile
from pathlib import Path
from typing import TextIO

ARTIFACTS_ENV = "SEGSERVE_CLUSTER_ARTIFACTS"
"""The folder under which each load generator gets a folder of its own (default: the system's temp folder)."""
STACKS_FILE = "python-stacks.txt"
CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")
CORE_USES_PID = Path("/proc/sys/kernel/core_uses_pid")
# Sent to a child that does not stop: faulthandler writes its stacks, as at a crash, before it is killed.
DUMP_SIGNAL = signal.SIGUSR1


def artifacts_folder(base: Path | None, name: str) -> Path:
    """A new folder for one child's stacks and core: under `base`, or under $SEGSERVE_CLUSTER_ARTIFACTS, or
    under the temp folder; named after the running test where pytest says which ($PYTEST_CURRENT_TEST)."""
    root = base or Path(os.environ.get(ARTIFACTS_ENV) or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    prefix = "-".join(part for part in (name, re.sub(r"[^\w.-]", "_", test)[:80]) if part) + "-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def prepare_for_a_crash(folder: Path, core_dumps: bool = True) -> tuple[TextIO, int]:
    """In the child, first thing: work in `folder` (a relative core_pattern writes the core there), dump every
    thread's Python stack into its STACKS_FILE on a fatal signal or DUMP_SIGNAL, and allow core dumps as
    large as the hard limit lets (none with `core_dumps` False). Returns the open stacks file (faulthandler writes to its descriptor, so it
    stays open for the process's life) and the core-size limit now in force (0: no core can be written)."""
    os.chdir(folder)
    stacks = open(folder / STACKS_FILE, "w")  # noqa: SIM115  (open until the process ends, by design)
    faulthandler.enable(stacks, all_threads=True)
    faulthandler.register(DUMP_SIGNAL, stacks, all_threads=True)
    if not core_dumps:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        return stacks, 0
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):  # not root: the soft limit can still rise to the hard one
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    return stacks, resource.getrlimit(resource.RLIMIT_CORE)[0]


def how_it_ended(exitcode: int) -> str:
    """'died of SIGSEGV (exit code -11)' or 'exited with code 1'."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"died of {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def core_location(pid: int, folder: Path, core_limit: int | None) -> str:
    """Where the kernel put the core dump of `pid`, which worked in `folder`, as far as this machine says."""
    if core_limit == 0:
        return "none: its core-size limit (RLIMIT_CORE) was 0 and could not be raised"
    try:
        pattern = CORE_PATTERN.read_text().strip()
    except OSError:
        return f"unknown ({CORE_PATTERN} unreadable); look in {folder}"
    if pattern.startswith("|"):
        handler = pattern[1:].split()[0] if pattern[1:].split() else "?"
        return (
            f"handed to {handler} (core_pattern {pattern!r}): e.g. `coredumpctl info {pid}`, or /var/crash/ "
            "for apport; a container's core_pattern is its host's"
        )
    path = pattern.replace("%p", str(pid)).replace("%P", str(pid)).replace("%%", "%")
    if "%p" not in pattern and _core_uses_pid():
        path += f".{pid}"
    where = folder / path
    if where.is_file():
        return f"{where} (core_pattern {pattern!r})"
    return f"{where} if one was written (core_pattern {pattern!r}; other %-specifiers not expanded)"


def _core_uses_pid() -> bool:
    try:
        return CORE_USES_PID.read_text().strip() == "1"
    except OSError:
        return False

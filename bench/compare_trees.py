"""`python -m bench.compare_trees TREE [TREE ...]`: make bench's served step at concurrency 8 (the 'batching'
sweep: a real `python -m server`, random weights, bench.loadgen over the bench's images) for each checkout in
turn, alternated over --rounds rounds, so that a change's before and after are measured back to back in one
sitting on one machine (a shared machine's speed drifts over minutes). One JSON line per run: the tree, its
commit, images/s (the median of the windows) and the windows.

    git worktree add /tmp/before <commit>
    .venv/bin/python -m bench.compare_trees /tmp/before . --rounds 2

Each tree runs its own code (its folder first on PYTHONPATH, in a child process); this module's venv serves all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

_ONE_RUN = """
import argparse, json, os, tempfile
from pathlib import Path
from bench import run
from bench.images import image_set

args = argparse.Namespace(concurrency="8", warmup=3.0, duration=8.0, repeats=3, smoke=False)
env = {**os.environ, "PYTHONPATH": os.getcwd()}
with tempfile.TemporaryDirectory() as tmp:
    images = Path(tmp) / "images"
    images.mkdir()
    for k, image in enumerate(image_set()):
        (images / f"{image.kind}-{k}-{image.name}.jpg").write_bytes(image.data)
    step = run.served_sweep("batching", images, args, env, "8")["steps"][0]
print(json.dumps({"throughput": step["throughput"], "windows": step["throughput_windows"]}))
"""


def measure(tree: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", _ONE_RUN], cwd=tree, env=env, capture_output=True, text=True, timeout=900, check=True
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout
    return {"tree": str(tree), "commit": commit.strip(), **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare_trees", description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    for _ in range(args.rounds):
        for tree in args.trees:
            print(json.dumps(measure(tree.resolve())), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

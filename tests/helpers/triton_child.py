"""Running one of the tritonclient.grpc scripts (tests/helpers/triton_grpc_calls.py, tests/helpers/triton_model_control.py) in
a child process, as they must be (triton_grpc_calls.py says why): the job as JSON on stdin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_in_child(module: str, job: dict[str, Any], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )

"""tritonclient.grpc's load_model and unload_model against a segserve, in a child process (tests/helpers/triton_grpc_calls.py
says why): `python -m tests.helpers.triton_model_control`.

Reads a JSON job on stdin: {"target", "load": [names], "unload": [names]}. Loads, then unloads, each in order,
and writes which of them were ready after each step, as one JSON object."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import tritonclient.grpc as grpcclient

# The token the tests' servers take (tests/conftest.py sets it; this child inherits the environment).
CONTROL_HEADERS = {"authorization": f"Bearer {os.environ.get('SEGSERVE_CONTROL_TOKEN', '')}"}


def run(job: dict[str, Any]) -> dict[str, Any]:
    with grpcclient.InferenceServerClient(job["target"]) as client:
        for name in job["load"]:
            client.load_model(name, headers=CONTROL_HEADERS)
        ready_after_load = {name: client.is_model_ready(name) for name in job["load"]}
        for name in job["unload"]:
            client.unload_model(name, headers=CONTROL_HEADERS)
        ready_after_unload = {name: client.is_model_ready(name) for name in job["unload"]}
    return {"ready_after_load": ready_after_load, "ready_after_unload": ready_after_unload}


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)

"""The committed stubs must match what `make protos` generates from the .proto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("protos/segserve/v1/segserve.proto")


def test_generated_stubs_match_the_proto(tmp_path: Path) -> None:
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            "--mypy_out=.",
            "--mypy_grpc_out=.",
            str(PROTO),
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    generated = sorted(p.name for p in (tmp_path / PROTO.parent).glob("segserve_pb2*"))
    assert generated == ["segserve_pb2.py", "segserve_pb2.pyi", "segserve_pb2_grpc.py", "segserve_pb2_grpc.pyi"]
    for name in generated:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        committed = (ROOT / PROTO.parent / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos`"

"""The committed stubs must match what `make protos` generates from the .proto."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = (Path("protos/segserve/v1/segserve.proto"), Path("protos/inference/grpc_predict_v2.proto"))


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.stem)
def test_generated_stubs_match_the_proto(tmp_path: Path, proto: Path) -> None:
    (tmp_path / proto.parent).mkdir(parents=True)
    shutil.copy(ROOT / proto, tmp_path / proto)
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
            str(proto),
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    generated = sorted(p.name for p in (tmp_path / proto.parent).glob(f"{proto.stem}_pb2*"))
    stem = proto.stem
    assert generated == [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py", f"{stem}_pb2_grpc.pyi"]
    for name in generated:
        fresh = (tmp_path / proto.parent / name).read_text()
        committed = (ROOT / proto.parent / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make protos`"

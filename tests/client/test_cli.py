from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.helpers.images import encode, photo_like
from tests.helpers.servers import ServerThread

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_segment_one_photo_writes_mask_of_its_size(server: ServerThread, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(encode(photo_like(300, 200), "JPEG"))
    done = run_cli("segment", str(photo), "--out", str(tmp_path / "out"), "--overlay", "--target", server.target)
    assert done.returncode == 0, done.stderr
    mask = Image.open(tmp_path / "out" / "photo.mask.png")
    assert mask.size == (300, 200) and mask.mode == "P"
    assert Image.open(tmp_path / "out" / "photo.overlay.png").size == (300, 200)
    assert "photo.jpg: 300x200" in done.stdout and "%" in done.stdout


def test_segment_many_over_the_stream_reports_the_bad_one(server: ServerThread, tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(encode(photo_like(50 + i, 40, seed=i)))
    (tmp_path / "bad.png").write_bytes(b"nope")
    paths.append(tmp_path / "bad.png")
    done = run_cli(
        "--target", server.target, "segment", *map(str, paths), "--out", str(tmp_path / "o"), "--max-size", "32"
    )
    assert done.returncode == 1
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["img0.mask.png", "img1.mask.png", "img2.mask.png"]
    assert "error: bad.png: INVALID_ARGUMENT" in done.stderr and "Traceback" not in done.stderr


def test_info_and_health(server: ServerThread) -> None:
    info = run_cli("info", "--target", server.target)
    assert info.returncode == 0 and "deeplabv3_mobilenet_v3_large" in info.stdout and "RANDOM" in info.stdout
    served = server.app.pipeline.runtime
    assert served is not None and f"runtime:        {served.description}" in info.stdout
    health = run_cli("health", "--target", server.target)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"


def test_unreachable_server_is_one_line_and_nonzero(tmp_path: Path) -> None:
    for args in (("health",), ("info",)):
        done = run_cli("--target", "127.0.0.1:1", "--timeout", "3", *args)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("error") and "UNAVAILABLE" in done.stderr


def test_missing_file_is_a_readable_error(tmp_path: Path) -> None:
    done = run_cli("segment", str(tmp_path / "nope.jpg"))
    assert done.returncode == 2 and "no such file" in done.stderr and "Traceback" not in done.stderr

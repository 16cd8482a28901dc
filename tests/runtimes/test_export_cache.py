"""The exported-graph cache: reused when sound, rebuilt when corrupt or stale, built once under concurrency."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client import SegmentClient
from server.runtimes import export_cache, graph_export
from server.runtimes.export_cache import cached_file, resolve_cache_root
from tests.helpers.images import encode
from tests.helpers.known_model import CLASS_OF, SHAPE_FLOOR, Shape, iou, render_scene
from tests.helpers.servers import ServerThread, known_settings

KEY = {"model": "m", "weights_sha256": "abc", "runtime": "r 1"}


class Builder:
    def __init__(self, payload: bytes = b"graph bytes", delay_s: float = 0.0) -> None:
        self.payload = payload
        self.delay_s = delay_s
        self.calls = 0

    def __call__(self, out: Path) -> None:
        self.calls += 1
        time.sleep(self.delay_s)
        out.write_bytes(self.payload)


def test_a_sound_file_is_reused(tmp_path: Path) -> None:
    build = Builder()
    first = cached_file(tmp_path, "m", ".onnx", KEY, build)
    second = cached_file(tmp_path, "m", ".onnx", KEY, build)
    assert first == second and first.read_bytes() == b"graph bytes" and build.calls == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"garbage"),
        lambda path: path.write_bytes(b"graph bytez"),  # same size, other bytes
        lambda path: path.unlink(),
        lambda path: path.with_name(path.name + ".json").unlink(),
        lambda path: path.with_name(path.name + ".json").write_text("{not json"),
    ],
    ids=["garbage", "same-size", "file-gone", "record-gone", "record-garbage"],
)
def test_a_corrupt_file_is_rebuilt(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    build = Builder()
    path = cached_file(tmp_path, "m", ".onnx", KEY, build)
    damage(path)
    assert cached_file(tmp_path, "m", ".onnx", KEY, build) == path
    assert path.read_bytes() == b"graph bytes" and build.calls == 2


def test_a_record_for_another_key_is_stale(tmp_path: Path) -> None:
    build = Builder()
    path = cached_file(tmp_path, "m", ".onnx", KEY, build)
    record = path.with_name(path.name + ".json")
    data = json.loads(record.read_text())
    data["key"]["weights_sha256"] = "other weights"
    record.write_text(json.dumps(data))
    cached_file(tmp_path, "m", ".onnx", KEY, build)
    assert build.calls == 2


def test_another_key_is_another_file(tmp_path: Path) -> None:
    build = Builder()
    a = cached_file(tmp_path, "m", ".onnx", KEY, build)
    b = cached_file(tmp_path, "m", ".onnx", {**KEY, "runtime": "r 2"}, build)
    assert a != b and build.calls == 2


def test_servers_starting_together_build_once(tmp_path: Path) -> None:
    build = Builder(delay_s=0.5)
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(cached_file(tmp_path, "m", ".onnx", KEY, build))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert build.calls == 1 and len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir() if "building" in p.name or p.name.endswith(".tmp")] == []


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def failing(out: Path) -> None:
        out.write_bytes(b"half a graph")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        cached_file(tmp_path, "m", ".onnx", KEY, failing)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_an_unwritable_cache_folder_falls_back_to_a_temp_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the folder should go")
    root = resolve_cache_root(str(blocker / "cache"))
    assert root != blocker / "cache" and root.is_dir() and "segserve-cache" in root.name


def test_auto_follows_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_root("auto") == tmp_path / "xdg" / "segserve"


# ---- the real thing: a server, its cached graph, garbage written into it ---------------------------------


def masks_are_right(server: ServerThread) -> None:
    image, truth = render_scene(128, 96, [Shape("red", "disc", 0.3, 0.5, 0.25), Shape("green", "box", 0.72, 0.5, 0.2)])
    with SegmentClient(server.target, timeout=60) as client:
        result = client.segment(encode(Image.fromarray(image)))
    labels = np.asarray(result.mask)
    scores = [iou(labels, truth, CLASS_OF[colour]) for colour in ("red", "green")]
    assert min(scores) >= SHAPE_FLOOR, scores


def test_a_restart_reuses_the_graph_and_garbage_in_it_is_rebuilt(
    known_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = known_settings(known_weights, runtime="onnxruntime", cache_dir=str(tmp_path), warmup=False)
    server = ServerThread(settings)
    try:
        masks_are_right(server)
    finally:
        server.stop()
    (graph,) = tmp_path.glob("*.onnx")

    exports = []
    real_export = graph_export.export_onnx
    monkeypatch.setattr(graph_export, "export_onnx", lambda *a: exports.append(1) or real_export(*a))
    server = ServerThread(settings)  # a restart: nothing exported
    server.stop()
    assert exports == []

    graph.write_bytes(b"garbage" * 1000)
    server = ServerThread(settings)
    try:
        record = json.loads(graph.with_name(graph.name + ".json").read_text())
        assert exports == [1] and export_cache.is_valid(graph, record["key"])
        masks_are_right(server)
    finally:
        server.stop()


def test_the_graph_key_follows_weights_runtime_precision_and_export_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.runtimes import factory
    from server.runtimes.weights import load_model
    from tests.helpers.servers import make_settings

    settings = make_settings().model_settings()
    loaded = load_model(settings.model, "random")
    base = factory.graph_key(settings, loaded, "w1", "onnxruntime", "fp32")
    assert base == factory.graph_key(settings, loaded, "w1", "onnxruntime", "fp32")
    others = [
        factory.graph_key(settings, loaded, "w2", "onnxruntime", "fp32"),
        factory.graph_key(settings, loaded, "w1", "openvino", "fp32"),
        factory.graph_key(settings, loaded, "w1", "onnxruntime", "int8"),
    ]
    monkeypatch.setattr(factory, "source_sha256", lambda path: "edited export code")
    others.append(factory.graph_key(settings, loaded, "w1", "onnxruntime", "fp32"))
    assert all(other != base for other in others) and len({json.dumps(o, sort_keys=True) for o in others}) == 4

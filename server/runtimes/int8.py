"""int8: static quantization of the exported graph, one tool per runtime.

- openvino: NNCF's post-training quantization (PERFORMANCE preset: symmetric activations, the kernels
  OpenVINO's CPU plugin runs in int8, AMX or VNNI) of the graph `ov.convert_model` reads from the ONNX
  export. convert_model, not `Core.read_model`: read_model keeps the export's bias-reshape chains, and
  those keep the depthwise convolutions out of the int8 kernels. The quantized graph is cached as one file
  (OpenVINO's IR, both halves packed), so a restart loads it without quantizing again. What is not
  quantized runs in bf16 where the CPU computes it natively (openvino_runtime.HINTS).
- onnxruntime: its own static quantizer (QDQ, weights per channel), the graph it runs best.

Activation ranges are calibrated on the fixed photos and scenes of server/runtimes/calibration.py, resized
as the server resizes requests. Quantizing takes tens of seconds on two cores (docs/performance.md): it
happens once per weights, library version and size, and the log says how long it took.
"""

from __future__ import annotations

import contextlib
import io
import logging
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from server.runtimes.calibration import calibration_images
from server.runtimes.graph_export import INPUT_NAME

log = logging.getLogger(__name__)

PACKED_SUFFIX = ".ovpack"
_PACKED_MAGIC = b"segserve-openvino-ir-1\n"
_LENGTH = struct.Struct("<Q")


def quantize_onnxruntime(fp32_graph: Path, out: Path, max_size: int) -> None:
    """Writes ONNX Runtime's int8 (QDQ) graph of `fp32_graph` to `out`."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(q.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: image[None]} for image in calibration_images(max_size)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="segserve-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_graph), str(prepared), skip_symbolic_shape=True)
        q.quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax,
        )


def quantize_openvino(fp32_graph: Path, out: Path, max_size: int, *, ignored_names: tuple[str, ...] = ()) -> None:
    """Writes NNCF's int8 model of `fp32_graph` to `out`, packed (read it back with read_packed).

    `ignored_names`: regular expressions of operations to leave unquantized (the tests quantize part of a
    model this way)."""
    from server.runtimes.openvino_import import import_openvino

    ov = import_openvino()
    started = time.monotonic()
    model = ov.convert_model(str(fp32_graph))
    images = calibration_images(max_size)
    with _quietly():
        nncf = _import_nncf()
        quantized = nncf.quantize(
            model,
            nncf.Dataset(images, lambda image: image[None]),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(images),
            ignored_scope=nncf.IgnoredScope(patterns=list(ignored_names), validate=False) if ignored_names else None,
        )
    with tempfile.TemporaryDirectory(prefix="segserve-int8-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
        _pack(xml.read_bytes(), xml.with_suffix(".bin").read_bytes(), out)
    log.info(
        "quantized %s to int8 with NNCF %s in %.1f s", fp32_graph.name, nncf.__version__, time.monotonic() - started
    )


def _import_nncf() -> Any:
    """NNCF, its log sent through the server's (warnings and up) instead of its own handler on stdout."""
    import nncf
    from nncf.common.logging.logger import nncf_logger

    for handler in list(nncf_logger.handlers):
        nncf_logger.removeHandler(handler)
    nncf_logger.propagate = True
    nncf_logger.setLevel(logging.WARNING)
    return nncf


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """NNCF draws progress bars on stdout (rich), which is not its to write to in a server: they go nowhere.
    sys.stdout is the process's, so for the quantization's seconds nothing else may print there either; the
    server's log is not affected (its handler holds stderr). NNCF also imports torch.utils.cpp_extension on
    the way, whose warning about CUDA's absence says nothing."""
    cpp_extension = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension.level
    cpp_extension.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        cpp_extension.setLevel(level)


def _pack(xml: bytes, weights: bytes, out: Path) -> None:
    with out.open("wb") as file:
        file.write(_PACKED_MAGIC)
        file.write(_LENGTH.pack(len(xml)))
        file.write(xml)
        file.write(weights)


def read_packed(core: Any, path: Path) -> Any:
    """The ov.Model in a file _pack wrote. Raises ValueError for a file of another kind."""
    ov = __import__("openvino")
    data = path.read_bytes()
    if not data.startswith(_PACKED_MAGIC):
        raise ValueError(f"{path} is not a packed OpenVINO model")
    start = len(_PACKED_MAGIC) + _LENGTH.size
    (xml_length,) = _LENGTH.unpack_from(data, len(_PACKED_MAGIC))
    xml = data[start : start + xml_length]
    weights = np.frombuffer(data, dtype=np.uint8, offset=start + xml_length).copy()
    return core.read_model(model=xml.decode(), weights=ov.Tensor(weights))

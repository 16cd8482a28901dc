"""Opt-in int8: static quantization of the exported graph with ONNX Runtime's own tools.

Activation ranges are calibrated on scikit-image's bundled sample photos (the same ones the page offers
as examples), resized as the server resizes requests. Weights per channel, QDQ format.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from server.runtimes.calibration import sample_photos
from server.runtimes.graph_export import INPUT_NAME

log = logging.getLogger(__name__)


def quantize_int8(fp32_graph: Path, out: Path, max_size: int) -> None:
    """Writes the int8 graph of `fp32_graph` to `out`."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(q.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: image[None]} for image in sample_photos(max_size)])

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

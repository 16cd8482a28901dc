"""Opt-in int8: static quantization of the exported graph with ONNX Runtime's own tools.

Activation ranges are calibrated on scikit-image's bundled sample photos (the same ones the page offers
as examples), resized as the server resizes requests. Weights per channel, QDQ format.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from server.runtimes.graph_export import INPUT_NAME

log = logging.getLogger(__name__)

CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def calibration_images(max_size: int) -> list[np.ndarray]:
    """The sample photos as uint8 HxWx3, one shape (max_size on the long side, 4:3), as the model sees them."""
    from skimage import data as samples

    width, height = max_size, max_size * 3 // 4
    images = []
    for name in CALIBRATION_PHOTOS:
        pixels = getattr(samples, name)()
        image = Image.fromarray(pixels).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        images.append(np.asarray(image, dtype=np.uint8))
    return images


def quantize_int8(fp32_graph: Path, out: Path, max_size: int) -> None:
    """Writes the int8 graph of `fp32_graph` to `out`."""
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

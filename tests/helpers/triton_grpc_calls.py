"""tritonclient.grpc calls against a segserve, run in a child process: `python -m tests.helpers.triton_grpc_calls`.

Why a child process: tritonclient.grpc registers Triton's own generated `inference.*` messages in
protobuf's default descriptor pool, and segserve's server registers its own (written from the same
protocol); one process cannot hold both (protobuf refuses duplicate symbols). The test process runs
servers in-process, so tritonclient.grpc runs here.

Reads a JSON job on stdin: {"target", "model", "images": [paths of encoded images]}. Writes one JSON
object: each call's answer, masks as base64 .npy, errors as {"status", "message"}.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

# The token the tests' servers take (tests/conftest.py sets it; this child inherits the environment).
CONTROL_HEADERS = {"authorization": f"Bearer {os.environ.get('SEGSERVE_CONTROL_TOKEN', '')}"}


def _npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def _error(exc: InferenceServerException) -> dict[str, str]:
    return {"status": str(exc.status()), "message": str(exc.message())}


def _image_input(data: list[bytes], shape: list[int] | None = None) -> grpcclient.InferInput:
    array = np.array(data, dtype=np.object_).reshape(shape or [len(data)])
    tensor = grpcclient.InferInput("IMAGE", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def _outputs(*names: str) -> list[grpcclient.InferRequestedOutput]:
    return [grpcclient.InferRequestedOutput(name) for name in names]


def _result(result: Any) -> dict[str, Any]:
    classes = result.as_numpy("CLASSES")
    return {
        "mask": _npy(result.as_numpy("MASK")),
        "mask_png": [base64.b64encode(png).decode() for png in result.as_numpy("MASK_PNG").reshape(-1)],
        "classes": [json.loads(c) for c in classes.reshape(-1)],
    }


def _attempt(call: Any) -> Any:
    try:
        return call()
    except InferenceServerException as exc:
        return _error(exc)


def run(job: dict[str, Any]) -> dict[str, Any]:
    model = job["model"]
    images = [Path(p).read_bytes() for p in job["images"]]
    out: dict[str, Any] = {}
    with grpcclient.InferenceServerClient(job["target"]) as client:
        out["live"] = client.is_server_live()
        out["ready"] = client.is_server_ready()
        out["model_ready"] = client.is_model_ready(model)
        out["server_metadata"] = client.get_server_metadata(as_json=True)
        out["metadata"] = client.get_model_metadata(model, as_json=True)
        out["config"] = client.get_model_config(model, as_json=True)
        out["index"] = client.get_model_repository_index(as_json=True, headers=CONTROL_HEADERS)
        wanted = _outputs("MASK", "MASK_PNG", "CLASSES")
        out["infer"] = _result(client.infer(model, [_image_input(images[:1])], outputs=wanted))
        out["infer_n1"] = _result(client.infer(model, [_image_input(images[:1], [1, 1])], outputs=wanted))
        out["infer_all"] = _result(client.infer(model, [_image_input(images)], outputs=wanted))

        answers: queue.Queue[Any] = queue.Queue()
        client.async_infer(
            model, [_image_input(images[:1])], lambda result, error: answers.put((result, error)), outputs=wanted
        )
        result, error = answers.get(timeout=60)
        out["async_infer"] = _error(error) if error else _result(result)

        frames: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: frames.put((result, error)))
        for i, image in enumerate(images):
            client.async_stream_infer(model, [_image_input([image])], request_id=f"frame-{i}", outputs=wanted)
        client.async_stream_infer(model, [_image_input([b"not an image"])], request_id="bad-frame", outputs=wanted)
        streamed = []
        for _ in range(len(images) + 1):
            result, error = frames.get(timeout=60)
            if error:
                streamed.append({"error": _error(error)})
            else:
                streamed.append({"id": result.get_response().id, **_result(result)})
        client.stop_stream()
        out["stream"] = streamed

        out["statistics"] = client.get_inference_statistics(model, as_json=True)
        out["unknown_model"] = _attempt(lambda: client.get_model_metadata("no-such-model"))
        out["unknown_model_infer"] = _attempt(lambda: client.infer("no-such-model", [_image_input(images[:1])]))
        wrong_type = grpcclient.InferInput("IMAGE", [1], "FP32")
        wrong_type.set_data_from_numpy(np.zeros([1], dtype=np.float32))
        out["wrong_datatype"] = _attempt(lambda: client.infer(model, [wrong_type]))
        wrong_name = grpcclient.InferInput("PICTURE", [1], "BYTES")
        wrong_name.set_data_from_numpy(np.array([images[0]], dtype=np.object_))
        out["wrong_name"] = _attempt(lambda: client.infer(model, [wrong_name]))
        out["wrong_shape"] = _attempt(lambda: client.infer(model, [_image_input(images[:2], [1, 2])]))
        out["no_input"] = _attempt(lambda: client.infer(model, []))
        out["unimplemented"] = _attempt(lambda: client.get_system_shared_memory_status())
    return out


if __name__ == "__main__":
    json.dump(run(json.load(sys.stdin)), sys.stdout)

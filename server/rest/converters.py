"""HTTP bodies <-> the domain: Open Inference Protocol JSON (with Triton's binary tensor extension) and the
JSON answer of POST /v1/segment. The only module that knows both; no framework here, bytes and dicts only.

JSON tensors: `data` flat or nested row-major. BYTES elements in JSON are base64 strings going in; going
out, a BYTES tensor whose elements are all UTF-8 text (CLASSES) is sent as text, any other (PNGs) as base64
with the tensor parameter `content_type: base64`.
Binary extension: the header `Inference-Header-Content-Length: n`; the body's first n bytes are the JSON,
then each binary tensor's raw bytes in order, sized by its `parameters.binary_data_size`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from typing import Any

import numpy as np

from server.core.types import SegmentResult
from server.dataplane import IndexEntry, StatisticDuration, StatisticsReport
from server.errors import InvalidTensor
from server.inference import protocol as inference
from server.inference import tensors
from server.inference.protocol import InferRequest, InferResponse, ModelDescription, ParameterValue
from server.inference.tensors import Tensor
from server.rest import json_worker

HEADER_LENGTH = "inference-header-content-length"


class BadBody(InvalidTensor):
    """A body that is not the JSON (or binary layout) it claims to be."""


def parse_json(body: bytes | memoryview) -> Any:
    """The body's JSON; a big one parsed in the JSON worker's child process (numeric data then comes as
    arrays), so that the server's GIL is not held for the whole parse."""
    document = bytes(body)
    large = len(document) >= json_worker.MIN_BYTES
    parsed, problem = json_worker.WORKER.parse(document) if large else json_worker.load(document)
    if problem is not None:
        raise BadBody(problem)
    return parsed


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadBody(f"{what} must be a JSON object")
    return value


def _parameters(value: object, what: str) -> dict[str, ParameterValue]:
    parameters = _dict(value if value is not None else {}, f"{what} parameters")
    for key, item in parameters.items():
        if not isinstance(item, bool | int | float | str):
            raise BadBody(f"{what} parameter {key!r} must be a boolean, number or string")
    return parameters


def _flatten(name: str, data: object, depth: int) -> list[object] | np.ndarray:
    """Nested row-major lists to one flat list, no deeper than the tensor's rank (lists nest at most one level
    more than the rank); numeric data the JSON worker made one array of, to that array flat."""
    if isinstance(data, np.ndarray):
        if data.ndim > depth + 1:
            raise InvalidTensor(f"{name}: data is nested deeper than its shape")
        return data.ravel()
    if not isinstance(data, list):
        return [data]
    if depth < 0:
        raise InvalidTensor(f"{name}: data is nested deeper than its shape")
    flat: list[object] = []
    for item in data:
        if isinstance(item, list):
            flat.extend(_flatten(name, item, depth - 1))
        else:
            flat.append(item)
    return flat


def _base64(name: str, text: object, limit: int) -> bytes:
    if not isinstance(text, str):
        raise InvalidTensor(f"{name}: BYTES elements in JSON must be base64 strings")
    if len(text) > limit * 4 // 3 + 4:
        raise InvalidTensor(f"{name}: a base64 element is {len(text)} characters, over the {limit}-byte image limit")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidTensor(f"{name}: a BYTES element is not valid base64") from None


def _shape(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidTensor(f"{name}: shape must be a list of integers")
    return tensors.check_shape(name, value)  # rank, int64 range and signs, before the data is looked at


def request_from_http(
    model_name: str, model_version: str, body: bytes, header_length: int | None, max_element_bytes: int
) -> tuple[InferRequest, set[str]]:
    """The request, and the names of the outputs to send as binary."""
    view = memoryview(body)
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise BadBody(f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes")
        document, binary = view[:header_length], view[header_length:]
    else:
        document, binary = view, view[len(body) :]
    message = _dict(parse_json(document), "the request")
    parameters = _parameters(message.get("parameters"), "request")
    raw_inputs = message.get("inputs")
    if not isinstance(raw_inputs, list):
        raise BadBody("the request needs an inputs list")
    inputs = []
    offset = 0
    for item in raw_inputs:
        tensor = _dict(item, "an input")
        name = str(tensor.get("name", ""))
        datatype = str(tensor.get("datatype", ""))
        shape = _shape(name, tensor.get("shape"))
        tensors.check_datatype(name, datatype)
        input_parameters = _parameters(tensor.get("parameters"), name)
        size = input_parameters.get("binary_data_size")
        # Contents left undecoded (base64 included): the data plane checks the shape against the server's
        # limits before any element is built (protocol.images_of).
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise BadBody(f"{name}: binary_data_size {size!r} runs past the body's binary part")
            contents = tensors.Contents(raw=binary[offset : offset + size])
            offset += size
        else:
            values = _flatten(name, tensor.get("data"), len(shape))
            element = partial(_base64, name, limit=max_element_bytes) if datatype == tensors.BYTES else None
            contents = tensors.Contents(values=values, element=element)
        inputs.append(tensors.InputTensor(name, datatype, shape, contents))
    if offset != len(binary):
        raise BadBody(f"{len(binary) - offset} bytes after the binary tensors belong to no input")
    binary_outputs: set[str] = set()
    names = []
    all_binary = parameters.get("binary_data_output") is True
    for item in message.get("outputs") or []:
        output = _dict(item, "an output")
        name = str(output.get("name", ""))
        names.append(name)
        if all_binary or _parameters(output.get("parameters"), name).get("binary_data") is True:
            binary_outputs.add(name)
    if all_binary:
        binary_outputs.update(inference.OUTPUTS)
    request = InferRequest(model_name, model_version, str(message.get("id", "")), inputs, names, parameters)
    return request, binary_outputs


def _json_tensor(tensor: Tensor) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
    if isinstance(tensor.data, np.ndarray):
        entry["data"] = tensor.data.tolist()
        return entry
    try:
        entry["data"] = [element.decode("utf-8") for element in tensor.data]
    except UnicodeDecodeError:
        entry["data"] = [base64.b64encode(element).decode() for element in tensor.data]
        entry["parameters"] = {"content_type": "base64"}
    return entry


def response_to_http(response: InferResponse, binary_outputs: set[str]) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when binary tensors follow it (None: all JSON)."""
    outputs = []
    chunks = []
    for tensor in response.outputs:
        if tensor.name in binary_outputs:
            raw = tensors.to_raw(tensor.data)
            chunks.append(raw)
            outputs.append(
                {
                    "name": tensor.name,
                    "datatype": tensor.datatype,
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
        else:
            outputs.append(_json_tensor(tensor))
    header = json.dumps(
        {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "id": response.id,
            "outputs": outputs,
        },
        separators=(",", ":"),
    ).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _tensor_metadata(specs: Sequence[inference.TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def metadata_to_http(model: ModelDescription) -> dict[str, Any]:
    return {
        "name": model.name,
        "versions": [inference.MODEL_VERSION],
        "platform": inference.PLATFORM,
        "inputs": _tensor_metadata(inference.INPUT_SPECS),
        "outputs": _tensor_metadata(inference.OUTPUT_SPECS),
        "parameters": {"labels": inference.labels_list(model.labels), "extra_outputs": inference.extra_outputs_list()},
    }


def config_to_http(model: ModelDescription) -> dict[str, Any]:
    """Triton's model configuration in its JSON form (datatypes as TYPE_*; dims without the batch dimension)."""

    def config_type(datatype: str) -> str:
        return "TYPE_STRING" if datatype == tensors.BYTES else f"TYPE_{datatype}"

    return {
        "name": model.name,
        "platform": inference.PLATFORM,
        "backend": inference.PLATFORM,
        "max_batch_size": model.max_batch_size,
        "input": [
            {"name": s.name, "data_type": config_type(s.datatype), "dims": list(s.shape[1:]), "optional": s.optional}
            for s in inference.INPUT_SPECS
        ],
        "output": [
            {"name": s.name, "data_type": config_type(s.datatype), "dims": list(s.shape[1:]) or [1]}
            for s in inference.OUTPUT_SPECS
        ],
        "dynamic_batching": {
            "preferred_batch_size": [model.preferred_batch_size],
            "max_queue_delay_microseconds": model.max_queue_delay_us,
        },
        # Triton's ModelConfig.parameters are strings: the labels as the JSON text of the metadata's list.
        "parameters": {
            "labels": {"string_value": inference.labels_json(model.labels)},
            "extra_outputs": {"string_value": inference.extra_outputs_json()},
        },
    }


def segment_result_to_json(result: SegmentResult) -> dict[str, Any]:
    """POST /v1/segment's JSON answer: the fields of the gRPC SegmentResponse, PNGs in base64."""
    return {
        "width": result.width,
        "height": result.height,
        "model_width": result.model_width,
        "model_height": result.model_height,
        "classes": [{"index": c.index, "name": c.name, "fraction": c.fraction} for c in result.classes],
        "timing": asdict(result.timing),
        "model": result.model,
        "mask_png": base64.b64encode(result.mask_png).decode(),
        "overlay_png": base64.b64encode(result.overlay_png).decode() if result.overlay_png else None,
    }


def index_to_http(entries: list[IndexEntry]) -> list[dict[str, str]]:
    """The repository index as Triton's REST extension answers it (no reason when there is none)."""
    index = []
    for entry in entries:
        item = {"name": entry.name, "version": entry.version, "state": entry.state}
        if entry.reason:
            item["reason"] = entry.reason
        index.append(item)
    return index


def statistics_to_json(report: StatisticsReport) -> dict[str, Any]:
    """Triton's statistics extension's JSON for one model."""

    def duration(d: StatisticDuration) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    return {
        "name": report.name,
        "version": report.version,
        "last_inference": report.last_inference_ms,
        "inference_count": report.inference_count,
        "execution_count": report.execution_count,
        "inference_stats": {stage: duration(getattr(report, stage)) for stage in report.STAGES},
        "batch_stats": [{"batch_size": size, "compute_infer": duration(d)} for size, d in report.batches],
    }

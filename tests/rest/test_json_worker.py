"""The JSON worker (server/rest/json_worker.py) never changes an answer: every body read through its child
process decodes to the same tensors, or is refused with the same reason, as when the server parses it itself;
and a child that dies costs one body an in-process parse, not a failed request."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest

from server.errors import InvalidTensor
from server.inference import tensors
from server.rest import converters, json_worker

PIXELS = np.arange(12).reshape(1, 2, 2, 3).tolist()
BODIES: dict[str, tuple[str, list[int], Any]] = {
    "nested uint8": ("UINT8", [1, 2, 2, 3], PIXELS),
    "flat uint8": ("UINT8", [1, 2, 2, 3], list(range(12))),
    "floats and ints": ("FP32", [2, 2], [[1, 2.5], [3, -4.25]]),
    "booleans": ("BOOL", [3], [True, False, True]),
    "booleans among ints": ("UINT8", [2], [True, 2]),
    "int64 extremes": ("INT64", [2], [2**62, -(2**63)]),
    "out of uint8": ("UINT8", [2], [300, 1]),
    "beyond int64": ("INT64", [1], [2**70]),
    "ragged": ("UINT8", [3], [[1], [2, 3]]),
    "nested deeper than the shape": ("UINT8", [1], [[[1]]]),
    "count off": ("UINT8", [4], [[1, 2], [3, 4], [5, 6]]),
    "fp16 overflow": ("FP16", [1], [1e300]),
    "base64 bytes": ("BYTES", [1], ["aGVsbG8="]),
    "a number as bytes": ("BYTES", [1], [5]),
    "strings as numbers": ("FP32", [2], ["1", "2"]),
    "null inside": ("FP32", [2], [1.0, None]),
    "empty": ("UINT8", [0], []),
    "a scalar": ("UINT8", [1], 7),
}
NOT_JSON = [b'{"inputs": [', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{}", b'{"inputs": NaN}', b""]


def body(datatype: str, shape: list[int], data: Any, padding: int = 0) -> bytes:
    message = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}], "id": " " * padding}
    return json.dumps(message).encode()


def decoded(document: bytes) -> tuple[str, Any]:
    """What the door makes of a body: the input's tensor data as (dtype, values), or the refusal's text."""
    try:
        request, _ = converters.request_from_http("m", "", document, None, 1 << 20)
        data = tensors.decode(request.inputs[0])
    except InvalidTensor as exc:  # converters.BadBody is one
        return "refused", str(exc)
    if isinstance(data, np.ndarray):
        return str(data.dtype), data.tolist()
    return "elements", list(data)


@pytest.mark.parametrize("case", sorted(BODIES))
def test_a_body_through_the_worker_decodes_as_it_does_in_the_server(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    document = body(*BODIES[case])
    monkeypatch.setattr(json_worker, "MIN_BYTES", 1 << 62)
    in_server = decoded(document)
    monkeypatch.setattr(json_worker, "MIN_BYTES", 0)
    calls = []
    real = json_worker.WORKER.parse
    monkeypatch.setattr(json_worker.WORKER, "parse", lambda doc: calls.append(doc) or real(doc))
    assert decoded(document) == in_server
    assert calls == [document], "the body did not go to the worker"


@pytest.mark.parametrize("document", NOT_JSON, ids=["cut short", "deep", "not utf-8", "bare NaN", "empty"])
def test_a_body_that_is_not_json_gets_the_same_reason_from_the_worker(document: bytes) -> None:
    assert repr(json_worker.WORKER.parse(document)) == repr(json_worker.load(document))  # NaN != NaN


def test_numeric_data_comes_back_as_one_array_and_the_rest_as_it_was() -> None:
    document = json.dumps(
        {"inputs": [{"data": PIXELS}, {"data": ["aGk="]}, {"data": [[1], [2, 3]]}], "parameters": {"k": 1}}
    ).encode()
    parsed, problem = json_worker.WORKER.parse(document)
    assert problem is None and parsed["parameters"] == {"k": 1}
    first, strings, ragged = (tensor["data"] for tensor in parsed["inputs"])
    assert isinstance(first, np.ndarray) and first.tolist() == PIXELS
    assert type(strings) is list and strings == ["aGk="], "strings are left as JSON gave them"
    assert type(ragged) is list and ragged == [[1], [2, 3]]


def test_a_worker_that_dies_costs_one_body_an_in_process_parse(caplog: pytest.LogCaptureFixture) -> None:
    worker = json_worker.JsonWorker()
    document = body("UINT8", [1, 2, 2, 3], PIXELS)
    try:
        worker.parse(document)
        first = worker._child
        assert first is not None
        first.kill()
        first.wait()
        first.poll = lambda: None  # type: ignore[method-assign]  # as if it died during the next body
        with caplog.at_level(logging.WARNING, logger="server.rest.json_worker"):
            parsed, problem = worker.parse(document)
        assert problem is None and parsed == json.loads(document), "answered in the server, as lists"
        assert "the JSON worker failed" in caplog.text
        again, _ = worker.parse(document)
        assert worker._child is not None and worker._child.pid != first.pid, "the next body starts a new child"
        assert isinstance(again["inputs"][0]["data"], np.ndarray)
    finally:
        worker.close()
    assert worker._child is None

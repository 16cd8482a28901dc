"""Open Inference Protocol tensors, transport-free: the datatypes, their raw byte layout, element checks.

Both front doors of the protocol (gRPC raw_input_contents, HTTP's binary tensor extension) carry
tensors in the same raw layout: little-endian values, row-major; a BYTES element as a 4-byte
little-endian length and then its bytes. JSON and typed protobuf contents arrive as lists.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.errors import InvalidTensor

BYTES = "BYTES"
NUMPY_TYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY_TYPES, BYTES)
_LENGTH = struct.Struct("<I")

TensorData = list[bytes] | np.ndarray
"""BYTES: one bytes object per element; any other datatype: a flat numpy array of its dtype."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: TensorData


@dataclass(frozen=True)
class Contents:
    """An input tensor's elements as its request carried them, not yet decoded: `raw` bytes (gRPC's
    raw_input_contents, HTTP's binary extension), or else a list of `values` (typed protobuf contents, JSON
    data already flattened), each passed through `element` first when the door has its own element encoding
    (JSON's base64 BYTES). Undecoded, so that a request's batch size and shape are checked against the
    server's limits (protocol.images_of) before one element object, numpy array or image is built: a shape
    costs nothing to send, its elements cost what the server builds for them."""

    raw: bytes | memoryview | None = None
    values: Sequence[object] | np.ndarray = ()
    element: Callable[[object], object] | None = None


@dataclass(frozen=True)
class InputTensor:
    """An input of a request as a door parsed it: name, datatype and shape checked (check_datatype,
    check_shape), its contents decoded only by decode()."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    contents: Contents


MAX_RANK = 8
MAX_DIMENSION = 2**63 - 1
"""The protocol's shapes are int64 (gRPC's shape field, Triton's); JSON can say more, and numpy takes no more."""


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as a tuple of Python ints, refused (InvalidTensor) when it has more than MAX_RANK
    dimensions (checked before the dimensions are copied), one outside int64 or a negative one. Every
    count made from it is Python int arithmetic, which cannot overflow."""
    if len(shape) > MAX_RANK:
        raise InvalidTensor(f"{name}: shape has {len(shape)} dimensions; at most {MAX_RANK}")
    dims = tuple(int(dim) for dim in shape)
    if any(not -MAX_DIMENSION - 1 <= dim <= MAX_DIMENSION for dim in dims):  # before quoting: JSON has no bound
        raise InvalidTensor(f"{name}: a dimension of its shape is outside int64, the protocol's shape type")
    if any(dim < 0 for dim in dims):
        raise InvalidTensor(f"{name}: shape {list(dims)} has a negative dimension")
    return dims


def element_count(name: str, shape: Sequence[int]) -> int:
    """The shape's element count (check_shape's refusals first)."""
    return math.prod(check_shape(name, shape))


def check_datatype(name: str, datatype: str) -> None:
    if datatype not in DATATYPES:
        raise InvalidTensor(f"{name}: unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}")


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> TensorData:
    """Raw bytes to tensor data, refusing a length that does not match the shape."""
    check_datatype(name, datatype)
    count = element_count(name, shape)
    if datatype == BYTES:
        return split_bytes_elements(name, raw, count)
    dtype = NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidTensor(
            f"{name}: {len(raw)} raw bytes do not match shape {list(shape)} of {datatype} "
            f"({count * dtype.itemsize} bytes expected)"
        )
    return np.frombuffer(raw, dtype=dtype)


def split_bytes_elements(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """BYTES elements from their length-prefixed layout: exactly `count`, each length inside the buffer."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(elements) == count:
            raise InvalidTensor(f"{name}: raw BYTES hold more than the {count} elements of its shape")
        if offset + _LENGTH.size > len(view):
            raise InvalidTensor(f"{name}: raw BYTES end inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise InvalidTensor(f"{name}: a BYTES element declares {length} bytes but only {len(view) - offset} remain")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if len(elements) != count:
        raise InvalidTensor(f"{name}: raw BYTES hold {len(elements)} elements; its shape needs {count}")
    return elements


def from_list(name: str, datatype: str, shape: Sequence[int], values: Sequence[object] | np.ndarray) -> TensorData:
    """Typed contents (protobuf lists, JSON arrays already flattened) to tensor data."""
    check_datatype(name, datatype)
    count = element_count(name, shape)
    if len(values) != count:
        raise InvalidTensor(f"{name}: {len(values)} values do not match shape {list(shape)} ({count} expected)")
    if datatype == BYTES:
        if not all(isinstance(v, bytes) for v in values):
            raise InvalidTensor(f"{name}: BYTES elements must be strings")
        return [v for v in values if isinstance(v, bytes)]
    dtype = NUMPY_TYPES[datatype]
    try:
        array = np.asarray(values)
        if array.dtype.kind not in "biuf" or array.ndim != 1:
            raise ValueError("not numbers")
        if dtype.kind in "iu" and array.size:
            info = np.iinfo(dtype.type)  # type: ignore[type-var]  # an integer dtype, checked above
            if array.dtype.kind == "f" or array.min() < info.min or array.max() > info.max:
                raise ValueError(f"values outside {datatype}")
        with np.errstate(over="raise", invalid="raise"):  # 1e300 as FP16: refused, not a warning and an inf
            return array.astype(dtype)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as exc:
        raise InvalidTensor(f"{name}: values are not {datatype}: {exc}") from None


def decode(tensor: InputTensor) -> TensorData:
    """An input's elements, decoded: their number checked against its shape (raw bytes: their length, with
    Python ints) before any numpy array or element object is built. Called once the shape has passed the
    server's limits."""
    name, datatype, shape, contents = tensor.name, tensor.datatype, tensor.shape, tensor.contents
    if contents.raw is not None:
        return from_raw(name, datatype, shape, contents.raw)
    check_datatype(name, datatype)
    count = element_count(name, shape)
    values = contents.values
    if len(values) != count:
        raise InvalidTensor(f"{name}: {len(values)} values do not match shape {list(shape)} ({count} expected)")
    transform = contents.element
    if transform is not None:
        values = [transform(v) for v in values]
    elif not isinstance(values, np.ndarray):  # an array (the HTTP door's JSON worker made it) stays one
        values = list(values)
    return from_list(name, datatype, shape, values)


def to_raw(data: TensorData) -> bytes:
    """Tensor data to the raw layout."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).tobytes()
    return b"".join(_LENGTH.pack(len(element)) + element for element in data)

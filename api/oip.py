"""Open Inference Protocol (v2) tensors on the wire: infer requests in, infer responses out.

A request is JSON, or — the binary tensor data extension, what ``tritonclient.http`` sends by
default — a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw data of the
inputs whose ``parameters.binary_data_size`` says how many bytes they take, in input order. Raw
numbers are little-endian; a BYTES element is a 4-byte little-endian length and that many bytes. A
response carries an output as raw data the same way when the request's ``binary_data_output``
parameter or the output's ``binary_data`` parameter is true, else as a JSON ``data`` list.

Everything that does not fit raises :class:`~api.images.InputError` (400/413/422) with a message
that says what to send instead; the routes (:mod:`api.v2`) answer it as ``{"error": "..."}``.

Example:
    >>> request, raw = parse_request(body, headers.get("inference-header-content-length"))
    >>> body, headers = encode_response({"model_name": "oal", ...}, outputs, binary={"score": True})
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.images import InputError

HEADER_LENGTH = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"
NUMERIC: dict[str, str] = {  # OIP datatype -> little-endian numpy dtype
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
DATATYPES = (*NUMERIC, "BYTES")


class RequestInput(BaseModel):
    """One input tensor of an infer request (``data`` is absent when it travels as binary)."""

    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int] = Field(..., description="concrete sizes, >= 0")
    datatype: str = Field(..., description=f"one of {', '.join(DATATYPES)}")
    parameters: dict[str, Any] = {}
    data: Any = Field(None, description="row-major values (flat or nested lists)")


class RequestOutput(BaseModel):
    """An output the client asks for; ``parameters.binary_data`` asks for it as raw data."""

    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Any] = {}


class InferenceRequest(BaseModel):
    """``POST /v2/models/{name}/infer``: inputs, and optionally which outputs (default: all)."""

    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[RequestInput] = Field(..., min_length=1)
    outputs: list[RequestOutput] | None = None


class Output(NamedTuple):
    """One response tensor: ``values`` is a numpy array, or a list of ``bytes`` for BYTES."""

    name: str
    datatype: str
    values: np.ndarray | list[bytes]


# ---------------------------------------------------------------- requests


def _header_length(value: str | None, body_size: int) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) > body_size:
        raise InputError(
            400,
            f"Inference-Header-Content-Length is {value!r} for a body of {body_size} bytes; it must be the "
            "byte length of the JSON header at the start of the body",
        )
    return int(value)


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InputError(
            400,
            'the inference request is not valid JSON; send an infer request object ({"inputs": [...]}), '
            "with binary tensor data after it only when Inference-Header-Content-Length says where it ends",
        ) from None


def _binary_size(tensor: RequestInput) -> int | None:
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InputError(
            400, f"input {tensor.name!r}: binary_data_size must be a byte count >= 0, got {size!r}"
        )
    if tensor.data is not None:
        raise InputError(
            400, f"input {tensor.name!r} has both 'data' and binary_data_size; send its values one way"
        )
    return size


def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, dict[str, bytes]]:
    """The request and the raw bytes of each input sent as binary data (by input name).

    Args:
        body: The whole (decompressed) body.
        header_length: The ``Inference-Header-Content-Length`` header, if sent.

    Raises:
        InputError: 400 for malformed JSON or binary sections, 422 for JSON that is not an infer request.
    """
    split = _header_length(header_length, len(body))
    head, rest = (body, b"") if split is None else (body[:split], body[split:])
    try:
        request = InferenceRequest.model_validate(_json(head))
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:3])
        raise InputError(
            422,
            f'the body is not an inference request ({where}); send {{"inputs": [{{"name", '
            '"shape", "datatype", "data"}]}',
        ) from None
    names = [t.name for t in request.inputs]
    if len(set(names)) != len(names):
        raise InputError(400, f"input names repeat ({', '.join(names)}); send each input once")
    raw, offset = {}, 0
    for tensor in request.inputs:
        if any(d < 0 for d in tensor.shape):
            raise InputError(400, f"input {tensor.name!r} has shape {tensor.shape}; sizes must be >= 0")
        size = _binary_size(tensor)
        if size is None:
            continue
        if offset + size > len(rest):
            raise InputError(
                400,
                f"input {tensor.name!r}: binary_data_size says {size} bytes but only {len(rest) - offset} "
                "follow the JSON header; send every input's binary data after the header, in input order",
            )
        raw[tensor.name] = rest[offset : offset + size]
        offset += size
    if offset != len(rest):
        raise InputError(
            400,
            f"{len(rest) - offset} bytes of binary data after the JSON header are not claimed by any input's "
            "binary_data_size; check Inference-Header-Content-Length and the sizes",
        )
    return request, raw


def element_count(tensor: RequestInput) -> int:
    """The number of elements the input's shape holds."""
    return math.prod(tensor.shape)


def _flat(data: Any) -> list[Any]:
    """Row-major elements of a (possibly nested) JSON list, without recursion (nesting can be deep)."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


_END = object()


def bytes_elements(tensor: RequestInput, raw: bytes | None) -> list[Any]:
    """The elements of a BYTES input: ``bytes`` from binary data, JSON values (strings, objects) otherwise.

    Raises:
        InputError: 400 when the elements do not match the shape or the length prefixes are broken.
    """
    count = element_count(tensor)
    if raw is not None:
        elements, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise InputError(400, f"input {tensor.name!r}: BYTES data ends inside a 4-byte length prefix")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise InputError(
                    400,
                    f"input {tensor.name!r}: BYTES element {len(elements)} claims {length} bytes but only "
                    f"{len(raw) - offset} follow; each element is a 4-byte little-endian length and its bytes",
                )
            elements.append(raw[offset : offset + length])
            offset += length
    elif tensor.data is None:
        raise InputError(400, f"input {tensor.name!r} has no data; send 'data' or binary data")
    else:
        elements = _flat(tensor.data)
    if len(elements) != count:
        raise InputError(
            400, f"input {tensor.name!r} has {len(elements)} elements for shape {tensor.shape} ({count})"
        )
    return elements


def numeric_array(tensor: RequestInput, raw: bytes | None) -> np.ndarray:
    """A numeric input as a numpy array of its datatype and shape.

    Raises:
        InputError: 400 for a size that does not match the shape or values that are not numbers.
    """
    dtype = np.dtype(NUMERIC[tensor.datatype])
    count = element_count(tensor)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InputError(
                400,
                f"input {tensor.name!r}: {len(raw)} bytes of binary data for shape {tensor.shape} of "
                f"{tensor.datatype} ({count * dtype.itemsize} bytes expected)",
            )
        return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)
    if tensor.data is None:
        raise InputError(400, f"input {tensor.name!r} has no data; send 'data' or binary data")
    values = _flat(tensor.data)
    if len(values) != count:
        raise InputError(
            400, f"input {tensor.name!r} has {len(values)} values for shape {tensor.shape} ({count})"
        )
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        array = np.asarray([], dtype=object)
    if array.dtype.kind not in "iuf" and len(values):
        raise InputError(
            400, f"input {tensor.name!r}: every value of a {tensor.datatype} tensor must be a number"
        )
    array = array.astype(np.float64)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if len(array) and (
            array.min() < info.min or array.max() > info.max or np.any(array != np.round(array))
        ):
            raise InputError(
                400,
                f"input {tensor.name!r}: {tensor.datatype} values must be integers in {info.min}..{info.max}",
            )
    return array.astype(dtype).reshape(tensor.shape)


def flag(parameters: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean parameter (``binary_data``, ``binary_data_output``); 400 if it is not a boolean."""
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InputError(400, f"{where}: parameter {key!r} must be true or false, got {value!r}")
    return value


# ---------------------------------------------------------------- responses


def _serialize_bytes(values: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _raw(output: Output) -> bytes:
    if output.datatype == "BYTES":
        return _serialize_bytes(list(output.values))
    return np.ascontiguousarray(output.values, dtype=np.dtype(NUMERIC[output.datatype])).tobytes()


def _json_data(output: Output) -> list[Any]:
    if output.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") for v in output.values]
    return np.asarray(output.values).tolist()


def encode_response(
    head: dict[str, Any], outputs: list[Output], binary: dict[str, bool]
) -> tuple[bytes, dict[str, str]]:
    """The body and extra headers of an infer response.

    Args:
        head: ``model_name``, ``model_version``, optionally ``id`` and ``parameters``.
        outputs: The tensors, in the order they are answered.
        binary: Output name -> send it as binary data.

    Returns:
        ``(body, headers)``: JSON alone (``application/json``), or the JSON header followed by the binary
        data with ``Inference-Header-Content-Length`` and ``application/octet-stream``.
    """
    tensors, blobs = [], []
    for output in outputs:
        tensor: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": [len(output.values)],
        }
        if binary.get(output.name):
            blob = _raw(output)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = _json_data(output)
        tensors.append(tensor)
    header = orjson.dumps({**head, "outputs": tensors})
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": BINARY_CONTENT_TYPE,
        "inference-header-content-length": str(len(header)),
    }

"""Read the input/output table of an ``.onnx`` file without the ``onnx`` package or the weights.

The runtime checks that each graph file of an engine has the inputs and outputs its manifest
promises before it builds sessions. ``onnx`` is an export-time dependency only, and an
``InferenceSession`` would load (and for the UNet, allocate) every weight just to list names, so
this module decodes the few protobuf fields it needs straight from the wire format
(https://protobuf.dev/programming-guides/encoding/): ModelProto.graph (7) → GraphProto.input (11),
output (12), initializer (5) → ValueInfoProto name (1), type (2) → TypeProto.tensor_type (1) →
elem_type (1), shape (2) → TensorShapeProto.dim (1) → dim_value (1) | dim_param (2); and
ModelProto.opset_import (8). Weights stored as external data are never read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# TensorProto.DataType → numpy dtype name
ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
              10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}


class OnnxFormatError(ValueError):
    """The bytes are not a readable ONNX ModelProto."""


@dataclass(frozen=True)
class OnnxTensor:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]  # int: fixed, str: symbolic, None: unnamed unknown


@dataclass(frozen=True)
class OnnxSignature:
    inputs: tuple[OnnxTensor, ...]
    outputs: tuple[OnnxTensor, ...]
    opsets: dict[str, int]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise OnnxFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise OnnxFormatError("varint too long")


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise OnnxFormatError("truncated field")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise OnnxFormatError(f"unsupported wire type {wire}")
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _value_info(buf: bytes) -> OnnxTensor:
    name, dtype, shape = "", "unknown", []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 2:
            name = value.decode("utf-8")
        elif number == 2 and wire == 2:  # TypeProto
            for n2, w2, v2 in _fields(value):
                if n2 != 1 or w2 != 2:  # tensor_type only
                    continue
                for n3, w3, v3 in _fields(v2):
                    if n3 == 1 and w3 == 0:
                        dtype = ELEM_TYPES.get(v3, f"onnx-type-{v3}")
                    elif n3 == 2 and w3 == 2:  # TensorShapeProto
                        for n4, w4, v4 in _fields(v3):
                            if n4 != 1 or w4 != 2:
                                continue
                            dim: int | str | None = None
                            for n5, w5, v5 in _fields(v4):
                                if n5 == 1 and w5 == 0:
                                    dim = _signed(v5)
                                elif n5 == 2 and w5 == 2:
                                    dim = v5.decode("utf-8")
                            shape.append(dim)
    return OnnxTensor(name, dtype, tuple(shape))


def _tensor_name(buf: bytes) -> str:
    for number, wire, value in _fields(buf):
        if number == 8 and wire == 2:
            return value.decode("utf-8")
    return ""


def read_signature(path: Path | str) -> OnnxSignature:
    """The graph inputs (initializers excluded), outputs and opsets of an ONNX file."""
    data = Path(path).read_bytes()
    graph, opsets = None, {}
    for number, wire, value in _fields(data):
        if number == 7 and wire == 2:
            graph = value
        elif number == 8 and wire == 2:
            domain, version = "", 0
            for n2, w2, v2 in _fields(value):
                if n2 == 1 and w2 == 2:
                    domain = v2.decode("utf-8")
                elif n2 == 2 and w2 == 0:
                    version = v2
            opsets[domain or "ai.onnx"] = version
    if graph is None:
        raise OnnxFormatError("no graph in the file")
    inputs, outputs, initializers = [], [], set()
    for number, wire, value in _fields(graph):
        if wire != 2:
            continue
        if number == 11:
            inputs.append(_value_info(value))
        elif number == 12:
            outputs.append(_value_info(value))
        elif number == 5:
            initializers.add(_tensor_name(value))
    return OnnxSignature(tuple(t for t in inputs if t.name not in initializers), tuple(outputs), opsets)

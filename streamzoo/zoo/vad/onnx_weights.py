"""Read the float32 initializers of an ONNX file with numpy alone (no `onnx`, no protobuf).

An ONNX file is a protobuf `ModelProto`. Its weights are `graph.initializer` entries
(`TensorProto`: name, dims, data type and little-endian `raw_data` or packed `float_data`).
This reader walks the protobuf wire format for just those fields, so loading pretrained
weights needs neither the `onnx` package nor onnxruntime at run time. Field numbers are from
`onnx.proto` (ModelProto.graph = 7, GraphProto.initializer = 5; TensorProto dims = 1,
data_type = 2, float_data = 4, name = 8, raw_data = 9, data_location = 14).
"""

from __future__ import annotations

import numpy as np

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_FLOAT = 1  # TensorProto.DataType.FLOAT
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("path: truncated protobuf (a varint runs past the end of the file)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview):
    """Yield `(field_number, wire_type, value)`; value is an int or a memoryview slice."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _FIXED64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == _FIXED32:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"path: unsupported protobuf wire type {wire} (not an ONNX file?)")
        if pos > len(buf):
            raise ValueError("path: truncated protobuf (a field runs past the end of the file)")
        yield field, wire, value


def _tensor(buf: memoryview) -> tuple[str, np.ndarray]:
    name, dims, dtype, raw, floats = "", [], None, None, []
    for field, wire, value in _fields(buf):
        if field == 1:  # dims: int64, one varint each or packed
            if wire == _LEN:
                pos = 0
                while pos < len(value):
                    d, pos = _varint(value, pos)
                    dims.append(d)
            else:
                dims.append(value)
        elif field == 2:
            dtype = value
        elif field == 4:  # float_data: packed or one fixed32 each
            floats.append(np.frombuffer(value, "<f4"))
        elif field == 8:
            name = bytes(value).decode()
        elif field == 9:
            raw = bytes(value)
        elif field == 14 and value == _EXTERNAL:
            raise ValueError(f"path: initializer {name!r} keeps its data in an external file; "
                             "expected weights stored inside the .onnx file")
    if dtype != _FLOAT:
        raise ValueError(f"path: initializer {name!r}: expected float32 (data_type 1), got "
                         f"data_type {dtype}")
    data = np.frombuffer(raw, "<f4") if raw is not None else (
        np.concatenate(floats) if floats else np.zeros(0, np.float32))
    if data.size != int(np.prod(dims)):
        raise ValueError(f"path: initializer {name!r}: {data.size} values for dims {dims}")
    return name, data.reshape(dims).astype(np.float32)


def read_onnx_initializers(path: str) -> dict[str, np.ndarray]:
    """`{name: float32 array}` of the top-level graph initializers of the ONNX file `path`."""
    with open(path, "rb") as f:
        buf = memoryview(f.read())
    graphs = [v for field, wire, v in _fields(buf) if field == 7 and wire == _LEN]
    if not graphs:
        raise ValueError(f"path: expected an ONNX model with a graph, got none in {path}")
    out = {}
    for field, wire, value in _fields(graphs[-1]):
        if field == 5 and wire == _LEN:
            name, array = _tensor(value)
            out[name] = array
    return out

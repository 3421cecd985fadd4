"""A minimal, validating safetensors reader/writer for neuropil's own files.

The format: an 8-byte little-endian header length, a JSON header (tensor name ->
dtype, shape, data_offsets; ``__metadata__`` -> str -> str), then the raw
little-endian data. Files written here load with the ``safetensors`` package
too; reading validates every offset and shape and raises ``FormatError``.
Writes go to a temporary file renamed over the target, so a failed save
never destroys an old file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from .errors import FormatError

_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20


def save(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Writes ``tensors`` and string ``metadata`` to ``path`` atomically."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    blobs = []
    offset = 0
    for name, arr in tensors.items():
        a = np.ascontiguousarray(arr)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        dt = _NAMES[a.dtype]
        raw = a.tobytes()
        header[name] = {
            "dtype": dt,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for raw in blobs:
                f.write(raw)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a file written by :func:`save`; raises ``FormatError`` if malformed."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FormatError(f"{p}: cannot read ({e})") from e
    if len(data) < 8:
        raise FormatError(f"{p}: truncated (no header length)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise FormatError(f"{p}: header length {n} exceeds the file size {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise FormatError(f"{p}: header must be a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FormatError(f"{p}: __metadata__ must map strings to strings")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        try:
            dt = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{p}: tensor {name!r} has a malformed entry ({e})") from e
        if any(s < 0 for s in shape) or not 0 <= start <= end <= len(body):
            raise FormatError(f"{p}: tensor {name!r} lies outside the file (truncated?)")
        if end - start != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
            raise FormatError(f"{p}: tensor {name!r} has {end - start} bytes for shape {shape}")
        out[name] = np.frombuffer(body[start:end], dtype=dt).reshape(shape).copy()
    return out, meta

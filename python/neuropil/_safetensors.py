"""The one safetensors reader and writer of neuropil's Python side (numpy only,
strict), used by every ``save``/``load`` and by ``neuropil quantize``.

The file layout is the standard one (readable by the ``safetensors`` package):
an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets"}`` plus an optional ``"__metadata__"`` of
string values, then the raw little-endian tensor bytes. Every field is checked
on load; anything malformed, truncated or inconsistent raises
:class:`~neuropil.errors.FormatError`. Saving writes a temporary file beside the
target and renames it, so a failed save never destroys an existing file; the new
file gets the mode of the file it replaces, else the mode ``open()`` would give
(``0o666`` less the umask). As ``open()``, saving follows a symbolic link and
writes a pipe or device (``/dev/null``) in place (see :func:`replacing`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NoReturn

import numpy as np

from .errors import DTypeError, FormatError

_DTYPES: dict[str, np.dtype] = {
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # the raw bits; see read(bf16_as_f32=...)
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BOOL": np.dtype("?"),
}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items() if k not in ("BF16",)}

MAX_HEADER = 100 << 20


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux's
    /proc); elsewhere set and restored at once (process-global for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(path: Path) -> int:
    """The permission bits the saved file takes: those of the file it replaces,
    else those a plain ``open(path, "w")`` would create."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[tuple[int, str]]:
    """The temporary file a save writes, renamed over ``path`` when the block ends.

    Yields ``(fd, tmp)`` of a fresh ``mkstemp`` file beside ``path`` (the block
    closes ``fd``); on success the file takes :func:`new_file_mode` and replaces
    ``path``. On any error it is removed, and an ``OSError`` (from ``mkstemp``,
    writing or the rename, which name the hidden temporary file or nothing) is
    raised again as the same subclass with its errno and strerror and ``path``
    as ``filename``, as ``open(path, "wb")`` would, the original as its cause.

    As ``open(path, "wb")`` does, a symbolic link is followed (the file it
    points to is replaced, the link stays), and an existing target that is not
    a regular file or a folder (``/dev/null``, a named pipe) is written in
    place: ``(fd, tmp)`` are then its own descriptor and name. Renaming a file
    over it would replace the device or pipe itself (as root, ``/dev/null``
    would become a plain file); a write cut short there stays partial.
    """
    if special_file(path):
        # (opened through its links: /dev/stdout's resolve only in the kernel,
        # as /proc/self/fd/1 -> "pipe:[N]")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as e:
            _reraise(e, path)
        try:
            yield fd, str(path)
        except OSError as e:
            _reraise(e, path)
        return
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        _reraise(e, path)
    try:
        yield fd, tmp
        os.chmod(tmp, new_file_mode(target))  # mkstemp made it 0600
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        _reraise(e, path)


def _reraise(e: OSError, path: Path) -> NoReturn:
    """Raises ``e`` again as the same ``OSError`` subclass naming ``path`` (``e``
    itself when it carries no errno)."""
    if e.errno is None:
        raise e
    raise type(e)(e.errno, e.strerror, str(path)) from e


def special_file(path: Path) -> bool:
    """Whether ``path`` exists (through links) and is neither a regular file nor a folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class BF16:
    """bfloat16 values held as their bit patterns (numpy has no bfloat16 dtype):
    :func:`write` stores them as the safetensors dtype ``BF16``, 2 bytes each.

    Attributes:
        bits: ``uint16`` array of any shape, the values' upper 16 float32 bits.
    """

    __slots__ = ("bits",)

    def __init__(self, bits: np.ndarray) -> None:
        bits = np.asarray(bits)
        if bits.dtype.kind != "u" or bits.dtype.itemsize != 2:
            raise DTypeError(f"bits must be a uint16 array; got dtype {bits.dtype}")
        self.bits = bits

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.bits.shape)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)

    def to_f32(self) -> np.ndarray:
        """The values as float32 (exact)."""
        return bf16_to_f32(self.bits)


def write(
    path: str | Path, tensors: Mapping[str, np.ndarray | BF16], metadata: dict[str, str]
) -> None:
    """Writes ``tensors`` (numpy arrays of any shape, or :class:`BF16` bits) and
    string ``metadata`` atomically."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        a = np.asarray(arr.bits if isinstance(arr, BF16) else arr)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")  # np.ascontiguousarray would make a 0-d array 1-d
        key = "BF16" if isinstance(arr, BF16) else _NAMES.get(a.dtype.newbyteorder("<").str)
        if key is None:
            raise FormatError(f"tensor {name!r}: dtype {a.dtype} cannot be saved to safetensors")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": key,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with replacing(path) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays:
            f.write(a.data)  # C-contiguous: its own bytes, no copy (tobytes would make one)


def _capped_prod(values: list[int], cap: int) -> int:
    """``math.prod(values)`` for non-negative ints, or ``cap + 1`` once it exceeds
    ``cap`` (a hostile header's huge extents never build a huge int)."""
    if 0 in values:
        return 0
    n = 1
    for v in values:
        n *= v
        if n > cap:
            return cap + 1
    return n


def _fail(path: Path, detail: str) -> FormatError:
    return FormatError(f"{path}: not a valid safetensors file: {detail}")


def read(
    path: str | Path, *, bf16_as_f32: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Reads a safetensors file.

    Args:
        path: the file.
        bf16_as_f32: decode BF16 tensors to ``float32`` (exact); else they come
            back as their ``uint16`` bits (for callers that count the file's
            bytes or decode themselves, e.g. ``neuropil quantize``).

    Returns:
        ``(tensors, metadata, dtypes)``: arrays by name, the ``__metadata__``
        strings, and each tensor's safetensors dtype name (``"BF16"`` either way).

    Raises:
        OSError: the file cannot be read (``FileNotFoundError``,
            ``IsADirectoryError``, ``PermissionError``), as from ``open``.
        FormatError: the file is truncated, its header is not valid JSON of the
            expected structure, or a tensor's offsets disagree with its shape.
    """
    path = Path(path)
    blob = path.read_bytes()  # OSError (FileNotFoundError...) as from open()
    if len(blob) < 8:
        raise _fail(path, f"{len(blob)} bytes is shorter than the 8-byte header length")
    n = int.from_bytes(blob[:8], "little")
    if n > min(MAX_HEADER, len(blob) - 8):
        raise _fail(path, f"header length {n} exceeds the file ({len(blob)} bytes)")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, too deep, huge numbers
        raise _fail(path, f"header is not JSON ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    data = memoryview(blob)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _fail(path, f"entry {name!r} is not an object")
        dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dt not in _DTYPES:
            raise _fail(path, f"tensor {name!r} has unknown dtype {dt!r}")
        if not (
            isinstance(shape, list)
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise _fail(path, f"tensor {name!r} has invalid shape {shape!r}")
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            and 0 <= offs[0] <= offs[1] <= len(data)
        ):
            raise _fail(path, f"tensor {name!r} has data_offsets {offs!r} outside the data")
        dtype = _DTYPES[dt]
        # Python ints (no wrap-around), compared with the data before numpy sees them.
        need = _capped_prod([*shape, dtype.itemsize], len(data))
        if offs[1] - offs[0] != need:
            needs = f"{need} bytes" if need <= len(data) else f"more than {len(data)} bytes"
            raise _fail(
                path,
                f"tensor {name!r}: shape {shape} of {dt} needs {needs}; "
                f"data_offsets span {offs[1] - offs[0]}",
            )
        extents = [s for s in shape if s] + [dtype.itemsize]
        if _capped_prod(extents, sys.maxsize) > sys.maxsize:  # numpy's limit, even if empty
            raise _fail(path, f"tensor {name!r} has shape {shape}, too large for an array")
        try:
            arr = np.frombuffer(data[offs[0] : offs[1]], dtype=dtype).reshape(shape).copy()
        except (ValueError, OverflowError) as e:  # numpy's own limits (e.g. ndim > 32)
            raise _fail(path, f"tensor {name!r} has shape {shape} ({e})") from e
        if bf16_as_f32 and dt == "BF16":
            arr = bf16_to_f32(arr)
        tensors[name] = arr
        dtypes[name] = dt
        spans.append((offs[0], offs[1]))
    spans.sort()
    end = 0
    for a, b in spans:
        if a < end:
            raise _fail(path, "tensors overlap")
        end = b
    if end != len(data):
        raise _fail(path, f"{len(data) - end} trailing bytes after the last tensor")
    return tensors, meta, dtypes


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32 (exact)."""
    wide = bits.astype(np.uint32)
    np.left_shift(wide, np.uint32(16), out=wide)  # in place: one 4-byte array, not two
    return wide.view(np.float32)


def save(
    path: str | os.PathLike[str], tensors: dict[str, np.ndarray], metadata: dict[str, str]
) -> None:
    """:func:`write` under the name the capabilities' ``save`` methods use."""
    write(Path(path), tensors, metadata)


def load(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """:func:`read` without the dtype names: ``(tensors, metadata)``, BF16 as float32."""
    tensors, meta, _ = read(Path(path), bf16_as_f32=True)
    return tensors, meta

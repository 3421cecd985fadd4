"""The one safetensors reader and writer of neuropil's Python side (numpy only,
strict), used by every ``save``/``load`` and by ``neuropil quantize``.

The file layout is the standard one (readable by the ``safetensors`` package):
an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets"}`` plus an optional ``"__metadata__"`` of
string values, then the raw little-endian tensor bytes. Every field is checked
on load; anything malformed, truncated or inconsistent raises
:class:`~neuropil.errors.FormatError`. Saving writes a temporary file beside the
target, syncs it and renames it, so a failed save never destroys an existing
file; the new file gets the mode of the file it replaces, else the mode
``open()`` would give (``0o666`` less the umask). As ``open()``, saving follows
a symbolic link, writes a pipe or device (``/dev/null``) in place, and refuses
a write-protected file, a loop of links and a path ending in a separator (see
:func:`replacing`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import secrets
import stat
import sys
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


# Why a save refuses a file it may not write: the rename would bypass its mode.
_NOT_WRITABLE = (
    "Permission denied: the file is not writable (write-protected), so a save does not replace it"
)
_MAX_LINKS = 40  # symbolic links followed before ELOOP, as Linux's open (MAXSYMLINKS)
_MAX_NAME = 255  # bytes of a file name on the usual file systems (NAME_MAX)
_TEMP_TRIES = 100  # temporary names tried before giving up
_SEPARATORS = tuple({os.sep, os.altsep or os.sep})


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """The temporary file a save writes, renamed over ``path`` when the block ends.

    Yields ``(fd, tmp)`` of a new file beside ``path`` (the block closes
    ``fd``); on success it is synced, takes the mode of the file it replaces
    (else the ``0o666`` less the umask a plain ``open`` gives) and replaces
    ``path``, and the folder is synced (best effort). On any error it is
    removed, and an ``OSError`` is raised again as the same subclass with its
    errno and strerror and ``path`` as ``filename``, as ``open(path, "wb")``
    would, the original as its cause. The Rust writer (FlyHash, BinaryIndex)
    behaves the same way. Refused, as ``open(path, "wb")`` refuses them, with
    nothing written:

    * a path ending in a separator (``"dir/"``): ``IsADirectoryError`` (or the
      error about its folder);
    * a loop of symbolic links: ``OSError`` ``ELOOP``;
    * a folder: ``IsADirectoryError``;
    * an existing file this process may not write (mode ``0o444``...):
      ``PermissionError`` (a rename would replace it regardless of its mode).

    A folder that cannot take the temporary file raises ``PermissionError``
    naming the folder. The temporary name is ``.{name}.{random}.tmp``, the name
    shortened to fit 255 bytes, created exclusively (``O_EXCL``; a name already
    taken, a leftover of a killed save, is skipped for another).

    As ``open(path, "wb")`` does, a symbolic link is followed (the file it
    points to is replaced, the link stays), and an existing target that is not
    a regular file or a folder (``/dev/null``, a named pipe) is written in
    place: ``(fd, tmp)`` are then its own descriptor and name. Renaming a file
    over it would replace the device or pipe itself (as root, ``/dev/null``
    would become a plain file); a write cut short there stays partial.
    """
    raw = os.fspath(path)
    if raw.endswith(_SEPARATORS):
        _trailing_separator(raw)
    if special_file(raw):
        # (stat'ed and opened through its links: /dev/stdout's resolve only in
        # the kernel, as /proc/self/fd/1 -> "pipe:[N]")
        try:
            fd = os.open(raw, os.O_WRONLY | os.O_TRUNC)
        except OSError as e:
            _reraise(e, raw)
        try:
            yield fd, raw
        except OSError as e:
            _reraise(e, raw)
        return
    target = _resolve_links(raw)
    try:
        old: os.stat_result | None = os.stat(target)
    except OSError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), raw)
    if old is not None and not os.access(
        target, os.W_OK, effective_ids=os.access in os.supports_effective_ids
    ):
        raise PermissionError(errno.EACCES, _NOT_WRITABLE, raw)
    fd, tmp = _create_temp(target, raw, replacing=old is not None)
    own = os.dup(fd)  # the block closes fd; this one syncs what it wrote
    try:
        try:
            yield fd, tmp
            os.fsync(own)
        finally:
            os.close(own)
        if old is not None:
            os.chmod(tmp, old.st_mode & 0o7777)  # made 0o600 while written
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        _reraise(e, raw)
    _sync_folder(os.path.dirname(target) or ".")


def _trailing_separator(raw: str) -> NoReturn:
    """Raises what ``open(raw, "wb")`` raises for a path ending in a separator
    (it never creates a file): the error about its folder, else ``EISDIR``."""
    stripped = raw.rstrip("".join(_SEPARATORS))
    if stripped:
        parent = os.path.dirname(stripped) or "."
        try:
            st = os.stat(parent)
        except OSError as e:
            _reraise(e, raw)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), raw)
    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), raw)


def _resolve_links(raw: str) -> str:
    """Where ``raw`` leads through its symbolic links, followed one by one (a
    dangling link leads to the name it points to, which ``open`` creates);
    the OS's ``OSError`` (``ELOOP``) naming ``raw`` for a loop."""
    cur = raw
    for _ in range(_MAX_LINKS + 1):
        if not os.path.islink(cur):
            return cur
        try:
            to = os.readlink(cur)
        except OSError as e:
            _reraise(e, raw)
        cur = os.path.join(os.path.dirname(cur), to)  # (an absolute `to` replaces it)
    try:
        os.stat(raw)
    except OSError as e:
        _reraise(e, raw)
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), raw)


def _temp_name(name: str, tag: str) -> str:
    """``.{name}.{tag}.tmp``, ``name`` shortened (whole characters) so the whole
    fits 255 bytes: a name ``open`` takes never fails for its temporary one."""
    tail = f".{tag}.tmp"
    room = _MAX_NAME - 1 - len(tail)
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return f".{name}{tail}"


def _create_temp(target: str, raw: str, replacing: bool) -> tuple[int, str]:
    """A new temporary file beside ``target``, created exclusively, private
    (``0o600``) when it will replace a file (it takes that file's mode before
    the rename), else with ``open``'s mode (``0o666`` less the umask)."""
    folder, name = os.path.split(target)
    folder = folder or "."
    # (readable too: a streamed save moves its data up in it; see _safetensors_stream)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    tmp = ""
    for _ in range(_TEMP_TRIES):
        tmp = os.path.join(folder, _temp_name(name, secrets.token_hex(4)))
        try:
            return os.open(tmp, flags, 0o600 if replacing else 0o666), tmp
        except FileExistsError:
            continue  # (a leftover of a killed save, or another process's: not ours)
        except PermissionError as e:
            raise PermissionError(
                e.errno,
                f"Permission denied: cannot create a temporary file in this folder to save "
                f"'{name}' (a save writes one beside the file, then renames it over the file)",
                folder,
            ) from e
        except OSError as e:
            _reraise(e, raw)
    raise FileExistsError(
        errno.EEXIST,
        f"no free temporary file name after {_TEMP_TRIES} tries (the last: {tmp})",
        raw,
    )


def _sync_folder(folder: str) -> None:
    """Syncs a folder after a rename in it, best effort (POSIX only)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _reraise(e: OSError, path: str | os.PathLike[str]) -> NoReturn:
    """Raises ``e`` again as the same ``OSError`` subclass naming ``path`` (``e``
    itself when it carries no errno)."""
    if e.errno is None:
        raise e
    raise type(e)(e.errno, e.strerror, os.fspath(path)) from e


def special_file(path: str | os.PathLike[str]) -> bool:
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
    path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray | BF16], metadata: dict[str, str]
) -> None:
    """Writes ``tensors`` (numpy arrays of any shape, or :class:`BF16` bits) and
    string ``metadata`` atomically (see :func:`replacing`). (``neuropil
    quantize`` writes its tensors one at a time instead, with the same pieces:
    see ``_safetensors_stream``.)"""
    entries: dict[str, dict[str, object]] = {}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        key, a = prepared(name, arr)
        entries[name] = {
            "dtype": key,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    raw = header_bytes(metadata, entries)
    with replacing(path) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays:
            f.write(a.data)  # C-contiguous: its own bytes, no copy (tobytes would make one)


def prepared(name: str, arr: np.ndarray | BF16) -> tuple[str, np.ndarray]:
    """``(dtype name, array)``: a tensor as it is stored, C-contiguous and
    little-endian (copied only where it is not), and its safetensors dtype.

    Raises:
        DTypeError: a dtype safetensors has no name for (complex, strings, objects).
    """
    a = np.asarray(arr.bits if isinstance(arr, BF16) else arr)
    if not a.flags.c_contiguous:
        a = a.copy(order="C")  # np.ascontiguousarray would make a 0-d array 1-d
    key = "BF16" if isinstance(arr, BF16) else _NAMES.get(a.dtype.newbyteorder("<").str)
    if key is None:
        raise DTypeError(
            f"tensor {name!r} must have a dtype safetensors stores (bool, integers, "
            f"float16/32/64, bfloat16); got {a.dtype}"
        )
    return key, a.astype(a.dtype.newbyteorder("<"), copy=False)


def header_bytes(metadata: Mapping[str, str], entries: Mapping[str, object]) -> bytes:
    """The JSON header of ``entries`` (name -> ``{"dtype", "shape",
    "data_offsets"}``) and string ``metadata``, padded with spaces to a
    multiple of 8 bytes (so the data, and each 8-byte-aligned tensor, starts
    aligned, as the ``safetensors`` package pads it)."""
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


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
    path: str | Path, *, bf16_as_f32: bool = False, mapped: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Reads a safetensors file.

    Args:
        path: the file.
        bf16_as_f32: decode BF16 tensors to ``float32`` (exact); else they come
            back as their ``uint16`` bits (for callers that count the file's
            bytes or decode themselves, e.g. ``neuropil quantize``).
        mapped: map the file into memory (read-only) and return read-only
            views of it instead of copies, so a tensor's bytes are read from
            disk when first used and, being the file's pages, never take
            memory of their own (``neuropil quantize`` reads a model larger
            than the RAM this way). The file must not change while they are
            in use: a file cut short under them crashes the process (SIGBUS).
            BF16 tensors decoded by ``bf16_as_f32`` are new arrays either way.

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
    blob = _mapped(path) if mapped else path.read_bytes()  # OSError as from open()
    if len(blob) < 8:
        raise _fail(path, f"{len(blob)} bytes is shorter than the 8-byte header length")
    n = int.from_bytes(blob[:8], "little")
    if n > min(MAX_HEADER, len(blob) - 8):
        raise _fail(path, f"header length {n} exceeds the file ({len(blob)} bytes)")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]).decode("utf-8"))
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
            arr = np.frombuffer(data[offs[0] : offs[1]], dtype=dtype).reshape(shape)
            arr = arr if mapped else arr.copy()
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


def _mapped(path: Path) -> bytes | memoryview:
    """The file's bytes as a read-only memory map (the views of it keep it
    open), or read where it cannot be mapped (an empty file, a pipe, a file
    system without mmap), as without ``mapped``."""
    with open(path, "rb") as f:  # OSError (FileNotFoundError...) as from open()
        st = os.fstat(f.fileno())
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            with contextlib.suppress(OSError):
                return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        return f.read()


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32 (exact)."""
    wide = bits.astype(np.uint32)
    np.left_shift(wide, np.uint32(16), out=wide)  # in place: one 4-byte array, not two
    return wide.view(np.float32)


def save(
    path: str | os.PathLike[str], tensors: dict[str, np.ndarray], metadata: dict[str, str]
) -> None:
    """:func:`write` under the name the capabilities' ``save`` methods use."""
    write(path, tensors, metadata)


def load(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """:func:`read` without the dtype names: ``(tensors, metadata)``, BF16 as float32."""
    tensors, meta, _ = read(Path(path), bf16_as_f32=True)
    return tensors, meta

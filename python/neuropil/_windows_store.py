"""Persistence of :class:`~neuropil.windows.SlidingWindows` as safetensors.

One file holds the frames (``frames``), the episode offsets (``episodes``,
int64), each target (``target.<name>``) and a JSON metadata header with a format
version, the window, the stride and the target offsets. The file is written to
a temporary name and renamed, so a failed save never destroys an old file (a
pipe or device is written in place, and links are followed, as by ``open``).
:func:`load` checks every field and raises :class:`~neuropil.FormatError` on
anything malformed, truncated or of another version; with ``mmap=True`` the
arrays are ``np.memmap`` views of the file (read in place, paged in on use).
The file format never uses pickle.

An object loaded with ``mmap=True`` remembers the file's signature (absolute
path, size, ``st_mtime_ns``, inode, SHA-256 of the 8-byte length + JSON
header) and pickles as that reference; :func:`_reopen` loads the file again on
unpickle and refuses (``FormatError``, or ``FileNotFoundError``) a file that
is not the one that was loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._safetensors import replacing
from .errors import ArgumentError, FormatError, NeuropilError

if TYPE_CHECKING:
    from .windows import SlidingWindows

FORMAT = "neuropil.windows"
VERSION = "1"
_MAX_HEADER = 100 << 20
_MAX_INT = 1 << 62  # bound on window, stride and target offsets read from a file

# safetensors dtype names <-> numpy; BF16 is read as int16 and viewed by torch.
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}


def _host(data: Any, name: str) -> tuple[np.ndarray, str]:
    """A C-contiguous little-endian numpy view/copy of ``data`` and its
    safetensors dtype name; ``name`` (``frames``, ``targets['a']``) for messages."""
    if type(data).__module__.split(".")[0] == "torch":
        import torch

        t = data.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy(), "BF16"
        arr = t.numpy()
    else:
        arr = np.ascontiguousarray(data)
    if arr.dtype.byteorder not in ("=", "|", "<"):
        # Big-endian frames are valid windows (the constructor takes them):
        # safetensors is little-endian, so they are written converted, the
        # same values (refusing them made a good object unsaveable).
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    st = _NAMES.get(arr.dtype.newbyteorder("="))
    if st is None:
        raise ArgumentError(
            f"{name} must have a dtype safetensors stores ({', '.join(sorted(_DTYPES))}) "
            f"to be saved; got {arr.dtype}"
        )
    return arr, st


def save(sw: SlidingWindows, path: str | os.PathLike) -> None:
    """Writes ``sw`` to ``path`` (safetensors + JSON metadata; temp file, then rename;
    a pipe or device in place).

    Tensors are laid out by descending item size after a header padded to a
    multiple of 8 bytes, so every tensor's data is aligned to its item size in
    the file (and in a memory map of it). Each call writes its own temporary
    file (created exclusively in the same folder), so concurrent saves to one path never
    mix; the last rename wins. The file gets the mode of the file it replaces,
    else ``0o666`` minus the umask, as ``open`` would give it. A write-protected
    file, a loop of links or a path ending in a separator is refused as ``open``
    refuses it (see :func:`neuropil._safetensors.replacing`).
    """
    tensors = [("frames", *_host(sw.frames, "frames")), ("episodes", sw.episode_offsets, "I64")]
    tensors += [(f"target.{k}", *_host(v, f"targets[{k!r}]")) for k, v in sw.targets.items()]
    # Widest items first (stable): with an 8-aligned data start, every tensor is aligned.
    tensors.sort(key=lambda t: -t[1].dtype.itemsize)
    header: dict[str, Any] = {
        "__metadata__": {
            "format": FORMAT,
            "version": VERSION,
            "window": str(sw.window),
            "stride": str(sw.stride),
            "targets": json.dumps(list(sw.targets)),
            "target_offset": json.dumps(sw.target_offset),
        }
    }
    offset = 0
    for name, arr, dtype in tensors:
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with replacing(path) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        _write_tensors(f, [arr for _, arr, _ in tensors])
        # (replacing syncs the file before its rename; a pipe is not synced)


def _write_tensors(f: Any, arrays: list[np.ndarray]) -> None:
    for arr in arrays:
        # In slices of 64 MiB: a memmapped or huge array is never copied whole.
        flat = arr.reshape(-1).view(np.uint8)
        for lo in range(0, flat.size, 64 << 20):
            # (numpy's stubs give ndarray __buffer__ on Python 3.12+ only; it has the
            # buffer protocol on every version)
            f.write(memoryview(flat[lo : lo + (64 << 20)]))  # type: ignore[arg-type]


def _bad(path: Path, detail: str) -> FormatError:
    return FormatError(f"{path}: {detail}")


def load(path: str | os.PathLike, mmap: bool = True) -> SlidingWindows:
    """Reads a file written by :func:`save`, checking every field.

    Raises:
        FormatError: the file is not a neuropil windows file, has another
            version, or is malformed, truncated (or has bytes after its last
            tensor) or inconsistent, or changed
            (size, mtime or inode) while it was being read.
        FileNotFoundError: ``path`` does not exist.
    """
    from .windows import SlidingWindows

    path = Path(path)
    before = os.stat(path)
    size = before.st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(path, f"truncated: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise _bad(path, f"header length {n} exceeds the file ({size} bytes)")
        raw = f.read(n)
        digest = hashlib.sha256(head + raw).hexdigest()
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise _bad(path, f"header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header must be a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, f"not a {FORMAT} file (metadata format {meta and meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise _bad(path, f"format version must be {VERSION}; got {meta.get('version')!r}")
    window = _meta_int(path, meta, "window")
    stride = _meta_int(path, meta, "stride")
    try:
        names = json.loads(meta.get("targets", "null"))
        offsets = json.loads(meta.get("target_offset", "null"))
    except (TypeError, json.JSONDecodeError, RecursionError):
        raise _bad(path, "targets/target_offset metadata must be JSON") from None
    if not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
        raise _bad(path, f"targets metadata must be a list of names; got {names!r}")
    if not isinstance(offsets, dict) or sorted(offsets) != sorted(names):
        raise _bad(path, f"target_offset must name exactly the targets {names}; got {offsets!r}")
    if not all(
        v is None or (isinstance(v, int) and not isinstance(v, bool) and abs(v) < _MAX_INT)
        for v in offsets.values()
    ):
        raise _bad(
            path, f"target_offset values must be ints of magnitude < 2**62 or null; got {offsets!r}"
        )
    want = {"frames", "episodes", *(f"target.{k}" for k in names)}
    if set(header) != want:
        raise _bad(path, f"tensors must be {sorted(want)}; got {sorted(header)}")
    data_start = 8 + n
    ends = [e for e in (_data_end(header[k]) for k in want) if e is not None]
    # (with a malformed entry, _tensor below says what is wrong with it)
    if len(ends) == len(want) and data_start + max(ends) < size:
        # As safetensors and every other loader: bytes past the last tensor
        # are a damaged or tampered file, not padding to ignore. Checked
        # before any array maps the file.
        end = data_start + max(ends)
        raise _bad(
            path,
            f"{size - end} trailing bytes after the last tensor: the header and tensors "
            f"make a file of {end} bytes; found {size} bytes",
        )
    arrays = {k: _tensor(path, k, header[k], data_start, size, mmap) for k in sorted(want)}
    if arrays["frames"][0].ndim != 2:
        raise _bad(path, f"frames must be 2-D; got shape {arrays['frames'][0].shape}")
    if arrays["episodes"][1] != "I64" or arrays["episodes"][0].ndim != 1:
        raise _bad(path, "episodes must be a 1-D I64 tensor")
    frames = arrays["frames"][0]
    if isinstance(frames, np.ndarray) and any(arrays[f"target.{k}"][1] == "BF16" for k in names):
        # A bfloat16 target is a torch tensor (numpy has no bfloat16), which only
        # torch frames carry, as the object saved had: the frames are handed to
        # torch in place, a memory map of them copy-on-write (torch takes no
        # read-only memory; writes stay private), still paged in on use.
        import torch

        if isinstance(frames, np.memmap):
            frames = np.memmap(path, dtype=frames.dtype, mode="c", offset=frames.offset,
                               shape=frames.shape)  # fmt: skip
        frames = torch.from_numpy(frames)
    # Every array was read or mapped from the file stat'ed first (a save
    # renames a new file in place: another inode), so the signature holds.
    if _stat_key(os.stat(path)) != _stat_key(before):
        raise _bad(path, "the file changed while it was being read")
    try:
        sw = SlidingWindows(
            frames,
            window,
            stride,
            episodes=np.asarray(arrays["episodes"][0]),
            targets={k: arrays[f"target.{k}"][0] for k in names},
            target_offset=offsets,
        )
    except (NeuropilError, OverflowError) as e:
        raise _bad(path, f"inconsistent content: {e}") from None
    if mmap:
        ref = (os.path.abspath(path), *_stat_key(before), digest)
        sw._file = (ref, (sw.frames, *sw.targets.values()))
    return sw


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    """What identifies a version of a file: size, mtime (ns) and inode."""
    return st.st_size, st.st_mtime_ns, st.st_ino


def _reopen(path: str, size: int, mtime_ns: int, ino: int, header_sha256: str) -> SlidingWindows:
    """Unpickles a :class:`SlidingWindows` that ``load(path, mmap=True)`` returned.

    Loads ``path`` memory-mapped again (through :func:`load`, which validates
    every field) after checking it is the file that was loaded.

    Raises:
        FileNotFoundError: ``path`` is gone.
        FormatError: ``path`` is not the file that was loaded (its size,
            mtime, inode or header differ), or is malformed.
    """
    want = (size, mtime_ns, ino, header_sha256)

    def changed(found: tuple[Any, ...]) -> FormatError:
        names = ("size", "mtime_ns", "inode", "header SHA-256")
        diff = ", ".join(
            f"{k} {a!r} -> {b!r}" for k, a, b in zip(names, want, found, strict=False) if a != b
        )
        return FormatError(
            f"{path} changed since this SlidingWindows was loaded from it ({diff}); "
            "it cannot be unpickled as the same windows: load the file again"
        )

    try:
        now = _stat_key(os.stat(path))
        if now != want[:3]:
            raise changed(now)
        sw = load(path, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            "cannot unpickle SlidingWindows: the file it was memory-mapped from is gone",
            path,
        ) from None
    found = sw._file[0][1:] if sw._file is not None else ()
    if found != want:
        raise changed(found)
    return sw


def _meta_int(path: Path, meta: dict, key: str) -> int:
    v = meta.get(key)
    # ASCII digits only: str.isdigit() accepts "²", which int() refuses.
    if not (isinstance(v, str) and v.isascii() and v.isdigit() and 1 <= int(v) < _MAX_INT):
        raise _bad(path, f"metadata {key} must be a positive integer below 2**62; got {v!r}")
    return int(v)


def _data_end(entry: Any) -> int | None:
    """The end offset of a tensor entry's data, or None if the entry is malformed."""
    offs = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offs, (list, tuple)) and len(offs) == 2:
        end = offs[1]
        if isinstance(end, int) and not isinstance(end, bool):
            return end
    return None


def _tensor(
    path: Path, name: str, entry: Any, start: int, size: int, mmap: bool
) -> tuple[Any, str]:
    if not isinstance(entry, dict):
        raise _bad(path, f"tensor {name} entry must be an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise _bad(path, f"tensor {name} dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
    ints = (list, tuple)
    if not (
        isinstance(shape, ints)
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _MAX_INT for x in shape)
    ):
        raise _bad(path, f"tensor {name} shape must be a list of ints in [0, 2**62); got {shape!r}")
    if not (
        isinstance(offs, ints)
        and len(offs) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in offs)
    ):
        raise _bad(path, f"tensor {name} data_offsets must be [begin, end]; got {offs!r}")
    np_dtype = np.dtype(_DTYPES[dtype])
    nbytes = math.prod(shape) * np_dtype.itemsize  # Python ints: a huge shape cannot wrap
    begin, end = offs
    if not (0 <= begin <= end and end - begin == nbytes):
        raise _bad(path, f"tensor {name} data_offsets {offs} do not hold shape {shape} of {dtype}")
    if start + end > size:
        raise _bad(path, f"truncated: tensor {name} ends at byte {start + end} of {size}")
    if nbytes == 0:
        arr: Any = np.empty(shape, dtype=np_dtype)
    elif mmap:
        arr = np.memmap(path, dtype=np_dtype, mode="r", offset=start + begin, shape=tuple(shape))
        if not arr.flags.aligned:
            # A file written before tensors were aligned (or by another writer):
            # copy rather than hand a misaligned array to the native layout.
            arr = np.array(arr)
    else:
        arr = np.fromfile(path, dtype=np_dtype, count=nbytes // np_dtype.itemsize,
                          offset=start + begin).reshape(shape)  # fmt: skip
    if dtype == "BF16":
        import torch

        if isinstance(arr, np.memmap):
            # torch takes no read-only memory: the same bytes mapped
            # copy-on-write (writes stay private), still paged in on use
            # rather than copied whole.
            arr = np.memmap(path, dtype=np_dtype, mode="c", offset=start + begin,
                            shape=tuple(shape))  # fmt: skip
        arr = torch.from_numpy(arr).view(torch.bfloat16)
    return arr, dtype

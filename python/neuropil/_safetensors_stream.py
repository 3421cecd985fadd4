"""A safetensors file written one tensor at a time (``neuropil quantize``).

:func:`_safetensors.write` needs every tensor at once: the header, which comes
first, holds each tensor's offsets. A model converted tensor by tensor would
then hold all of its output in memory. Here each tensor is written as soon as
it is made, after room reserved for the header, which is filled in at the end:

* The caller reserves ``room`` bytes, an upper bound of the header it will
  write (:func:`entry_room` bounds a tensor's entry). The header is padded
  with spaces to fill it, as the format allows (``safetensors`` pads its own
  to 8 bytes the same way), so the file differs from :func:`_safetensors.write`'s
  by those spaces only. A header that outgrows its room is still written: the
  data is moved up to make room (one more pass over it), never cut.
* An output written in place (a pipe, ``/dev/stdout`` on a pipe, a terminal,
  a device; stdout), which may not seek or be read back, gets the header
  first: the data goes to an anonymous temporary file
  (``tempfile.TemporaryFile``, in ``TMPDIR``: removed by the OS even if the
  process is killed) and is copied out after the header once that is known.
  Memory stays at one tensor, the disk holds the output once more for the
  while, and the bytes are exactly :func:`_safetensors.write`'s. (Holding the
  output in memory instead, as before, would need all of it at once.)

:func:`writing` writes a path as :func:`_safetensors.write` does (through
:func:`_safetensors.replacing`: a temporary file beside it, synced and renamed
over it, removed on any error or interrupt; a pipe or device written in place);
:func:`writing_stream` writes an open binary stream (stdout: ``neuropil quantize
IN -``) in order, through the temporary file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO

import numpy as np

from . import _safetensors
from .errors import ArgumentError

_COPY_CHUNK = 8 << 20  # bytes moved at once when data is copied or moved up
# The characters of a tensor's header entry besides its name and numbers:
# `:{"dtype":"BF16","shape":[],"data_offsets":[,]},`, 48, and some to spare.
_ENTRY_FIXED = 64
_INT_DIGITS = 20  # digits of the largest offset or extent (2**64 - 1)


def entry_room(name: str, ndim: int) -> int:
    """At most the bytes a tensor's entry takes in the header: its name as
    JSON, the fixed characters, and ``ndim`` extents and 2 offsets of at most
    20 digits each, with their commas."""
    return len(json.dumps(name)) + _ENTRY_FIXED + (ndim + 2) * (_INT_DIGITS + 1)


class Writer:
    """Tensors written one at a time (:meth:`add`), then the header's metadata
    (:meth:`finish`); made by :func:`writing` and :func:`writing_stream`."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f  # positioned where the data starts
        self._entries: dict[str, dict[str, object]] = {}
        self._size = 0
        self._metadata: dict[str, str] | None = None

    def add(self, name: str, arr: np.ndarray | _safetensors.BF16) -> None:
        """Writes a tensor (a numpy array of any shape, or :class:`BF16` bits) now.

        Raises:
            ArgumentError: ``name`` was added before, or is ``__metadata__``.
            DTypeError: a dtype safetensors cannot store.
        """
        if self._metadata is not None:
            raise RuntimeError("Writer.add after Writer.finish")
        if name in self._entries or name == "__metadata__":
            raise ArgumentError(
                f"tensor names must be distinct and not '__metadata__'; got {name!r} again"
            )
        key, a = _safetensors.prepared(name, arr)
        self._f.write(a.data)  # C-contiguous: its own bytes, no copy
        end = self._size + a.nbytes
        self._entries[name] = {
            "dtype": key,
            "shape": list(a.shape),
            "data_offsets": [self._size, end],
        }
        self._size = end

    def finish(self, metadata: Mapping[str, str]) -> None:
        """Gives the header's string metadata: the file is complete when the
        ``with`` block ends (a block that ends without it raises)."""
        self._metadata = {str(k): str(v) for k, v in metadata.items()}

    def _header(self) -> bytes:
        if self._metadata is None:
            raise RuntimeError("the with block of writing() ended without Writer.finish")
        return _safetensors.header_bytes(self._metadata, self._entries)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], room: int) -> Iterator[Writer]:
    """A :class:`Writer` of the safetensors file ``path``, complete when the
    block ends, written as :func:`_safetensors.write` writes it (atomically for
    a file; see :func:`_safetensors.replacing`); ``room``: header bytes to
    reserve (see the module's notes). On any error or interrupt in the block
    an existing file at ``path`` is left as it was and no temporary file stays.

    Raises:
        OSError: ``path`` cannot be written, as from :func:`_safetensors.replacing`.
    """
    with _safetensors.replacing(path) as (fd, name), os.fdopen(fd, "wb") as f:
        # The temporary file a file target gets is new (it starts at 0), seeks
        # and can be read back (to move the data up). A pipe, terminal or
        # device target, written in place (`name` is then its own), may not
        # seek, nor be read.
        temporary = name != os.fspath(path)
        with _header_last(f, room) if temporary else _header_first(f) as w:
            yield w


@contextlib.contextmanager
def writing_stream(f: IO[bytes]) -> Iterator[Writer]:
    """A :class:`Writer` of an open binary stream (stdout), written from where
    it is, in order (as it would be by a pipe, even where it could seek: a
    stream opened to append, or past its start, cannot take the header at 0);
    nothing goes out before the block ends."""
    with _header_first(f) as w:
        yield w


@contextlib.contextmanager
def _header_last(f: IO[bytes], room: int) -> Iterator[Writer]:
    """The data after ``room`` bytes reserved at the start of a new file open
    for reading and writing, the header filled in at the end."""
    room += -room % 8  # (the data aligned to 8 bytes, as _safetensors.write aligns it)
    f.seek(8 + room)
    w = Writer(f)
    yield w
    raw = w._header()
    if len(raw) > room:  # the room reserved was too small: move the data up
        f.flush()
        _move_up(f.fileno(), 8 + room, w._size, len(raw) - room)
        room = len(raw)
    f.seek(0)
    _put_header(f, raw + b" " * (room - len(raw)))
    f.flush()


@contextlib.contextmanager
def _header_first(f: IO[bytes]) -> Iterator[Writer]:
    """The data held in an anonymous temporary file, written out after the
    header at the end."""
    with tempfile.TemporaryFile() as data:
        w = Writer(data)
        yield w
        _put_header(f, w._header())
        data.seek(0)
        shutil.copyfileobj(data, f, _COPY_CHUNK)
    f.flush()


def _put_header(f: IO[bytes], raw: bytes) -> None:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)


def _move_up(fd: int, start: int, size: int, by: int) -> None:
    """Moves ``size`` bytes of a file at ``start`` to ``start + by``, last
    chunk first (so no chunk overwrites bytes not yet moved)."""
    end = size
    while end > 0:
        begin = max(0, end - _COPY_CHUNK)
        chunk = os.pread(fd, end - begin, start + begin)
        if len(chunk) != end - begin:  # (the file shrank under us)
            raise OSError(f"short read moving data: {len(chunk)} of {end - begin} bytes")
        view, at = memoryview(chunk), start + by + begin
        while view:  # (pwrite may write less than asked)
            n = os.pwrite(fd, view, at)
            view, at = view[n:], at + n
        end = begin

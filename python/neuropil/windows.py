"""Lazy sliding windows: sequence batches sliced from the frames on demand.

Temporal models train on windows of ``W`` consecutive frame embeddings. Building
every window up front costs ``W`` times the frames (380k x 287 float32 frames are
0.44 GB; their 30-frame windows 13.1 GB). :class:`SlidingWindows` keeps only the
frames and copies each batch of windows when it is asked for: a parallel Rust
gather into a reusable buffer, with the GIL released and the next batches
prepared in the background. CUDA frames are gathered on the GPU by torch.

Example:
    >>> import numpy as np
    >>> from neuropil.windows import SlidingWindows
    >>> rng = np.random.default_rng(0)
    >>> frames = rng.standard_normal((1000, 287), dtype=np.float32)  # (N, D) embeddings
    >>> lengths = [400, 350, 250]                 # three episodes
    >>> actions = rng.integers(0, 18, 1000)       # one action per frame
    >>> sw = SlidingWindows(frames, window=30, episodes=lengths,
    ...                     targets={"action": actions}, target_offset=1)
    >>> len(sw)  # length - 30 per episode: the frame after a window stays in its episode
    910
    >>> for batch in sw.batches(256, seed=0, epoch=0):  # each epoch has its own order
    ...     print(batch["frames"].shape, batch["frames"].dtype, batch["action"].shape)
    (256, 30, 287) float32 (256,)
    (256, 30, 287) float32 (256,)
    (256, 30, 287) float32 (256,)
    (142, 30, 287) float32 (142,)
    >>> bool(sw.target("action", 0) == actions[sw.start(0) + 30])  # the action after the window
    True

Batches are of the frames' library and device (torch frames give torch tensors).
``import neuropil.windows`` does not import torch; torch is imported when the
frames are a torch tensor or :meth:`SlidingWindows.as_dataset` is called.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _native
from .errors import ArgumentError, DTypeError, NeuropilError, ShapeError, _shown

__all__ = [
    "MemoryPlan",
    "SlidingWindows",
    "WindowBatches",
    "WindowMemoryError",
    "available_memory",
]


class WindowMemoryError(NeuropilError, MemoryError):
    """Materialising every window would not fit in the memory available."""


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


_I64_MAX = 2**63 - 1


def _int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ArgumentError(f"{name} must be an integer; got {_shown(value)}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ArgumentError(f"{name} must be an integer; got {_shown(value)}") from None
    if minimum is not None and v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ArgumentError(f"{name} must be {what}; got {v}")
    if maximum is not None and v > maximum:
        raise ArgumentError(f"{name} must be at most {maximum}; got {v}")
    return v


def _asarray(value: Any, name: str) -> np.ndarray:
    """``np.asarray(value)``; a ragged nested list is a ShapeError naming ``name``."""
    try:
        return np.asarray(value)
    except ValueError as e:
        raise ShapeError(f"{name} must be an array (N, ...); got a ragged sequence ({e})") from None


def _window_index(i: Any, n: int) -> int:
    """``i`` as an int for the native layout; beyond int64 it is out of range."""
    v = _int("i", i)
    if not -_I64_MAX - 1 <= v <= _I64_MAX:
        raise IndexError(f"window index {v} is out of range for length {n}")
    return v


def _index_array(indices: Any, name: str = "indices") -> np.ndarray:
    """int64 C-contiguous 1-D copy/view of integer indices (numpy, torch, list)."""
    if _is_torch(indices):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        if not (arr.size == 0 and arr.dtype.kind == "f"):
            raise DTypeError(f"{name} must hold integers; got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ShapeError(f"{name} must have shape (n,); got {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise IndexError(f"{name} holds {int(arr.max())}, out of range")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    # A memmap of a file can be misaligned; the native layout needs aligned int64.
    return out if out.flags.aligned else out.copy()


class _Array:
    """One array gathered per window: the frames, or a target.

    ``rows`` consecutive rows starting at the window's first frame plus
    ``shift`` are copied: frames and whole-window targets use ``rows = W,
    shift = 0``; a target at the last frame plus ``k`` uses ``rows = 1, shift =
    W - 1 + k``.
    """

    def __init__(self, name: str, data: Any, rows: int, shift: int, squeeze: bool):
        self.name, self.data, self.rows, self.shift, self.squeeze = name, data, rows, shift, squeeze
        self.torch = _is_torch(data)
        self.cuda = self.torch and data.device.type != "cpu"
        self.trail = tuple(data.shape[1:])
        self.dtype = data.dtype
        self.wide = None
        if self.cuda:
            self.raw = None
            self.wide = _wide_rows(data, _itemsize(data) * int(np.prod(self.trail, dtype=np.int64)))
        elif self.torch:
            self.raw = None  # remade by `source` whenever the tensor's memory moved
            self._view: tuple[int, np.ndarray | None] | None = None
        else:
            self.raw = data.reshape(data.shape[0], -1).view(np.uint8)
        self.row_bytes = int(np.prod(self.trail, dtype=np.int64)) * _itemsize(data)

    def source(self) -> np.ndarray | None:
        """The data's rows as a ``(n, row_bytes)`` uint8 numpy view (``None`` for
        0-byte rows or CUDA data).

        A CPU tensor's view is remade whenever its memory moved: pickling the
        tensor for a spawn or forkserver ``DataLoader`` worker (torch's
        ``share_memory_``) swaps its storage in place and frees the old one,
        which a view kept from construction would go on reading.
        """
        if not self.torch or self.cuda:
            return self.raw
        import torch

        ptr = self.data.data_ptr()
        cached = self._view
        if cached is None or cached[0] != ptr:
            flat = self.data.reshape(self.data.shape[0], -1)
            cached = (ptr, flat.view(torch.uint8).numpy() if flat.shape[1] else None)
            self._view = cached
        return cached[1]

    def item_shape(self) -> tuple[int, ...]:
        return self.trail if self.squeeze else (self.rows, *self.trail)

    def new_buffer(self, n: int, pin: bool = False) -> tuple[Any, np.ndarray | None]:
        """A (user view, uint8 native view) pair of ``n`` items."""
        shape = (n, *self.item_shape())
        if self.cuda:
            import torch

            return torch.empty(shape, dtype=self.dtype, device=self.data.device), None
        nbytes = n * self.rows * self.row_bytes
        if self.torch:
            import torch

            raw = torch.empty((n, self.rows * self.row_bytes), dtype=torch.uint8, pin_memory=pin)
            return raw.view(self.dtype).view(shape), raw.numpy()
        raw_np = np.empty((n, nbytes // max(n, 1)), dtype=np.uint8)
        return raw_np.view(self.dtype).reshape(shape), raw_np

    def gather(self, starts: Any, user: Any, raw: np.ndarray | None) -> None:
        """Copies the windows at frame ``starts`` into the buffer pair."""
        if self.cuda:
            _cuda_gather(self, starts, user)
        elif raw is not None and raw.shape[1]:
            src = self.source()
            assert src is not None  # (None only on CUDA or for 0-byte rows)
            _native.windows_gather(
                src,
                starts,
                self.shift,
                self.rows,
                raw,
                "frames" if self.name == "frames" else "targets",
            )


def _itemsize(data: Any) -> int:
    return int(data.element_size()) if _is_torch(data) else int(data.dtype.itemsize)


def _wide_rows(t: Any, row_bytes: int) -> Any:
    """``t`` (rows first, C-contiguous) as a 2-D tensor of the widest integer type
    (8, 4, 2 or 1 bytes) that divides a row and the data's alignment."""
    import torch

    flat = t.reshape(t.shape[0], -1).view(torch.uint8)
    offset = t.storage_offset() * t.element_size()
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if row_bytes % size == 0 and offset % size == 0 and t.data_ptr() % size == 0:
            return flat.view(dtype)
    return flat


def _cuda_gather(a: _Array, starts: Any, out: Any) -> None:
    """GPU gather: one ``index_select`` into ``out``, a byte copy like the CPU kernel.

    The rows are seen as the widest integer type that fits (8-byte elements for
    288 float32), so each GPU thread moves 8 bytes; a window of ``rows``
    consecutive rows is one row of a strided 2-D view ``(n - rows + 1, rows *
    row)`` of the same memory, so the whole batch is a single kernel launch.
    """
    import torch

    if a.row_bytes == 0 or out.numel() == 0:
        return
    src = a.wide if a.wide is not None else _wide_rows(a.data, a.row_bytes)
    dst = out.reshape(out.shape[0], -1).view(torch.uint8)
    if out.data_ptr() % src.element_size() == 0:
        dst = dst.view(src.dtype)
    else:  # an oddly aligned output: element by element in the data's own type
        src, dst = a.data.reshape(a.data.shape[0], -1), out.reshape(out.shape[0], -1)
    width = src.shape[1]
    idx = starts if a.shift == 0 else starts + a.shift
    if a.rows == 1:
        torch.index_select(src, 0, idx, out=dst)
        return
    count = src.shape[0] - a.shift - a.rows + 1
    view = src.as_strided((count, a.rows * width), (width, 1), src.storage_offset())
    torch.index_select(view, 0, idx, out=dst)


@dataclass(frozen=True)
class MemoryPlan:
    """What each mode would hold in memory, and the mode that fits.

    Attributes:
        mode: ``"eager"`` when every window fits in ``headroom`` of the memory
            available, else ``"lazy"``.
        frames_bytes: The frames and targets.
        eager_bytes: Every window materialised (frames and targets are held too
            while it is built).
        lazy_bytes: Frames + ``prefetch + 1`` batch buffers + the epoch order
            (4 bytes per window, 8 beyond 2**31 frames).
        available_bytes: Memory available (host: ``MemAvailable``; CUDA: free
            device memory).
        windows: Number of windows.
    """

    mode: str
    frames_bytes: int
    eager_bytes: int
    lazy_bytes: int
    available_bytes: int
    windows: int

    def __str__(self) -> str:
        gb = 1e9
        return (
            f"{self.windows:,} windows: eager {self.eager_bytes / gb:.2f} GB, "
            f"lazy {self.lazy_bytes / gb:.3f} GB (frames {self.frames_bytes / gb:.3f} GB), "
            f"available {self.available_bytes / gb:.2f} GB -> {self.mode}"
        )


def available_memory(device: Any = None) -> int:
    """Bytes available: ``MemAvailable`` of the host, or free memory of a CUDA device."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


class SlidingWindows:
    """Windows of ``window`` consecutive frames, sliced on demand.

    Args:
        frames: ``(N, D)`` frames: a numpy array (also ``np.memmap``, read in
            place and paged in as windows are read) or a torch tensor on the CPU
            (read in place through ``.numpy()``) or on a CUDA device (gathered on
            that device). Any dtype numpy/torch can hold (float32, float16,
            bfloat16, ints); batches keep it. A non-contiguous array is copied
            once to C order.
        window: Frames per window ``W >= 1``.
        stride: Frames between the starts of consecutive windows, ``>= 1``.
        episodes: Episode lengths (summing to ``N``) or offsets (``E + 1``
            values from 0 to ``N``), ints; no window crosses an episode
            boundary. ``None``: one episode. An array that reads as offsets
            (starts at 0, never decreases, ends at ``N``) is taken as offsets.
        targets: ``{name: (N, ...)}`` arrays aligned with the frames (actions,
            labels, rewards), converted once to the frames' library and device.
        target_offset: Where each target is read. ``None``: the whole window,
            ``(B, W, ...)``. An int ``k``: the window's last frame plus ``k``,
            ``(B, ...)``; ``k = 1`` is the frame after the window (windows whose
            target would leave the episode are not made), ``-(W-1) <= k``. A
            dict gives one of these per target name.

    Pickling and ``copy.deepcopy`` work (so does ``DataLoader(num_workers > 0)``
    with the ``"spawn"`` or ``"forkserver"`` start method, see
    :meth:`as_dataset`): the object is rebuilt through this constructor
    (validated again) from the frames, window, stride, episode offsets,
    targets and target offsets, and yields the same windows and batches, bit
    for bit. numpy arrays are pickled by value; torch tensors by torch's own
    pickling (``torch.multiprocessing`` shares them with DataLoader workers
    instead of copying). An object returned by ``load(path, mmap=True)`` is
    pickled as a reference to the file instead (its absolute path, size,
    ``st_mtime_ns``, inode and a SHA-256 of its header; a few hundred bytes)
    and unpickled by loading it memory-mapped again, so processes share the
    page cache; if the file has changed since it was loaded, unpickling
    raises :class:`~neuropil.FormatError`, and ``FileNotFoundError`` (an
    ``OSError``) if it is gone, rather than serving other data. Iterators
    (:meth:`batches`, their prefetch threads and buffers) belong to the
    iterator, not to this object, and are not pickled; a
    :class:`WindowBatches` itself refuses to be pickled.

    Raises:
        ShapeError: ``frames`` is not 2-D or empty; a target's length is not ``N``.
        DTypeError: ``frames`` or ``episodes`` has an unusable dtype.
        ArgumentError: ``window``/``stride`` below 1, ``window`` longer than
            every episode, ``episodes`` neither lengths nor offsets of ``N``
            frames, ``target_offset`` out of range.
    """

    def __init__(
        self,
        frames: Any,
        window: int,
        stride: int = 1,
        episodes: Any = None,
        targets: Mapping[str, Any] | None = None,
        target_offset: int | Mapping[str, int | None] | None = None,
    ):
        window = _int("window", window, 1, _I64_MAX)
        stride = _int("stride", stride, 1, _I64_MAX)
        self.frames = self._frames(frames)
        self.torch = _is_torch(self.frames)
        self.device = self.frames.device if self.torch else None
        n = int(self.frames.shape[0])
        self.targets: dict[str, Any] = {}
        self.target_offset: dict[str, int | None] = {}
        if targets is not None and not isinstance(targets, Mapping):
            raise ArgumentError(
                f"targets must be a mapping {{name: (N, ...) array}} or None; "
                f"got {type(targets).__name__}"
            )
        for name, value in (targets or {}).items():
            if not isinstance(name, str) or name == "frames":
                raise ArgumentError(f"targets keys must be names other than 'frames'; got {name!r}")
            self.targets[name] = self._target(name, value, n)
            off = target_offset.get(name) if isinstance(target_offset, Mapping) else target_offset
            if off is not None:
                off = _int(f"target_offset[{name!r}]", off, -(window - 1), _I64_MAX - window)
            self.target_offset[name] = off
        if isinstance(target_offset, Mapping):
            extra = set(target_offset) - set(self.targets)
            if extra:
                raise ArgumentError(f"target_offset names unknown targets: {sorted(extra)}")
        lookahead = max([0, *(k for k in self.target_offset.values() if k is not None)])
        offsets, kind = self._episodes(episodes, n)
        self._layout = _native.WindowLayout(n, window, stride, lookahead, offsets, kind)
        self.window, self.stride = window, stride
        # Set by `load(path, mmap=True)`: (file signature, the arrays mapped
        # from it); pickling then refers to the file instead of copying it.
        self._file: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None
        self._arrays = [_Array("frames", self.frames, window, 0, False)]
        for name, data in self.targets.items():
            k = self.target_offset[name]
            if k is None:
                self._arrays.append(_Array(name, data, window, 0, False))
            else:
                self._arrays.append(_Array(name, data, 1, window - 1 + k, True))

    # ------------------------------------------------------------ construction

    @staticmethod
    def _frames(frames: Any) -> Any:
        if _is_torch(frames):
            if frames.ndim != 2:
                raise ShapeError(f"frames must have shape (n, d); got {tuple(frames.shape)}")
            if frames.is_complex():
                raise DTypeError(f"frames must be real numbers; got {frames.dtype}")
            out = frames.detach()
            out = out if out.is_contiguous() else out.contiguous()
        else:
            out = frames if isinstance(frames, np.ndarray) else _asarray(frames, "frames")
            if out.dtype.hasobject or out.dtype.kind not in "fiub":
                raise DTypeError(f"frames must have a numeric dtype; got {out.dtype}")
            if out.ndim != 2:
                raise ShapeError(f"frames must have shape (n, d); got {out.shape}")
            if not out.flags.c_contiguous:
                out = np.ascontiguousarray(out)
        if out.shape[0] == 0 or out.shape[1] == 0:
            raise ShapeError(f"frames must not be empty; got shape {tuple(out.shape)}")
        return out

    def _target(self, name: str, value: Any, n: int) -> Any:
        if self.torch:
            import torch

            if _is_torch(value):
                t = value.detach()
            else:
                arr = _asarray(value, f"targets[{name!r}]")
                # (checked here: torch.from_numpy's TypeError would name no target)
                if arr.dtype.hasobject or arr.dtype.kind not in "fiub":
                    raise DTypeError(
                        f"targets[{name!r}] must have a numeric dtype; got {arr.dtype}"
                    )
                # torch refuses read-only memory (a memmap): copy it
                t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
            if t.is_complex():  # (as numpy frames refuse a complex target)
                raise DTypeError(f"targets[{name!r}] must be real numbers; got {t.dtype}")
            t = t.to(self.device).contiguous()
            shape = tuple(t.shape)
        else:
            if _is_torch(value) and str(value.dtype) == "torch.bfloat16":
                raise DTypeError(
                    f"targets[{name!r}] is a bfloat16 tensor, which numpy frames cannot "
                    "carry (numpy has no bfloat16): pass the frames as a torch tensor, "
                    "or the target as float32"
                )
            t = (
                value.detach().cpu().numpy()
                if _is_torch(value)
                else _asarray(value, f"targets[{name!r}]")
            )
            if t.dtype.hasobject or t.dtype.kind not in "fiub":
                raise DTypeError(f"targets[{name!r}] must have a numeric dtype; got {t.dtype}")
            t = np.ascontiguousarray(t)
            shape = t.shape
        if len(shape) == 0 or shape[0] != n:
            raise ShapeError(
                f"targets[{name!r}] must have shape ({n}, ...) to match frames; got {shape}"
            )
        return t

    @staticmethod
    def _episodes(episodes: Any, n: int) -> tuple[np.ndarray | None, str]:
        if episodes is None:
            return None, "offsets"
        e = _index_array(episodes, "episodes")
        if e.size and int(e.min()) < 0:
            raise ArgumentError(f"episodes must be non-negative; got {int(e.min())}")
        if e.size >= 2 and e[0] == 0 and e[-1] == n and bool(np.all(np.diff(e) >= 0)):
            return e, "offsets"
        total = int(e.sum())
        if total != n:
            first = int(e[0]) if e.size else None
            last = int(e[-1]) if e.size else None
            raise ArgumentError(
                f"episodes must be lengths summing to {n} (the number of frames) or offsets "
                f"from 0 to {n}; got {e.size} values summing to {total}, first {first}, last {last}"
            )
        return e, "lengths"

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles (and deep-copies) through the constructor, or as a file reference.

        See the class docstring: the constructor's arguments (episodes as
        offsets), or for an object from ``load(path, mmap=True)`` whose arrays
        are still the file's, ``(path, size, mtime_ns, inode, header SHA-256)``
        reopened by the loader.
        """
        if self._file is not None:
            ref, held = self._file
            now = (self.frames, *self.targets.values())
            if len(held) == len(now) and all(a is b for a, b in zip(held, now, strict=True)):
                from ._windows_store import _reopen

                return _reopen, ref
        args = (
            self.frames,
            self.window,
            self.stride,
            self.episode_offsets,
            dict(self.targets),
            dict(self.target_offset),
        )
        return type(self), args

    # ------------------------------------------------------------ window access

    def __len__(self) -> int:
        return len(self._layout)

    def __repr__(self) -> str:
        lib = f"torch {self.device}" if self.torch else "numpy"
        return (
            f"SlidingWindows({len(self):,} windows of {self.window} x {self.dim} "
            f"{self.frames.dtype} ({lib}), stride {self.stride}, {self.num_episodes} episodes, "
            f"targets {list(self.targets)})"
        )

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def dim(self) -> int:
        return int(self.frames.shape[1])

    @property
    def episode_offsets(self) -> np.ndarray:
        """Episode boundaries, int64 ``(E + 1,)`` from 0 to ``N``."""
        return self._layout.offsets()

    @property
    def num_episodes(self) -> int:
        return len(self._layout.offsets()) - 1

    @property
    def starts(self) -> np.ndarray:
        """First frame of every window in order, int64 ``(len(self),)``.

        Computed per episode in Rust (one arithmetic run each): 8 bytes per
        window and no Python object per window.
        """
        return self._layout.all_starts()

    def start(self, i: int) -> int:
        """First frame of window ``i`` (negative counts from the end).

        Raises:
            IndexError: ``i`` is out of range (never clamped).
        """
        return self._layout.start(_window_index(i, len(self)))

    def episode_of(self, i: int) -> int:
        """Episode (0-based) holding window ``i``."""
        return self._layout.episode_of(_window_index(i, len(self)))

    def __getitem__(self, i: int | slice) -> Any:
        """Window ``i``: a ``(W, D)`` view of the frames (no copy).

        A slice gives its windows as a new ``(B, W, D)`` array or tensor (the
        ``frames`` of :meth:`take` of ``range(len(self))[i]``), as slicing a
        materialised ``(M, W, D)`` array would.

        Raises:
            IndexError: ``i`` is out of range (never clamped).
        """
        if isinstance(i, slice):
            r = range(len(self))[i]
            starts = self._layout.starts(np.arange(r.start, r.stop, r.step, dtype=np.int64))
            # Only the frames' buffer: `_fill` gathers as many arrays as it is given.
            return self._fill(starts, [self._arrays[0].new_buffer(len(starts))])["frames"]
        s = self.start(i)
        return self.frames[s : s + self.window]

    def target(self, name: str, i: int) -> Any:
        """Target ``name`` of window ``i``: a view of ``(W, ...)`` or ``(...)``."""
        if not isinstance(name, str) or name not in self.targets:
            raise ArgumentError(
                f"name must be one of the targets {list(self.targets)}; got {name!r}"
            )
        s = self.start(i)
        k = self.target_offset[name]
        data = self.targets[name]
        return data[s : s + self.window] if k is None else data[s + self.window - 1 + k]

    def take(self, indices: Any) -> dict[str, Any]:
        """Gathers windows ``indices`` into a new batch.

        Args:
            indices: ``(B,)`` window indices (ints; negative count from the end).

        Returns:
            ``{"frames": (B, W, D), name: (B, W, ...) or (B, ...)}``, in the
            frames' library, dtype and device.

        Raises:
            IndexError: an index is out of range (never clamped).
        """
        starts = self._layout.starts(_index_array(indices))
        return self._fill(starts, self._buffers(len(starts)))

    def _buffers(self, n: int, pin: bool = False) -> list[tuple[Any, np.ndarray | None]]:
        return [a.new_buffer(n, pin) for a in self._arrays]

    def _fill(self, starts: Any, buffers: list[tuple[Any, np.ndarray | None]]) -> dict[str, Any]:
        """Gathers the windows at frame ``starts`` into (prefixes of) ``buffers``."""
        b = len(starts)
        if self.device is not None and self.device.type != "cpu" and isinstance(starts, np.ndarray):
            import torch

            starts = torch.from_numpy(starts).to(self.device)
        out = {}
        for a, (user, raw) in zip(self._arrays, buffers, strict=False):
            user, raw = user[:b], (raw[:b] if raw is not None else None)
            a.gather(starts, user, raw)
            out[a.name] = user
        return out

    # ------------------------------------------------------------ batches

    def batches(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: Any = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        reuse_buffers: bool = True,
    ) -> WindowBatches:
        """Iterates over this rank's batches of one epoch.

        The order is a permutation of the windows seeded by ``(seed, epoch)``
        (SplitMix64 + Fisher-Yates, documented in the Rust core,
        ``rust/src/windows/order.rs``): the same on every OS, CPU and device,
        and held as 4 bytes per window (8 beyond 2**31 frames), never as Python
        objects.

        Sharding follows ``torch.utils.data.DistributedSampler``: each rank
        gets ``ceil(len / world_size)`` windows, the permuted list being padded
        by repeating its first windows (so up to ``world_size - 1`` windows
        are seen twice per epoch); with ``drop_last`` each rank gets
        ``floor(len / world_size)`` (the last windows of the permutation are
        skipped) and a last partial batch is dropped too. Every rank yields
        the same number of batches.

        Args:
            batch_size: Windows per batch, ``>= 1`` (past this rank's windows: one
                batch of all of them; buffers never hold more).
            shuffle: Permute the windows (else in order).
            seed: Seed in ``[0, 2**64)``.
            epoch: Epoch number; each epoch has its own order.
            drop_last: See above.
            rank: This process's rank, ``0 <= rank < world_size``.
            world_size: Number of ranks.
            device: Torch device to move CPU batches to (``None``: stay where the
                frames are); one that is not available here raises ArgumentError.
                CUDA frames are always gathered on their device.
            prefetch: Batches prepared ahead in a background thread (0: gather
                on demand; at most the epoch's other batches are). The Rust
                gather releases the GIL, so it runs while the training step does.
            pin_memory: Gather CPU batches into page-locked memory (torch) so
                the copy to ``device`` is asynchronous.
            reuse_buffers: Gather into a ring of ``prefetch + 1`` buffers
                reused across batches: a yielded batch stays valid until the
                iterator is advanced again; keep a copy to hold it longer.
                ``False``: fresh arrays every batch.

        Returns:
            A :class:`WindowBatches` iterator of dicts ``{"frames": (B, W, D),
            name: (B, W, ...) or (B, ...)}`` with ``len()`` batches.
        """
        # (the native layout takes int64 epoch, rank and world size: past it a
        # bare OverflowError; a batch size or prefetch past the windows is
        # allowed, the iterator sizes its buffers by what a batch can hold)
        return WindowBatches(
            self,
            _int("batch_size", batch_size, 1),
            bool(shuffle),
            _int("seed", seed, 0),
            _int("epoch", epoch, 0, _I64_MAX),
            bool(drop_last),
            _int("rank", rank, 0, _I64_MAX),
            _int("world_size", world_size, 1, _I64_MAX),
            device,
            _int("prefetch", prefetch, 0),
            bool(pin_memory),
            bool(reuse_buffers),
        )

    def epoch_order(
        self,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> np.ndarray:
        """Window indices this rank visits in ``epoch``, in order (int64); see :meth:`batches`."""
        if not 0 <= _int("seed", seed) < 2**64:
            raise ArgumentError(f"seed must be in [0, 2**64); got {seed}")
        return self._layout.epoch_order(
            bool(shuffle),
            seed,
            _int("epoch", epoch, 0, _I64_MAX),
            _int("rank", rank, 0, _I64_MAX),
            _int("world_size", world_size, 1, _I64_MAX),
            bool(drop_last),
        )

    # ------------------------------------------------------------ eager mode

    def window_bytes(self) -> int:
        """Bytes one window and its targets take in a batch."""
        return sum(a.rows * a.row_bytes for a in self._arrays)

    def memory_plan(
        self,
        batch_size: int = 256,
        prefetch: int = 2,
        available: int | None = None,
        headroom: float = 0.8,
    ) -> MemoryPlan:
        """Reports the memory each mode needs and picks one.

        Eager (every window materialised, :meth:`materialize`) is picked only
        when it fits in ``headroom`` of the memory available; otherwise lazy.

        Args:
            batch_size: Windows per batch of the lazy mode.
            prefetch: Batches prepared ahead in the lazy mode.
            available: Bytes available (default: :func:`available_memory` of
                the frames' device).
            headroom: Fraction of ``available`` eager may use.

        Raises:
            ArgumentError: ``batch_size`` below 1, ``prefetch`` or ``available``
                negative or not integers, ``headroom`` not a finite number > 0.
        """
        batch_size = _int("batch_size", batch_size, 1)
        prefetch = _int("prefetch", prefetch, 0)
        if available is not None:
            available = _int("available", available, 0)
        # (a string headroom once made `headroom * avail` a string of avail
        # characters: a hang, then a MemoryError)
        if (
            isinstance(headroom, (bool, np.bool_))
            or not isinstance(headroom, (int, float, np.integer, np.floating))
            or not (math.isfinite(headroom) and headroom > 0)
        ):
            raise ArgumentError(f"headroom must be a finite number > 0; got {_shown(headroom)}")
        frames_bytes = sum(a.data.shape[0] * a.row_bytes for a in self._arrays)
        m = len(self)
        eager = m * self.window_bytes()
        order = 4 if self.num_frames < 2**31 else 8  # bytes per window of the epoch order
        lazy = frames_bytes + (prefetch + 1) * batch_size * self.window_bytes() + order * m
        avail = available_memory(self.device) if available is None else int(available)
        mode = "eager" if frames_bytes + eager <= headroom * avail else "lazy"
        return MemoryPlan(mode, frames_bytes, eager, lazy, avail, m)

    def materialize(
        self, force: bool = False, chunk: int = 4096, available: int | None = None
    ) -> dict[str, Any]:
        """Every window at once (eager mode, for comparison): ``{"frames": (M, W, D), ...}``.

        Args:
            force: Build even when :meth:`memory_plan` says it would not fit.
            chunk: Windows gathered per call.
            available: Bytes available (default: measured, see :meth:`memory_plan`).

        Raises:
            WindowMemoryError: eager would not fit and ``force`` is False.
            ArgumentError: ``chunk`` is not a positive integer.
        """
        chunk = _int("chunk", chunk, 1)
        plan = self.memory_plan(available=available)  # (which checks `available`)
        if plan.mode != "eager" and not force:
            raise WindowMemoryError(f"materialize would not fit: {plan}; use batches()")
        m = len(self)
        buffers = self._buffers(m)
        all_starts = self._layout.all_starts()
        for lo in range(0, m, chunk):
            part = [
                (u[lo : lo + chunk], r[lo : lo + chunk] if r is not None else None)
                for u, r in buffers
            ]
            self._fill(all_starts[lo : lo + chunk], part)
        return {a.name: u for a, (u, _) in zip(self._arrays, buffers, strict=False)}

    # ------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> None:
        """Writes frames, episodes, targets and settings to one safetensors file.

        The JSON metadata carries a format version; the file is written to a
        temporary name and renamed, so a failed save leaves an old file intact
        (a pipe or device such as ``/dev/null`` is written in place).
        CUDA tensors are copied to the host to be written.
        """
        from ._windows_store import save

        save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> SlidingWindows:
        """Reads a file written by :meth:`save`, validating every field.

        Args:
            path: The file.
            mmap: Map the arrays from the file (``np.memmap``, read-only, paged
                in as windows are read) instead of reading them into memory.
                Files written since tensors are aligned map every array; an
                array stored misaligned (files of older versions) is copied.
                Such an object pickles as a reference to the file (see the
                class docstring); with ``mmap=False`` the arrays pickle by value.
                bfloat16 arrays become torch tensors (numpy has no bfloat16),
                mapped copy-on-write with ``mmap`` (writes stay private), and a
                file with a bfloat16 target gives torch frames, as the object
                saved had.

        Raises:
            OSError: the file cannot be read (``FileNotFoundError``...), as from ``open``.
            FormatError: the file is malformed, truncated, inconsistent or of
                another format version, or changed while it was being read.
        """
        from ._windows_store import load

        return load(path, mmap=mmap)

    # ------------------------------------------------------------ torch

    def as_dataset(self) -> Any:
        """A ``torch.utils.data.Dataset`` of these windows, with batched ``__getitems__``.

        Use it with ``DataLoader(ds, batch_size=B, sampler=..., collate_fn=ds.collate)``
        (``DistributedSampler`` works as a sampler): each batch is one Rust
        gather. The dataset pickles (see the class docstring), so DataLoader
        workers work with every start method, ``"spawn"`` and ``"forkserver"``
        included. See :class:`neuropil._windows_torch.WindowDataset`.
        """
        from ._windows_torch import WindowDataset

        return WindowDataset(self)


# The iterator lives in its own module; it needs the helpers above.
from ._windows_batches import WindowBatches  # noqa: E402

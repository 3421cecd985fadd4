"""FlyHash sparse codes and exact search over packed binary codes.

FlyHash (Dasgupta, Stevens, Navlakha, *Science* 2017) expands a ``d``-dimensional
input to ``m >> d`` outputs through a random projection and keeps the ``k``
largest (winner-take-all): a locality-sensitive sparse code. The projection is
stored compactly (``sign``: 1 bit per weight; ``sparse``: ``uint16`` indices and
sign bits; ``seeded``: nothing) and generated from ``seed`` by SplitMix64, a
counter-based integer generator, so a seed gives the same projection bytes and
codes on every OS, SIMD level and device.

Example:
    >>> import numpy as np
    >>> from neuropil.flyhash import FlyHash, BinaryIndex
    >>> fh = FlyHash(384, expansion_ratio=13.0, active_fraction=0.05, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((100, 384), dtype=np.float32)
    >>> codes = fh.hash(x)                       # (100, 624) uint8, faiss layout
    >>> index = BinaryIndex(fh.output_dim)
    >>> index.add(codes)
    >>> distances, ids = index.search(codes[:3], k=5)
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _native
from .errors import ArgumentError, DTypeError, FormatError, ShapeError, _check_level, _shown

__all__ = ["BinaryIndex", "FlyHash"]

_PROJECTIONS = ("sign", "sparse", "seeded")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


_I64_MAX = 2**63 - 1


def _check_int(name: str, value: Any, low: int, high: int = _I64_MAX) -> int:
    # (the default bound is the bindings' int64: past it they raise a bare OverflowError)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{name} must be an integer; got {_shown(value)}")
    value = int(value)
    if value < low or value > high:
        bound = f">= {low}" if value < low and high == _I64_MAX else f"in [{low}, {high}]"
        raise ArgumentError(f"{name} must be an integer {bound}; got {value}")
    return value


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"{name} must be a number; got {_shown(value)}")
    try:
        return float(value)
    except OverflowError:  # an int past float's range (10**400)
        raise ArgumentError(f"{name} must be a finite number; got {value}") from None


def _rows(x: Any, name: str = "x", d: int | None = None, want: str = "floats") -> tuple[Any, bool]:
    """``x`` as a 2-D array-like and whether it was 1-D (of length ``d``, if given).

    ``want`` describes the element type in messages: a ragged list is a
    ShapeError, and a value that is no array of numbers at all (a string,
    None) a DTypeError naming what it is, rather than a shape ``()``."""
    if not hasattr(x, "ndim"):
        try:
            arr = np.asarray(x)
        except ValueError as e:  # ragged nested lists
            raise ShapeError(
                f"{name} must have shape (d,) or (n, d) of {want}; got a ragged sequence ({e})"
            ) from None
        if arr.ndim == 0 and arr.dtype.kind not in "biufc":
            raise DTypeError(f"{name} must be an array of {want}; got {type(x).__name__}")
        x = arr
    if x.ndim == 1:
        if d is not None and x.shape[0] != d:
            raise ShapeError(f"{name} must have shape ({d},) or (n, {d}); got {tuple(x.shape)}")
        return x[None, :], True
    if x.ndim != 2:
        raise ShapeError(f"{name} must have shape (d,) or (n, d); got {tuple(x.shape)}")
    return x, False


class FlyHash:
    """A FlyHash encoder: random expansion ``d -> m`` then the top ``k`` (winner-take-all).

    Args:
        input_dim: ``d``, the input dimension.
        expansion_ratio: ``m = floor(d * expansion_ratio)`` outputs.
        active_fraction: ``k = floor(m * active_fraction)`` winners (1 <= k <= m).
        seed: Seed of the projection (an integer in [0, 2**64)); ``None`` draws one
            from the OS (read it back from :attr:`seed`).
        projection: ``"sign"`` (dense ±1, 1 bit per weight), ``"sparse"``
            (``round(connectivity * d)`` inputs per output, ``uint16`` indices and
            sign bits) or ``"seeded"`` (the ``sign`` projection of the same seed,
            regenerated during encode: nothing stored, same codes, slower).
        connectivity: Fraction of the inputs each output of a ``sparse`` projection reads
            (in (0, 1], checked whatever the projection: a NaN is never kept).
        binary: ``sparse`` only: 0/1 weights (the paper's), instead of ±1.

    Winner-take-all keeps the ``k`` largest activations; ties go to the lowest
    output index. The generator is SplitMix64: row ``r`` uses the stream
    started at output ``r`` of the stream started at ``seed`` (see the core
    crate's ``flyhash::rng`` for the exact bit layout).

    Raises:
        ArgumentError: a parameter is out of range, e.g. ``active_fraction`` that
            gives 0 winners or more winners than outputs, ``connectivity`` outside
            (0, 1], a stored projection that would need more than 8 GiB, or
            (``"seeded"``, which stores none) more than 2**32 - 1 outputs.

    Pickles and deep-copies as its constructor call (the arguments and :attr:`seed`;
    the projection is regenerated from them, identical, and validated as here).
    """

    def __init__(
        self,
        input_dim: int,
        expansion_ratio: float = 13.0,
        active_fraction: float = 0.05,
        seed: int | None = None,
        projection: str = "sign",
        connectivity: float = 0.1,
        binary: bool = False,
    ) -> None:
        input_dim = _check_int("input_dim", input_dim, 1)
        if seed is None:
            seed = secrets.randbits(64)
        seed = _check_int("seed", seed, 0, 2**64 - 1)
        if projection not in _PROJECTIONS:
            raise ArgumentError(f"projection must be one of {_PROJECTIONS}; got {projection!r}")
        if not isinstance(binary, (bool, np.bool_)):
            raise ArgumentError(f"binary must be True or False; got {binary!r}")
        self._native = _native.FlyHash(
            input_dim,
            _check_float("expansion_ratio", expansion_ratio),
            _check_float("active_fraction", active_fraction),
            seed,
            projection,
            _check_float("connectivity", connectivity),
            bool(binary),
        )
        self._torch_cache: dict[str, Any] = {}

    @classmethod
    def _wrap(cls, native: _native.FlyHash) -> FlyHash:
        obj = cls.__new__(cls)
        obj._native = native
        obj._torch_cache = {}
        return obj

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # The projection is a function of these (load checks a file's against
        # them), so the constructor rebuilds it bit for bit; plain data only.
        n = self._native
        args = (n.input_dim, n.expansion_ratio, n.active_fraction, n.seed, n.projection,
                n.connectivity, n.binary)  # fmt: skip
        return (type(self), args)

    # ------------------------------------------------------------------ attributes
    @property
    def input_dim(self) -> int:
        """``d``."""
        return self._native.input_dim

    @property
    def output_dim(self) -> int:
        """``m``, the number of outputs (bits of a code)."""
        return self._native.output_dim

    @property
    def active_bits(self) -> int:
        """``k``, the winners per code."""
        return self._native.active_bits

    @property
    def seed(self) -> int:
        """The seed the projection was generated from."""
        return self._native.seed

    @property
    def projection(self) -> str:
        """``"sign"``, ``"sparse"`` or ``"seeded"``."""
        return self._native.projection

    @property
    def expansion_ratio(self) -> float:
        return self._native.expansion_ratio

    @property
    def active_fraction(self) -> float:
        return self._native.active_fraction

    @property
    def connectivity(self) -> float:
        return self._native.connectivity

    @property
    def connections(self) -> int:
        """Inputs per output of a sparse projection (0 otherwise)."""
        return self._native.connections

    @property
    def binary(self) -> bool:
        return self._native.binary

    @property
    def memory_bytes(self) -> int:
        """Bytes the projection occupies (0 for ``seeded``)."""
        return self._native.memory_bytes

    @property
    def code_bytes(self) -> int:
        """Bytes of one packed code, ``ceil(m / 8)``."""
        return (self.output_dim + 7) // 8

    def __repr__(self) -> str:
        extra = (
            f", connectivity={self.connectivity}, binary={self.binary}"
            if self.projection == "sparse"
            else ""
        )
        return (
            f"FlyHash(input_dim={self.input_dim}, output_dim={self.output_dim}, "
            f"active_bits={self.active_bits}, projection={self.projection!r}{extra}, "
            f"seed={self.seed})"
        )

    def projection_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """The projection as arrays (regenerated for ``seeded``).

        Returns:
            ``{"sign_bits": (m, ceil(d/64)*8) uint8}`` for ``sign``/``seeded``
            (bit ``i % 8`` of byte ``i // 8`` of a row set = weight +1 on input
            ``i``), or ``{"indices": (m, c) uint16, "signs": (m, ceil(c/8)) uint8}``
            for ``sparse`` (+1 connections first, then -1; sign bit set = -1).
        """
        return dict(self._native.projection_arrays())

    # ------------------------------------------------------------------ encoding
    def _run(self, x: Any, want: str, level: str | None) -> Any:
        _check_level(level)
        x2, one = _rows(x, d=self.input_dim)
        if _is_torch(x2) and x2.device.type != "cpu":
            from . import _flyhash_torch

            out = _flyhash_torch.encode(self, x2, want)
            return out[0] if one else out
        # The core's output limit, checked before any conversion: a float64,
        # strided or broadcast x is copied to float32 first, which for an
        # output over the limit is memory spent (or the process killed) in vain.
        self._native.check_rows(int(x2.shape[0]), want)
        if _is_torch(x2):
            import torch

            if x2.is_floating_point() and x2.dtype != torch.float32:
                x2 = x2.float()
            res = getattr(self._native, want)(x2.detach().contiguous().numpy(), level)
            t = torch.from_numpy(res.astype(np.int64) if res.dtype == np.uint32 else res)
            return t[0] if one else t
        out = getattr(self._native, want)(x2, level)
        return out[0] if one else out

    def encode(self, x: Any, level: str | None = None) -> Any:
        """Sparse code with the winners' activations.

        Args:
            x: ``(d,)`` or ``(n, d)`` floats (numpy, torch CPU/CUDA, lists). float32
                C-contiguous numpy input is read in place; other floats are
                converted once; NaN/Inf are refused. ``n`` may be 0: every method
                then returns its ``(0, ...)`` output, of its usual dtype.
            level: Force a SIMD level (``"scalar"``, ``"avx2"``, ``"avx512"``) for
                this call; the result is identical at every level.

        Returns:
            ``(m,)`` or ``(n, m)`` float32: the ``k`` winners' activations, zeros
            elsewhere (a torch tensor on the input's device for torch input).
        """
        return self._run(x, "encode", level)

    def activations(self, x: Any, level: str | None = None) -> Any:
        """All ``m`` activations before winner-take-all: ``(m,)`` or ``(n, m)`` float32."""
        return self._run(x, "activations", level)

    def encode_indices(self, x: Any, level: str | None = None) -> Any:
        """The winners' output indices, ascending.

        Returns:
            ``(k,)`` or ``(n, k)`` uint32 (int64 for torch input).
        """
        return self._run(x, "encode_indices", level)

    def hash(self, x: Any, level: str | None = None) -> Any:
        """Packed binary codes: winner ``j`` sets bit ``j % 8`` of byte ``j // 8``.

        This is faiss's binary layout: the codes go straight into
        :class:`BinaryIndex` or ``faiss.IndexBinaryFlat(m)`` (when ``m % 8 == 0``).

        Returns:
            ``(ceil(m/8),)`` or ``(n, ceil(m/8))`` uint8.
        """
        return self._run(x, "hash", level)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the encoder to a safetensors file (configuration in the metadata,
        format version 1), through a temporary file and a rename."""
        self._native.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FlyHash:
        """Reads an encoder written by :meth:`save`.

        Raises:
            OSError: the file cannot be read (``FileNotFoundError``...), as from ``open``.
            FormatError: the file is not a FlyHash file, is truncated, has a
                malformed or unknown field, or its projection differs from the one
                its seed generates.
        """
        return cls._wrap(_native.FlyHash.load(os.fspath(path)))


def _ids(ids: Any, drop_above: bool) -> Any:
    """``ids`` as numpy (torch tensors through ``.numpy()``), uint64 as int64 by value.

    numpy's "safe" casting refuses uint64 -> int64 whatever the values, so a
    uint64 array of small ids would be refused as not an integer array. Values
    past int64 are an ArgumentError for :meth:`BinaryIndex.add`, raised here
    (the int64 cast would wrap them to negative ids) with the core's message
    for any out-of-range id: ids must be below ``2**63 - 1`` (the core keeps
    that last value free for the next automatic id, so it refuses it too). For
    :meth:`BinaryIndex.remove` they are dropped (no stored id can equal them).
    """
    if _is_torch(ids):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.dtype != np.uint64:
        return ids if isinstance(ids, np.ndarray) else arr
    big = arr > _I64_MAX
    if big.any():
        if not drop_above:
            # (the core's words: it refuses 2**63 - 1 itself, see the docstring)
            raise ArgumentError(
                f"ids must be non-negative integers below {_I64_MAX}; got {int(arr[big][0])}"
            )
        arr = arr[~big]
    return arr.astype(np.int64)


class BinaryIndex:
    """Exact search over packed binary codes (faiss's bit layout).

    Each code gets a stable ``int64`` id: the ones passed to :meth:`add`, or
    automatic ones counting up from one past the largest id added so far (0, 1, 2, ...
    when every id is automatic). Ids need not be distinct (as in faiss):
    :meth:`remove` removes every code holding a given id and never renumbers
    the others.
    Results are ordered by distance, ties by insertion order. Distances use the
    AVX-512 VPOPCNTDQ popcount where the CPU has it (``popcnt`` or portable code
    otherwise; identical results).

    Args:
        nbits: Bits per code (``ceil(nbits / 8)`` bytes; bits past ``nbits`` must be 0).

    Pickles and deep-copies as the bytes :meth:`save` writes (codes, ids and the
    next automatic id), validated as :meth:`load` validates a file.
    """

    def __init__(self, nbits: int) -> None:
        self._native = _native.BinaryIndex(_check_int("nbits", nbits, 1))

    def __getstate__(self) -> dict[str, bytes]:
        # Taken under the index's lock, so a concurrent add/remove lands whole or not at all.
        return {"safetensors": self._native.to_bytes()}

    def __setstate__(self, state: Any) -> None:
        if not (
            isinstance(state, dict)
            and list(state) == ["safetensors"]
            and isinstance(state["safetensors"], bytes)
        ):
            found = (
                {k: type(v).__name__ for k, v in state.items()}
                if isinstance(state, dict)
                else type(state).__name__
            )
            raise FormatError(f"BinaryIndex state must be {{'safetensors': bytes}}; got {found}")
        self._native = _native.BinaryIndex.from_bytes(state["safetensors"])

    @property
    def nbits(self) -> int:
        return self._native.nbits

    @property
    def code_bytes(self) -> int:
        return self._native.code_bytes

    def __len__(self) -> int:
        return len(self._native)

    def __repr__(self) -> str:
        return f"BinaryIndex(nbits={self.nbits}, len={len(self)})"

    @staticmethod
    def _codes(codes: Any, name: str) -> Any:
        if _is_torch(codes):
            codes = codes.detach().cpu().numpy()
        return _rows(codes, name, want="uint8 codes")[0]

    def add(self, codes: Any, ids: Any = None) -> None:
        """Adds ``(n, code_bytes)`` uint8 codes, with optional ``(n,)`` non-negative ids
        (any integer dtype, uint64 included, checked by value).

        Raises:
            ShapeError: the codes do not have ``code_bytes`` columns, or ``ids``
                is not ``(n,)``.
            DTypeError: the codes are not uint8 or the ids not integers.
            ArgumentError: bits past ``nbits`` are set, or an id is negative or
                at least ``2**63 - 1``.
        """
        if ids is not None:
            ids = _ids(ids, drop_above=False)
        self._native.add(self._codes(codes, "codes"), ids)

    def search(self, queries: Any, k: int, metric: str = "hamming") -> tuple[Any, Any]:
        """The ``k`` nearest codes of each query.

        Args:
            queries: ``(nq, code_bytes)`` or ``(code_bytes,)`` uint8.
            k: Neighbours per query; missing ones (fewer codes than ``k``) get id
                -1 and distance ``2**31 - 1`` (Hamming) or ``inf`` (Jaccard).
            metric: ``"hamming"`` (differing bits, int32) or ``"jaccard"``
                (``1 - |a & b| / |a | b|``, float32; 0 between two empty codes).

        Returns:
            ``(distances, ids)``, both ``(nq, k)``; ids are int64.
        """
        k = _check_int("k", k, 1)
        if not isinstance(metric, str):
            raise ArgumentError(f"metric must be 'hamming' or 'jaccard'; got {_shown(metric)}")
        return self._native.search(self._codes(queries, "queries"), k, metric)

    def range_search(self, queries: Any, max_distance: int) -> tuple[Any, Any, Any]:
        """Every code within Hamming distance ``max_distance`` (inclusive) of each query.

        faiss's form: query ``i``'s results are ``distances[lims[i]:lims[i+1]]`` and
        ``ids[lims[i]:lims[i+1]]``, here sorted nearest first. (faiss's ``radius``
        is exclusive: ``radius = max_distance + 1``.)

        Returns:
            ``(lims (nq+1,) int64, distances (total,) int32, ids (total,) int64)``.
        """
        max_distance = _check_int("max_distance", max_distance, 0, 2**32 - 1)
        return self._native.range_search(self._codes(queries, "queries"), max_distance)

    def remove(self, ids: Any) -> int:
        """Removes the codes with these ids; returns how many were removed.

        Absent ids are skipped and a repeated id counts once. The other codes
        keep their ids (faiss's ``IndexBinaryFlat.remove_ids`` renumbers the
        codes after a removed one; here ids are stable, as in ``IndexBinaryIDMap``).
        """
        try:
            shape = np.shape(ids)
        except ValueError:  # ragged nested lists
            raise ShapeError(
                "ids must have shape (n,) or be one id; got a ragged sequence"
            ) from None
        if len(shape) > 1:  # (as add's ids: a matrix is no list of ids)
            raise ShapeError(f"ids must have shape (n,) or be one id; got {shape}")
        arr = np.atleast_1d(_ids(ids, drop_above=True))
        if arr.size == 0:
            return 0
        return self._native.remove(arr)

    def contents(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """Copies of the stored ``(codes (n, code_bytes) uint8, ids (n,) int64)``."""
        return self._native.contents()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes codes and ids to a safetensors file (temporary file + rename)."""
        self._native.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BinaryIndex:
        """Reads an index written by :meth:`save`; ``FormatError`` on any malformed field."""
        obj = cls.__new__(cls)
        obj._native = _native.BinaryIndex.load(os.fspath(path))
        return obj

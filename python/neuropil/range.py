"""Exact halfspace range search over keys: every key with ``q . k >= t``.

:class:`RangeIndex` answers, for a batch of queries each with its own
threshold, *every* key whose score reaches the threshold and nothing else, in
faiss's ``range_search`` layout; :meth:`RangeIndex.topk` returns the ``k`` best.
It is built for attention keys of language models: the ``quant`` method (what
the default, ``auto``, runs while pruning pays) bounds every ``q . k`` from
above by an exact integer dot product of 8-bit codes of key and query in the
keys' principal basis, plus the quantisation error, and computes the float
score only of keys whose bound
reaches the threshold (a median of 1.6-2.0% of them at a top-1% threshold on
SmolLM2 keys, BENCHMARKS.md). ``pca`` bounds by ``q.mu + q_p . k_p + |q_r| |k_r|`` over the top
principal directions under a k-d tree; ``kmeans`` is the original
hierarchical k-means with exact radii; ``flat`` scans everything.

Scores are one FMA chain in dimension order, identical on every SIMD level and
for every method, so the answer is exactly the set a full scan in that order
gives. Against another summation order (numpy's BLAS, float64) scores differ
by rounding only: a key is a tie when ``|q . k - t| <= 2 d 2^-24 |q| |k|``,
and ties may fall on either side; every other key is classified identically.

Scores are float32, so all of this holds while every ``q . k`` (and every
partial sum of it) stays finite in float32. Searches check the sufficient
condition ``max |q| * max |k| <= 3.4e38`` (Euclidean norms, by Cauchy-Schwarz)
and raise :class:`~neuropil.ArgumentError` when it fails (keys and queries
around ``1e19`` in every component, say): scale them down first.

CUDA tensors take a torch path on their device (dense matmul + threshold on
the GPU, the fastest exact method there); answers come back as tensors on that
device.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
from typing import Any

import numpy as np

from . import _native, _safetensors
from ._scoped import no_tf32
from .errors import (
    ArgumentError,
    DTypeError,
    FormatError,
    ShapeError,
    _check_format_version,
    _non_finite,
    _real,
    _shown,
)

__all__ = ["FORMAT_VERSION", "METHODS", "RangeIndex"]

#: Version written into saved files; :meth:`RangeIndex.load` accepts only this one.
FORMAT_VERSION = 1
#: Index methods: ``auto`` (default), ``quant``, ``pca``, ``kmeans``, ``flat``.
METHODS = ("auto", "quant", "pca", "kmeans", "flat")
_FORMAT_NAME = "neuropil.range"


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "device")


def _is_cuda(x: Any) -> bool:
    return _is_torch(x) and x.device.type == "cuda"


class RangeIndex:
    """An exact range-search index over keys ``(n, d)``.

    Args:
        keys: ``(n, d)`` float array (numpy, CPU or CUDA torch tensor), finite,
            ``n >= 1``. float32 C-contiguous numpy input is read in place while
            building; other float dtypes (torch bfloat16 and float16 included)
            are converted to float32 once. The index keeps its own blocked copy.
        method: ``"auto"`` (``quant`` that falls back to a full SIMD scan while
            pruning does not pay, measured on the searches themselves),
            ``"quant"``, ``"pca"``, ``"kmeans"`` (hierarchical k-means with exact
            radii, the original design) or ``"flat"``.
        leaf: Keys per tree leaf (rounded up to a multiple of 16).
        branching: Children per ``kmeans`` node.
        rebuild_fraction: Keys appended by :meth:`add` are scanned in full
            until they exceed this fraction of the indexed keys (and
            ``rebuild_min``); the index is then rebuilt.
        rebuild_min: See ``rebuild_fraction``.
        seed: Seed of the k-means++ seeding (SplitMix64 generator; the same
            seed gives the same tree on every OS and CPU level). ``pca`` is
            deterministic without one.

    Raises:
        ShapeError: ``keys`` is not 2-D or is empty.
        DTypeError: ``keys`` is not a float array.
        ArgumentError: non-finite keys, unknown ``method``, bad parameters.

    Pickles and deep-copies as plain data: the keys (float32, on the CPU), the build
    parameters, how many keys the tree holds (the rest stay appended) and the
    build count; the copy is rebuilt, identical, and checked as :meth:`load`
    checks a file. A CUDA index comes back on its device (which must exist
    where it is unpickled). ``auto``'s running measure of pruning work restarts
    (as after :meth:`load`): answers are the same, ``last_scanned`` may differ.
    """

    def __init__(
        self,
        keys: Any,
        method: str = "auto",
        *,
        leaf: int = 64,
        branching: int = 8,
        rebuild_fraction: float = 0.25,
        rebuild_min: int = 256,
        seed: int = 0,
    ) -> None:
        if method not in METHODS:
            raise ArgumentError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        for name, v, lo, hi in [
            ("leaf", leaf, 1, _USIZE_MAX),
            ("branching", branching, 2, _USIZE_MAX),
            ("rebuild_min", rebuild_min, 0, _USIZE_MAX),
            ("seed", seed, 0, _U64_MAX),
        ]:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ArgumentError(f"{name} must be an integer >= {lo}; got {_shown(v)}")
            if v > hi:
                raise ArgumentError(
                    f"{name} must be an integer between {lo} and {hi}; got {_shown(v)}"
                )
        self._params: dict[str, Any] = {
            "method": method,
            "leaf": int(leaf),
            "branching": int(branching),
            "rebuild_fraction": _real("rebuild_fraction", rebuild_fraction, "a positive number"),
            "rebuild_min": int(rebuild_min),
            "seed": int(seed),
        }
        self._torch: _TorchRange | None = None
        self._native: Any = None
        #: Builds before this object's own (a copy's), added to ``stats["builds"]``.
        self._builds_base = 0
        #: CPU index: an upper bound of the key norms so far, sqrt(d) max |k_i|
        #: (cheap: the float32 overflow check of queries, exact only near the
        #: limit). Never below the norm of a key a search can see: :meth:`add`
        #: raises it before its keys become visible. (The torch path keeps its
        #: bound with its keys, in one snapshot.)
        self._key_bound = 0.0
        #: Serialises :meth:`add` (the bound's raise, the core's append, and
        #: the bound's restore if the append fails); searches never take it.
        self._lock = threading.Lock()
        if _is_cuda(keys):
            self._torch = _TorchRange(keys)
        else:
            host = _host(keys, "keys")
            self._native = _native._RangeIndex(host, **self._params)
            self._key_bound = _norm_bound(host)

    # ------------------------------------------------------------------ queries
    def search(self, queries: Any, thresholds: Any) -> tuple[Any, Any, Any]:
        """Every key with ``queries[i] . k >= thresholds[i]``.

        Args:
            queries: ``(nq, d)`` float array; ``nq`` may be 0 (an empty batch:
                ``lims == [0]`` and empty ``ids`` and ``scores``, as from faiss).
            thresholds: ``(nq,)`` float array, or one number for all queries (a Python
                or numpy scalar, a 0-d array or tensor). Integer and float64
                thresholds that float32 does not hold are rounded up to the
                next float32: scores are float32, so the hits are exactly the
                keys whose score is ``>= t`` (rounding to the nearest would let
                in the scores between the two).

        Returns:
            ``(lims, ids, scores)`` as faiss's ``range_search``: the hits of query
            ``i`` are ``ids[lims[i]:lims[i+1]]`` (int64, ascending) with their
            float32 ``scores``. numpy arrays, or torch tensors on the input's
            device for torch input. The fraction of keys scored in full per query
            is in ``self.last_scanned`` (the object's latest call: with threads
            searching one index at once, possibly another thread's).

        Raises:
            ShapeError: wrong ranks, ``d`` mismatch, thresholds of the wrong length.
            ArgumentError: NaN or Inf in queries or thresholds, thresholds
                beyond the float32 range, or scores that may overflow float32
                (``max |q| * max |k| > 3.4e38``).
            DTypeError: bool, complex or other non-numeric thresholds.
        """
        want_torch = _is_torch(queries)
        if self._torch is not None:
            return self._torch.search(queries, thresholds, self)
        q = _host(queries, "queries")
        t = _thresholds(thresholds, q)
        native = self._native
        lims, ids, scores, scanned, work = native.search(q, t)
        # (the bound read after the search: see _check_overflow)
        self._check_overflow(q, self._key_bound, native.keys)
        self.last_scanned = scanned
        self.last_work = work
        return _like(queries, want_torch, lims, ids, scores)

    def topk(self, queries: Any, k: int) -> tuple[Any, Any]:
        """The ``k`` keys of highest score per query, best first (ties: lower id).

        Args:
            queries: ``(nq, d)`` float array; ``nq`` may be 0.
            k: ``1 <= k <= len(self)``.

        Returns:
            ``(ids, scores)``: int64 and float32, shape ``(nq, k)`` (``(0, k)``
            for no queries).

        Raises:
            ArgumentError: ``k`` out of range, or as :meth:`search`.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ArgumentError(f"k must be an integer; got {k!r}")
        if not 1 <= k <= len(self):
            raise ArgumentError(
                f"k must be between 1 and the number of keys ({len(self)}); got {k}"
            )
        if self._torch is not None:
            return self._torch.topk(queries, int(k), self)
        q = _host(queries, "queries")
        native = self._native
        ids, scores, scanned = native.topk(q, int(k))
        self._check_overflow(q, self._key_bound, native.keys)
        self.last_scanned = scanned
        return _like(queries, _is_torch(queries), ids, scores)

    def add(self, keys: Any) -> None:
        """Appends keys ``(m, d)``; they get ids ``len(self) .. len(self) + m - 1``.

        ``m`` may be 0: nothing is appended (the index must be built from at
        least one key, more may come in any number)."""
        if self._torch is not None:
            self._torch.add(keys)
            return
        host = _host(keys, "keys")
        with self._lock:
            before = self._key_bound
            # Raised before the core appends: a search that sees the new keys
            # (the bound is read after the search) is checked against them. A
            # search in between sees a bound too large for its keys, which only
            # sends it to the exact check of the keys it searched (no false error).
            self._key_bound = max(before, _added_bound(host))
            try:
                self._native.add(host)
            except BaseException:
                # Nothing was appended; adds hold the lock, so no other add
                # raised the bound meanwhile and the old one still covers every key.
                self._key_bound = before
                raise

    def _check_overflow(self, q: Any, bound: float, keys: Any) -> None:
        """Raises if some ``q . k`` (or a partial sum) may overflow float32;
        ``q`` has passed the core's checks (2-D, float, finite). A per-call
        cost of decoding (one search per head and token): the bounds
        ``sqrt(d) max |x_i|`` first (~1 us), the exact norms only near the limit.

        ``bound`` and ``keys`` (a callable giving them: a copy on the CPU) must
        cover every key the search scored: the torch path's snapshot, or on
        the CPU the core searched, with the bound read after the search (keys
        are only ever added, and each add raises the bound before its keys
        become visible). A key added after the search may count too: its
        error is the one an add before the search would give."""
        if _norm_bound(q) * bound * _ROUNDING <= _F32_MAX:
            return
        qn = _max_norm(q)
        kn = _max_norm(keys())
        if qn * kn * _ROUNDING > _F32_MAX:
            raise ArgumentError(
                # (the limit stated is the one checked: float32's largest value
                # less the norms' rounding slack, not float32's largest value)
                "queries and keys must keep q . k within float32 "
                f"(max |q| * max |k| <= {_F32_MAX / _ROUNDING:.4g}); got max |q| = {qn:.4g}, "
                f"max |k| = {kn:.4g}, product {qn * kn:.4g} "
                "(scale queries or keys down)"
            )

    def _copy(self) -> RangeIndex:
        """An independent copy with the same tree: cloned, not rebuilt as by
        ``copy.deepcopy`` (``neuropil.hf`` forks a row's index this way when
        beam search continues it in several beams)."""
        new = object.__new__(RangeIndex)
        new.__dict__.update(self.__dict__)
        new._params = dict(self._params)
        new._lock = threading.Lock()  # (its own: adds to the copy don't wait on this one's)
        for name in _LAST:
            if name in self.__dict__:
                setattr(new, name, np.array(self.__dict__[name]))
        if self._torch is not None:
            new._torch = self._torch.copy()
        else:
            new._native = self._native.copy()
            # Read after the copy of the keys (the dict's may predate an add
            # that appended more of them): it covers every key copied.
            new._key_bound = self._key_bound
        return new

    def rebuild(self) -> None:
        """Rebuilds the tree over every key now (``add`` does it by policy)."""
        if self._native is not None:
            self._native.rebuild()

    def keys(self) -> Any:
        """Every key, ``(n, d)`` float32, by id (a copy)."""
        if self._torch is not None:
            return self._torch.snapshot()[0].clone()
        return self._native.keys()

    @property
    def d(self) -> int:
        """Key dimension."""
        return self._torch.d if self._torch is not None else self._native.d

    @property
    def method(self) -> str:
        return self._params["method"]

    @property
    def device(self) -> str:
        """``"cpu"`` or the torch device the keys live on."""
        return str(self._torch.device) if self._torch is not None else "cpu"

    def __len__(self) -> int:
        return self._torch.n if self._torch is not None else len(self._native)

    @property
    def stats(self) -> dict[str, Any]:
        """Sizes and counters: ``n``, ``d``, ``method``, ``indexed``, ``pending``
        (appended, not yet in the tree), ``nodes``, ``blocks``, ``builds``,
        ``bytes``, ``stages`` (principal prefixes checked), ``explained_variance``
        (per stage), ``auto_work`` (``auto``: running mean of pruning work over
        a full scan's) and the build parameters."""
        if self._torch is not None:
            return {
                "n": self._torch.n,
                "d": self._torch.d,
                "method": "torch-dense",
                "device": self.device,
                **self._params,
            }
        s = dict(self._native.stats())
        s["builds"] += self._builds_base
        return s

    def __repr__(self) -> str:
        return (
            f"RangeIndex(n={len(self)}, d={self.d}, method={self.method!r}, device={self.device!r})"
        )

    # ------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the keys and build parameters as safetensors with a JSON
        metadata header (format version :data:`FORMAT_VERSION`), to a temp file
        renamed into place. :meth:`load` rebuilds the same index."""
        keys = self.keys()
        if _is_torch(keys):
            keys = keys.detach().cpu().numpy()
        keys = np.ascontiguousarray(keys, dtype="<f4")
        meta = {
            "format": _FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            **{k: str(v) for k, v in self._params.items()},
        }
        _safetensors.save(path, {"keys": keys}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | None = None) -> RangeIndex:
        """Reads an index written by :meth:`save`.

        Args:
            path: The file.
            device: A torch device (e.g. ``"cuda"``) for the torch path; default CPU.

        Raises:
            OSError: the file cannot be read (``FileNotFoundError``...).
            FormatError: the file is not a neuropil range index, is truncated,
                of another format version, or any field is malformed.
        """
        tensors, meta = _safetensors.load(path)
        if meta.get("format") != _FORMAT_NAME:
            raise FormatError(
                f"{path}: format must be {_FORMAT_NAME!r}; got {meta.get('format')!r}"
            )
        _check_format_version(path, meta.get("format_version"), FORMAT_VERSION)
        params: dict[str, Any] = {
            "method": _meta_field(meta, "method", path),
            "leaf": int(_meta_field(meta, "leaf", path, _META_INT)),
            "branching": int(_meta_field(meta, "branching", path, _META_INT)),
            "rebuild_fraction": float(_meta_field(meta, "rebuild_fraction", path, _META_FLOAT)),
            "rebuild_min": int(_meta_field(meta, "rebuild_min", path, _META_INT)),
            "seed": int(_meta_field(meta, "seed", path, _META_INT)),
        }
        extra = sorted(set(meta) - {"format", "format_version", *params})
        if extra:  # (as FlyHash's loader: a field it would silently drop)
            raise FormatError(f"{path}: unknown metadata fields {extra}")
        if set(tensors) != {"keys"}:
            raise FormatError(f"{path}: tensors must be exactly ['keys']; got {sorted(tensors)}")
        keys = _checked_keys(tensors["keys"], path)
        method = params.pop("method")
        if method not in METHODS:
            raise FormatError(f"{path}: method must be one of {METHODS}; got {method!r}")
        if device is not None and device != "cpu":
            import torch

            return cls(torch.from_numpy(keys).to(device), method, **params)
        try:
            return cls(keys, method, **params)
        except (ArgumentError, ShapeError) as e:
            raise FormatError(f"{path}: {e}") from None

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        if self._torch is not None:
            keys = self._torch.snapshot()[0].cpu().numpy()
            indexed, builds = 0, 0
        else:
            # One lock: keys, the tree's share and the build count agree even
            # while another thread adds keys.
            keys, indexed, builds = self._native.state()
            builds += self._builds_base
        state: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "keys": keys,
            **self._params,
            "indexed": indexed,
            "builds": builds,
            "device": self.device,
        }
        for name in _LAST:
            if name in self.__dict__:
                state[name] = np.array(self.__dict__[name])
        return state

    def __setstate__(self, state: Any) -> None:
        where = "RangeIndex state"
        if not isinstance(state, dict) or not set(_STATE) <= set(state) <= {*_STATE, *_LAST}:
            found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise FormatError(f"{where}: must be a dict of keys {list(_STATE)}; got {found}")
        if not (type(state["format_version"]) is int and state["format_version"] == FORMAT_VERSION):
            raise FormatError(
                f"{where}: format_version must be {FORMAT_VERSION}; got {state['format_version']!r}"
            )
        keys = _checked_keys(state["keys"], where)
        method, device = state["method"], state["device"]
        if not isinstance(method, str) or method not in METHODS:
            raise FormatError(f"{where}: method must be one of {METHODS}; got {method!r}")
        if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
            raise FormatError(f"{where}: device must be 'cpu' or a CUDA device; got {device!r}")
        counts = [state["indexed"], state["builds"]]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise FormatError(
                f"{where}: indexed and builds must be integers >= 0; got {_shown(counts)}"
            )
        n, indexed = keys.shape[0], state["indexed"]
        tree = device == "cpu" and method != "flat"
        if (tree and not 1 <= indexed <= n) or (not tree and indexed != 0):
            want = f"in [1, {n}]" if tree else "0"
            raise FormatError(
                f"{where}: indexed must be {want} for method {method!r} on {device}; got {indexed}"
            )
        last = {}
        for name in _LAST:
            if name in state:
                a = state[name]
                if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1):
                    found = (
                        f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                    )
                    raise FormatError(f"{where}: {name} must be a 1-D float32 array; got {found}")
                last[name] = a.copy()
        params = {k: state[k] for k in _PARAMS if k != "method"}
        try:
            if device != "cpu":
                import torch

                self.__init__(torch.from_numpy(keys).to(device), method, **params)  # type: ignore[misc]
            else:
                # The tree over the keys it held, the others appended (never
                # past the rebuild policy, so the split stays as it was).
                self.__init__(keys[:indexed] if tree else keys, method, **params)  # type: ignore[misc]
                if tree and indexed < n:
                    self.add(keys[indexed:])
                self._builds_base = max(0, state["builds"] - self._native.stats()["builds"])
        except (ArgumentError, ShapeError, DTypeError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: {e}") from None
        self.__dict__.update(last)


# ---------------------------------------------------------------- helpers
#: The entries of a pickled RangeIndex's state, and the optional ones.
_PARAMS = ("method", "leaf", "branching", "rebuild_fraction", "rebuild_min", "seed")
_STATE = ("format_version", "keys", *_PARAMS, "indexed", "builds", "device")
_LAST = ("last_scanned", "last_work")


def _checked_keys(keys: Any, where: Any) -> np.ndarray:
    """Stored keys (a file's or a pickle's), as :meth:`RangeIndex.load` accepts them."""
    if not isinstance(keys, np.ndarray) or keys.dtype != np.float32:
        found = keys.dtype if isinstance(keys, np.ndarray) else type(keys).__name__
        raise FormatError(f"{where}: keys must be float32 (F32); got {found}")
    if keys.ndim != 2 or keys.shape[0] == 0 or not np.isfinite(keys).all():
        raise FormatError(
            f"{where}: keys must be a finite non-empty (n, d) array; got {keys.shape}"
        )
    return np.ascontiguousarray(keys)


_F32_MAX = float(np.finfo(np.float32).max)
_USIZE_MAX = 2 * sys.maxsize + 1
_U64_MAX = 2**64 - 1
#: Slack for float32 rounding of the scores' partial sums (d up to ~2^16).
_ROUNDING = 1.0 + 2.0**-7


def _max_norm(x: Any) -> float:
    """Largest Euclidean row norm of a validated 2-D float array or tensor
    (float64 accumulation, no ``(n, d)`` temporary on the host)."""
    if _is_torch(x):
        import torch

        if x.shape[0] == 0:
            return 0.0
        return float(torch.linalg.vector_norm(x.detach().double(), dim=1).max())
    a = np.asarray(x)
    if a.ndim != 2 or a.size == 0:
        return 0.0
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    return float(np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64).max()))


def _added_bound(x: Any) -> float:
    """:func:`_norm_bound` of keys to append, before the core has checked them:
    Inf when it cannot be computed or is not a number (keys the core refuses,
    whose add then restores the bound; were one accepted, the bound would
    stay Inf: every search checked exactly, none unchecked)."""
    try:
        b = _norm_bound(x)
    except Exception:  # not 2-D, not numeric...: the core says what is wrong
        return math.inf
    return b if b == b else math.inf  # (NaN: max() would keep the old bound)


def _norm_bound(x: Any) -> float:
    """``sqrt(d) max |x_ij|``, an upper bound of the row norms of a validated
    2-D float array or tensor (one reduction, no temporary of its size)."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        return 0.0
    if _is_torch(x):
        top = float(x.detach().abs().max())
    else:
        a = np.asarray(x)
        # (small: one pass with a temporary; large: two passes without one)
        top = float(np.abs(a).max()) if a.size <= 4096 else max(float(a.max()), -float(a.min()))
    return top * math.sqrt(x.shape[1])


#: The metadata numbers as :meth:`RangeIndex.save` writes them (``str`` of an
#: int, ``repr`` of a float): no spaces, signs, underscores or non-ASCII digits,
#: which ``int()`` and ``float()`` would take.
_META_INT = ("a non-negative integer", re.compile(r"0|[1-9][0-9]*"))
_META_FLOAT = ("a decimal number", re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?(e[-+]?[0-9]+)?"))


def _meta_field(
    meta: dict[str, str], key: str, path: Any, kind: tuple[str, re.Pattern[str]] | None = None
) -> str:
    """The metadata field ``key``, checked against ``kind``'s pattern."""
    if key not in meta:
        raise FormatError(f"{path}: metadata field {key!r} is missing")
    raw = meta[key]
    if kind is not None and not kind[1].fullmatch(raw):
        raise FormatError(f"{path}: metadata field {key!r} must be {kind[0]}; got {raw!r}")
    return raw


def _host(x: Any, arg: str) -> Any:
    """CPU view for the native core: torch CPU tensors via ``.numpy()`` (no
    copy); bfloat16 and float16 tensors are converted to float32 once."""
    if _is_torch(x):
        import torch

        if x.device.type != "cpu":
            raise ArgumentError(f"{arg} must be on the index's device (cpu); got {x.device}")
        x = x.detach()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.to(torch.float32)
        return x.numpy()
    if not isinstance(x, np.ndarray):
        # Nested lists and other array-likes: the core would read them, but the
        # float32 overflow checks need an array (converted once, as documented).
        try:
            x = np.asarray(x)
        except ValueError as e:  # ragged rows
            raise ShapeError(f"{arg} must have shape (n, d); got a ragged sequence ({e})") from None
    return x


def _thresholds(t: Any, q: Any) -> Any:
    """Thresholds for the core: float32 as given, a scalar as ``(nq,)``
    float32, anything float32 does not hold (float64, integers beyond
    ``2**24``) rounded up to the next float32. Scores are float32, so a score
    reaches ``t`` exactly when it reaches that float32: rounding to the nearest
    would let in the scores between the two."""
    if _is_torch(t):
        import torch

        t = t.detach().cpu()
        if t.is_floating_point() and t.dtype != torch.float32:
            t = t.double()
        t = t.numpy()
    if isinstance(t, np.ndarray) and t.ndim == 0:
        t = t[()]  # a 0-d array or tensor (``scores.max() - 2``) is a scalar threshold
    if isinstance(t, (int, float, np.integer, np.floating)) and not isinstance(t, bool):
        nq = np.shape(q)[0] if np.ndim(q) == 2 else 0
        v = float(t) if isinstance(t, (float, np.floating)) else int(t)
        if -_F32_MAX <= v <= _F32_MAX and (type(v) is float or -(2**24) <= v <= 2**24):
            # (the common case without numpy arrays: _ceil_f32 costs ~9 us a call)
            f = np.float32(v)
            if float(f) < v:
                f = np.nextafter(f, np.float32(np.inf))
            return np.full(nq, f, dtype=np.float32)
        return np.full(nq, _ceil_f32(np.array([v]))[0], dtype=np.float32)
    if not isinstance(t, np.ndarray) and not isinstance(t, (bool, np.bool_)):
        # lists and tuples: an array, to tell their dtype (ints beyond int64
        # give an object array of Python ints)
        try:
            t = np.asarray(t)
        except ValueError as e:  # ragged
            raise ShapeError(
                f"thresholds must have shape (nq,); got a ragged sequence ({e})"
            ) from None
    if isinstance(t, np.ndarray):
        ints = t.dtype == object and all(type(v) is int for v in t.reshape(-1))
        if t.dtype.kind not in "iuf" and not ints:
            raise DTypeError(
                f"thresholds must be a float or integer array (float32, or converted once); "
                f"got {t.dtype}"
            )
        if t.dtype != np.float32:
            return _ceil_f32(t)
    return t


def _ceil_f32(t: np.ndarray) -> np.ndarray:
    """The least float32 >= each value of ``t`` (floats or integers of any
    size; NaN and Inf pass through for the finiteness check)."""
    f: np.ndarray | None
    if t.dtype.kind == "f":
        _check_f32_range(t)
        f = t.astype(np.float32)
        with np.errstate(invalid="ignore"):
            low = f.astype(t.dtype) < t
        f[low] = np.nextafter(f[low], np.float32(np.inf))
        return f
    flat = t.reshape(-1)
    # Integers up to 2**24 are exact; beyond, each one as a Python int
    # (int64 values past 2**53 have no exact float64 either).
    if t.dtype != object and t.dtype.itemsize <= 2:
        return t.astype(np.float32)
    f = flat.astype(np.float64).astype(np.float32) if t.dtype != object else None
    big = (
        np.flatnonzero((flat > 2**24) | (flat < -(2**24)))
        if f is not None
        else range(flat.shape[0])
    )
    if f is None:
        f = np.zeros(flat.shape[0], np.float32)
    for i in big:
        v = int(flat[i])
        if abs(v) > _F32_MAX:
            raise ArgumentError(
                f"thresholds must be finite float32 values (|t| <= {_F32_MAX:.4g}); "
                f"got {v} at flat index {int(i)}"
            )
        c = np.float32(float(v))  # within an ulp (double rounding), then exact:
        if int(c) < v:
            c = np.nextafter(c, np.float32(np.inf))
        below = np.nextafter(c, np.float32(-np.inf))
        if np.isfinite(below) and int(below) >= v:
            c = below
        f[i] = c
    return f.reshape(t.shape)


def _check_f32_range(t: np.ndarray) -> None:
    """Finite thresholds beyond float32 would become Inf: report the given value."""
    with np.errstate(invalid="ignore"):
        big = np.isfinite(t) & (np.abs(t) > _F32_MAX)
    if big.any():
        i = int(np.flatnonzero(big)[0])
        raise ArgumentError(
            f"thresholds must be finite float32 values (|t| <= {_F32_MAX:.4g}); "
            f"got {float(t.reshape(-1)[i])!r} at flat index {i}"
        )


def _like(src: Any, want_torch: bool, *arrays: Any) -> tuple[Any, ...]:
    if not want_torch:
        return arrays
    import torch

    return tuple(torch.from_numpy(np.asarray(a)) for a in arrays)


class _TorchRange:
    """The CUDA path: keys on the device, exact scores by dense matmul.

    Threads may share one. ``_snap`` is ``(buffer, n, bound)``: the key buffer
    (grown by doubling), the count of keys in it (its first ``n`` rows) and
    ``sqrt(d) max |k_i|`` over them, one tuple replaced whole by :meth:`add`
    under ``_lock``. A search reads it once and works on that state alone,
    with no lock held over its device work; an add writes only rows past every
    published ``n`` (or a new buffer), which no search reads. (Device work is
    ordered by stream: threads on one stream, torch's default, see an add's
    rows written before the snapshot that counts them; a thread searching on
    a stream of its own must order it after the adds, as for any tensor.)
    """

    def __init__(self, keys: Any) -> None:
        import torch

        if keys.ndim != 2:
            raise ShapeError(f"keys must have shape (n, d); got {tuple(keys.shape)}")
        if keys.shape[0] == 0 or keys.shape[1] == 0:
            raise ShapeError(f"keys must not be empty; got shape {tuple(keys.shape)}")
        if not keys.is_floating_point():
            raise DTypeError(
                f"keys must have dtype float32 (or another float dtype); got {keys.dtype}"
            )
        keys = keys.detach().to(torch.float32).contiguous()
        if not torch.isfinite(keys).all():
            raise _non_finite("keys", keys)
        self.__setstate__({"keys": keys, "bound": _norm_bound(keys)})

    def snapshot(self) -> tuple[Any, int, float]:
        """``(keys, n, bound)`` of one state: the ``(n, d)`` keys (a view of
        the buffer, not a copy) and an upper bound of their norms."""
        buf, n, bound = self._snap
        return buf[:n], n, bound

    @property
    def n(self) -> int:
        """The count of keys now (read from the snapshot: no view made)."""
        return self._snap[1]

    def copy(self) -> _TorchRange:
        """An independent copy (the keys cloned, a lock of its own)."""
        keys, _, bound = self.snapshot()
        new = object.__new__(_TorchRange)
        new.__setstate__({"keys": keys.clone(), "bound": bound})
        return new

    def __getstate__(self) -> dict[str, Any]:
        # (never the lock, which does not pickle: a fresh one on unpickling)
        keys, _, bound = self.snapshot()
        return {"keys": keys.clone(), "bound": bound}

    def __setstate__(self, state: dict[str, Any]) -> None:
        keys = state["keys"]
        self.d = keys.shape[1]
        self.device = keys.device
        self._lock = threading.Lock()
        self._snap = (keys, keys.shape[0], state["bound"])

    def _q(self, queries: Any) -> Any:
        import torch

        q = queries if _is_torch(queries) else torch.as_tensor(np.asarray(queries))
        if not q.is_floating_point():
            raise DTypeError(
                f"queries must have dtype float32 (or another float dtype); got {q.dtype}"
            )
        if q.ndim != 2 or q.shape[1] != self.d:
            raise ShapeError(
                f"queries must have shape (nq, {self.d}) to match the keys; got {tuple(q.shape)}"
            )
        q = q.to(self.device, torch.float32)
        if not torch.isfinite(q).all():
            raise _non_finite("queries", q)
        return q

    @staticmethod
    def scores(q: Any, keys: Any) -> Any:
        with no_tf32():
            return q @ keys.T

    def search(self, queries: Any, thresholds: Any, owner: RangeIndex) -> tuple[Any, Any, Any]:
        import torch

        keys, _, bound = self.snapshot()
        q = self._q(queries)
        # (a float tensor stays on its device; integers are converted as on the CPU)
        floats = _is_torch(thresholds) and thresholds.is_floating_point()
        t = torch.as_tensor(thresholds if floats else _thresholds(thresholds, q.cpu()))
        if t.ndim == 0:  # one threshold for every query, as on the CPU
            t = t.expand(q.shape[0])
        t = t.to(q.device).reshape(-1)
        if t.dtype == torch.float64:  # rounded up to float32, as on the CPU
            t32 = t.float()
            t = torch.where(t32.double() < t, torch.nextafter(t32, t32.new_tensor(math.inf)), t32)
        t = t.to(torch.float32)
        if t.shape[0] != q.shape[0]:
            raise ShapeError(
                f"thresholds must have shape ({q.shape[0]},) to match the number of queries; "
                f"got {tuple(t.shape)}"
            )
        if not torch.isfinite(t).all():
            raise _non_finite("thresholds", t)
        owner._check_overflow(q, bound, lambda: keys)
        s = self.scores(q, keys)
        rows, ids = torch.nonzero(s >= t[:, None], as_tuple=True)
        counts = torch.bincount(rows, minlength=q.shape[0])
        lims = torch.zeros(q.shape[0] + 1, dtype=torch.int64, device=q.device)
        lims[1:] = torch.cumsum(counts, 0)
        owner.last_scanned = np.ones(q.shape[0], dtype=np.float32)
        return lims, ids.to(torch.int64), s[rows, ids]

    def topk(self, queries: Any, k: int, owner: RangeIndex) -> tuple[Any, Any]:
        keys, n, bound = self.snapshot()
        q = self._q(queries)
        if not 1 <= k <= n:
            raise ArgumentError(f"k must be between 1 and the number of keys ({n}); got {k}")
        owner._check_overflow(q, bound, lambda: keys)
        s, ids = self.scores(q, keys).topk(k, dim=1)
        owner.last_scanned = np.ones(q.shape[0], dtype=np.float32)
        return ids, s

    def add(self, keys: Any) -> Any:
        """Appends keys; returns them as float32 on the device."""
        import torch

        k = keys if _is_torch(keys) else torch.as_tensor(np.asarray(keys))
        if k.ndim != 2 or k.shape[1] != self.d:
            raise ShapeError(
                f"keys must have shape (m, {self.d}) to match the index; got {tuple(k.shape)}"
            )
        k = k.to(self.device, torch.float32)
        if not torch.isfinite(k).all():
            raise _non_finite("keys", k)
        bound = _norm_bound(k)
        m = k.shape[0]
        with self._lock:  # (adds one at a time: each appends after the last one's rows)
            buf, n, old = self._snap
            if n + m > buf.shape[0]:
                cap = max(n + m, 2 * buf.shape[0])
                grown = torch.empty(cap, self.d, dtype=torch.float32, device=self.device)
                grown[:n] = buf[:n]
                buf = grown
            buf[n : n + m] = k
            # Published once the rows are in: keys, count and bound together.
            self._snap = (buf, n + m, max(old, bound))
        return k

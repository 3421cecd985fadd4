"""The membrane bank: ``K`` patterns of ``H x W`` in superposition over ``L`` layers.

Write: ``M[b] += sum_k alpha_bk C[:, k] (x) V_bk``. Read (correlation, the
original): ``Y_bk = sum_l M[b, l] C[l, k]``; read (``pinv``): the same with the
dual codes ``D = C (C^T C)^-1``, exact for any full-rank code book while at
most ``L`` keys are stored. Both are single GEMMs over the flattened
``(B, L, H*W)`` state, in torch, on the bank's device, and differentiable.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._scoped import tf32 as _tf32  # the old name: tests/test_concurrency.py uses bank._tf32
from ..errors import ArgumentError, DTypeError, FormatError, ShapeError, _shown
from . import codes as _codes
from ._checks import (
    as_keys,
    check_bank_size,
    check_codes,
    check_finite,
    check_int,
    check_values,
    dtype_name,
)

__all__ = ["READOUTS", "MembraneBank"]

READOUTS = ("correlation", "pinv")
_CODE_KINDS = ("hadamard", "dct", "gaussian", "orthogonal", "auto")
_PRECISIONS = ("highest", "tf32")
# Sparse COO values denser than this are densified: the scatter path costs nnz * L
# and wins over the dense write only below about 0.1-0.15% non-zeros (BENCHMARKS.md).
SPARSE_MAX_DENSITY = 0.0015


def _dims(L: int, H: int, W: int, batch: int, K: int) -> dict[str, int]:
    return {"L": int(L), "H": int(H), "W": int(W), "batch": int(batch), "K": int(K)}


def _locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs the method under the bank's lock: the in-place GEMMs on the shared
    state, the counters and the cached dual codes are updated by one call at a time."""

    @functools.wraps(fn)
    def wrapper(self: MembraneBank, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper


class _OwnLock:
    """Pickling and ``copy.deepcopy`` for a class holding ``self._lock``: a lock
    cannot be copied, so each copy gets its own."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()


class MembraneBank(_OwnLock):
    """A tensor associative memory of ``batch`` banks, each ``(L, H, W)``.

    Args:
        L: Layers (code length).
        H: Pattern height.
        W: Pattern width.
        batch: Number of independent banks ``B`` updated by one call.
        codes: ``"hadamard"`` (L a power of two), ``"dct"``, ``"gaussian"``,
            ``"orthogonal"``, ``"auto"`` (:func:`~neuropil.membrane.codes.generate_codes`),
            or an ``(L, K)`` float tensor of your own codes (used as given, not
            normalised; it may require grad, to learn codes).
        K: Number of keys (code book size) when ``codes`` is a name; default ``L``.
            Past ``L`` only ``"gaussian"`` and ``"auto"`` apply.
        readout: ``"correlation"`` (``C^T M``) or ``"pinv"`` (dual codes; exact
            while at most ``L`` keys are stored).
        persistence: ``lam`` in (0, 1]: every :meth:`store` first decays the
            state by ``lam`` (automatic persistence); ``None`` disables it.
        device: Torch device of the state (default CPU).
        dtype: Floating dtype of the state: float32 (default), float64,
            bfloat16 or float16 (reduced precision, lower fidelity).
        precision: ``"highest"`` or ``"tf32"``: float32 GEMMs may use TF32
            tensor cores (CUDA only; about 2x faster, lower fidelity). The
            setting is process-wide: while an exact range search or FlyHash
            block runs in another thread, a tf32 bank's GEMMs run in full
            float32 (see :mod:`neuropil._scoped`).
        seed: Seed of the random code books (``np.random.default_rng``).
        fast_hadamard: Use the factored Hadamard transform (``H_L = H_a (x) H_b``,
            two small GEMMs with ``2 (a + b) L H W`` FLOPs instead of ``2 L K H W``)
            for Hadamard banks with ``L >= 64`` when a call touches at least L/4
            keys. ``None`` (default): on CPU only, where it measured 2-3x past the
            GEMM limit; on CUDA the fp32 GEMM is already near the memory limit.

    Raises:
        ArgumentError: an argument out of its domain, or extents whose tensors
            need more memory than the device has (the host's physical memory
            for the CPU; the message gives the bytes needed): refused before
            anything is allocated (:meth:`grow` checks its ``K`` the same way).
        DTypeError: ``dtype`` is not a floating dtype, or custom ``codes`` are
            not of ``dtype``.
        ShapeError: custom ``codes`` are not ``(L, K)``.

    Attributes:
        M: The state, ``(B, L, H, W)`` tensor of ``dtype`` on ``device``.
        C: The code book, ``(L, K)``: unit columns for the named code books,
            custom ``codes`` as given.
        counts: ``(B, K)`` int64 CPU tensor: stores per key since :meth:`clear`.
        reads: ``(B, K)`` int64 CPU tensor: reads per key (used by
            :class:`~neuropil.membrane.AdaptivePersistence`).
        gains: ``(B, K)`` tensor: the alpha of each key's last store (1 before).
        steps: Decay steps applied since :meth:`clear`.

    Thread safety: :meth:`store`, :meth:`read`, :meth:`decay`, :meth:`clear`,
    :meth:`grow`, :meth:`save` and :meth:`stats` hold the bank's lock
    (``threading.RLock``), so calls from several threads serialise and give
    the result of some sequential order.
    """

    def __init__(
        self,
        L: int,
        H: int,
        W: int,
        batch: int = 1,
        codes: str | torch.Tensor = "hadamard",
        K: int | None = None,
        readout: str = "correlation",
        persistence: float | None = None,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
        precision: str = "highest",
        seed: int = 0,
        fast_hadamard: bool | None = None,
    ) -> None:
        self._lock = threading.RLock()
        for name, v in (("L", L), ("H", H), ("W", W), ("batch", batch)):
            check_int(name, v)
        # checked for every code kind: grow() draws from it later, and save() writes it
        check_int("seed", seed, minimum=0)
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise DTypeError(
                "dtype must be torch.float32, float64, bfloat16 or float16; "
                f"got {dtype_name(dtype)}"
            )
        if readout not in READOUTS:
            raise ArgumentError(f"readout must be one of {READOUTS}; got {readout!r}")
        if precision not in _PRECISIONS:
            raise ArgumentError(f"precision must be one of {_PRECISIONS}; got {precision!r}")
        try:
            # a concrete device ("cuda" -> "cuda:0"), so device comparisons are exact
            device = torch.empty(0, device="cpu" if device is None else device).device
        except (RuntimeError, TypeError, ValueError, AssertionError) as e:
            raise ArgumentError(
                f"device must be an available torch device; got {device!r} ({e})"
            ) from e
        if isinstance(codes, str):
            if codes not in _CODE_KINDS:
                raise ArgumentError(
                    f"codes must be one of {_CODE_KINDS} or a tensor; got {codes!r}"
                )
            K = L if K is None else K
            check_int("K", K)
            if codes in ("hadamard", "dct", "orthogonal") and K > L:
                # the reason to give, before the size check below
                _codes._check_lk(L, K, at_most_l=True, fn=f"{codes}_codes")
            # Sizes are checked before anything is allocated. A code book is
            # built in float64 on the CPU (a Hadamard one as the whole L x L
            # matrix, then cut to K columns), about twice over.
            square = codes == "hadamard" or (codes == "auto" and K <= L and not L & (L - 1))
            built = 16 * L * (L if square else K)
            check_bank_size(_dims(L, H, W, batch, K), dtype, device, built)
            kw: dict[str, Any] = {"device": device, "dtype": dtype}
            if codes in ("gaussian", "orthogonal", "auto"):
                kw["seed"] = seed
            fn = {
                "hadamard": _codes.hadamard_codes,
                "dct": _codes.dct_codes,
                "gaussian": _codes.gaussian_codes,
                "orthogonal": _codes.orthogonal_codes,
                "auto": _codes.generate_codes,
            }[codes]
            C = fn(L, K, **kw)
            self.code_kind = codes
        elif isinstance(codes, torch.Tensor):
            if codes.ndim != 2 or codes.shape[0] != L or codes.shape[1] < 1:
                raise ShapeError(f"codes must have shape ({L}, K); got {tuple(codes.shape)}")
            if codes.dtype != dtype:
                raise DTypeError(f"codes must have dtype {dtype_name(dtype)}; got {codes.dtype}")
            if codes.device != device:
                raise ArgumentError(f"codes must be on device {device}; got {codes.device}")
            check_codes(codes)
            check_bank_size(_dims(L, H, W, batch, int(codes.shape[1])), dtype, device, 0)
            C = codes
            self.code_kind = "custom"
        else:
            raise ArgumentError(f"codes must be a name or a tensor; got {type(codes).__name__}")
        self.L, self.H, self.W, self.B = int(L), int(H), int(W), int(batch)
        self.K = int(C.shape[1])
        self.C = C
        self.readout = readout
        self.precision = precision
        self.seed = int(seed)
        if fast_hadamard is not None and not isinstance(fast_hadamard, bool):
            raise ArgumentError(f"fast_hadamard must be None, True or False; got {fast_hadamard!r}")
        self.fast_hadamard = fast_hadamard
        self._h: tuple[torch.Tensor, torch.Tensor] | None = None
        self._setup_transform(device, dtype)
        self.persistence: float | None = None
        self.set_persistence(persistence)
        self.M = torch.zeros(self.B, self.L, self.H, self.W, device=device, dtype=dtype)
        self.gains = torch.ones(self.B, self.K, device=device, dtype=dtype)
        self._counts = torch.zeros(self.B, self.K, dtype=torch.int64)
        self._reads = torch.zeros(self.B, self.K, dtype=torch.int64)
        # keys-None stores/reads touch a prefix 0..kp-1: counted here, applied lazily
        self._pending_counts: dict[int, int] = {}
        self._pending_reads: dict[int, int] = {}
        self.steps = 0
        self._dual: torch.Tensor | None = None
        # what the cached dual was computed from: the code tensor (id, version, data_ptr,
        # shape) and, past L, the stored keys
        self._dual_keys: tuple[Any, ...] | None = None
        if readout == "pinv" and self.K <= self.L:
            self._dual_for(None)  # fails early on a rank-deficient code book

    def __setstate__(self, state: dict[str, Any]) -> None:
        # An unpickled bank is checked as a loaded file is (shapes, dtypes,
        # finite values), so a tampered or mismatched state fails here, not
        # in a later read with a wrong answer.
        from ._io import check_tensors

        super().__setstate__(state)
        where = "unpickled MembraneBank"
        try:
            dims = (self.L, self.H, self.W, self.B, self.K)
            t = {"M": self._M, "C": self.C, "gains": self.gains}
            t.update(counts=self._counts, reads=self._reads)
        except AttributeError as e:
            raise FormatError(f"{where}: state has no {e.name!r}") from None
        if not all(type(v) is int and v >= 1 for v in dims):
            raise FormatError(
                f"{where}: L, H, W, batch and K must be positive ints; got {_shown(dims)}"
            )
        if not isinstance(self._M, torch.Tensor):
            raise FormatError(f"{where}: 'M' must be a tensor; got {type(self._M).__name__}")
        check_tensors(t, dims, self._M.dtype, where)
        self.M = self._M  # (its (B, L, H*W) view again)

    # ------------------------------------------------------------------ properties
    @property
    def M(self) -> torch.Tensor:
        return self._M

    @M.setter
    def M(self, value: torch.Tensor) -> None:
        self._M = value
        self._m3 = value.view(value.shape[0], value.shape[1], -1)

    @property
    def counts(self) -> torch.Tensor:
        with self._lock:
            for kp, n in self._pending_counts.items():
                self._counts[:, :kp] += n
            self._pending_counts.clear()
            return self._counts

    @counts.setter
    def counts(self, value: torch.Tensor) -> None:
        with self._lock:
            self._pending_counts.clear()
            self._counts = value

    @property
    def reads(self) -> torch.Tensor:
        with self._lock:
            for kp, n in self._pending_reads.items():
                self._reads[:, :kp] += n
            self._pending_reads.clear()
            return self._reads

    @reads.setter
    def reads(self, value: torch.Tensor) -> None:
        with self._lock:
            self._pending_reads.clear()
            self._reads = value

    @property
    def device(self) -> torch.device:
        return self.M.device

    @property
    def dtype(self) -> torch.dtype:
        return self.M.dtype

    @property
    def half_life(self) -> float:
        """Steps after which automatic persistence halves a pattern: ln 2 / -ln(lam)."""
        if self.persistence is None or self.persistence == 1.0:
            return math.inf
        return math.log(0.5) / math.log(self.persistence)

    def set_persistence(self, lam: float | None) -> None:
        """Sets (or with ``None`` disables) automatic persistence ``M <- lam M`` per store."""
        if lam is not None:
            lam = _check_lambda(lam, "persistence")
        self.persistence = lam

    # ------------------------------------------------------------------ writing
    @_locked
    def store(
        self,
        values: torch.Tensor,
        keys: Any = None,
        alphas: float | torch.Tensor | str | None = None,
    ) -> None:
        """Writes patterns under their keys' codes: ``M[b] += sum_k alpha C[:, key] (x) V``.

        With automatic persistence the state first decays by ``lam`` (one step).
        Sparse COO ``values`` with at most ``SPARSE_MAX_DENSITY`` (0.15%) non-zeros
        take a scatter path costing ``nnz * L`` instead of the GEMM's
        ``K * H * W * L``; denser ones are densified. (The cut-off was measured on
        one torch thread, where the scatter path is faster below it; with several
        threads the dense GEMM can be as fast or faster: BENCHMARKS.md.)

        Args:
            values: ``(K', H, W)`` (the same patterns for every bank) or
                ``(B, K', H, W)``, the bank's dtype and device; dense or sparse COO.
            keys: ``None`` (keys ``0 .. K'-1``), an int, a sequence or an int
                tensor of shape ``(K',)`` or ``(B, K')``, each in ``[0, K)``.
                Repeated keys superpose.
            alphas: ``None`` (1), a float, a ``(K',)`` or ``(B, K')`` tensor, or
                ``"adaptive"``: ``1 / ||V||`` per pattern (energy-normalised, so
                weak patterns are not drowned by strong ones' crosstalk; read
                with ``unscale=True`` to get the original amplitude back).

        Raises:
            ShapeError: ``values`` or ``keys`` or ``alphas`` have the wrong shape.
            DTypeError: ``values`` is not of the bank's dtype.
            ArgumentError: keys out of range, device mismatch, NaN or Inf in
                ``values`` or ``alphas`` (nothing is written then).
        """
        sparse = isinstance(values, torch.Tensor) and values.layout == torch.sparse_coo
        values = check_values(values, self)
        if sparse and values._nnz() > SPARSE_MAX_DENSITY * values.numel():
            values, sparse = values.to_dense(), False  # the GEMM is faster above this density
        if not sparse and _shares_storage(values, self._M):
            # values that view the state (bank.M[0]): the in-place GEMM would read
            # entries it has already overwritten
            values = values.clone()
        kp = values.shape[1]
        keys_t = as_keys(keys, kp, self.B, self.K, "keys")
        a = self._alphas(alphas, values, kp)
        # one NaN or Inf would spread to every pattern of the state: refuse it first
        check_finite(values, a, isinstance(alphas, str))
        if self.persistence is not None and self.persistence != 1.0:
            self._scale_state(self.persistence)
            self.steps += 1
        if not sparse and self._use_transform(kp):
            self._store_transform(values, keys_t, a)
            self._book(keys_t, kp, a)
            return
        cs = self._select(self.C, keys_t, kp)  # (L, K') or (B, L, K')
        if a is not None:
            cs = (cs if cs.ndim == 3 else cs.unsqueeze(0)) * a.unsqueeze(1)
        m3 = self._m3
        with self._precision():
            if sparse:
                self._store_sparse(values, cs)
            elif self._grad(values, cs):
                delta = torch.matmul(cs, values.reshape(self.B, kp, -1))
                self.M = (m3 + delta).view_as(self.M)
            elif cs.ndim == 2 and self.B == 1:
                m3[0].addmm_(cs, values.reshape(kp, -1))
            else:
                cs3 = cs if cs.ndim == 3 else cs.unsqueeze(0).expand(self.B, -1, -1)
                m3.baddbmm_(cs3, values.reshape(self.B, kp, -1))
        self._book(keys_t, kp, a)

    def _setup_transform(self, device: torch.device, dtype: torch.dtype) -> None:
        """Factors of the Sylvester Hadamard code book, ``H_L = H_a (x) H_(L/a)``."""
        self._h = None
        if self.code_kind == "hadamard" and self.L >= 64:
            a = 1 << ((self.L.bit_length() - 1) // 2)
            self._h = (
                _codes.hadamard_codes(a, a, device=device, dtype=dtype),
                _codes.hadamard_codes(self.L // a, self.L // a, device=device, dtype=dtype),
            )

    def _use_transform(self, kp: int) -> bool:
        if self._h is None or 4 * kp < self.L:
            return False
        if self.fast_hadamard is None:
            return self._M.device.type == "cpu"
        return self.fast_hadamard

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        """``H x`` along dim 1 of ``(B, L, N)``, with the factored Sylvester Hadamard."""
        assert self._h is not None
        h1, h2 = self._h
        b, n = x.shape[0], x.shape[2]
        t = torch.matmul(h1, x.reshape(b, h1.shape[0], -1))
        return torch.matmul(h2, t.view(b, h1.shape[0], h2.shape[0], n)).view(b, self.L, n)

    def _store_transform(
        self, values: torch.Tensor, keys: torch.Tensor | None, a: torch.Tensor | None
    ) -> None:
        kp = values.shape[1]
        v = values.reshape(self.B, kp, -1)
        if a is not None:
            v = v * a.unsqueeze(-1)
        if keys is None and kp == self.L:
            u = v
        else:
            u = torch.zeros_like(self._m3)
            if keys is None:
                u[:, :kp] = v
            elif keys.ndim == 1:
                u.index_add_(1, keys.to(self.device), v)
            else:
                idx = keys.to(self.device).unsqueeze(-1).expand(-1, -1, v.shape[2])
                u.scatter_add_(1, idx, v)
        if self._grad(values, u):
            self.M = (self._m3 + self._transform(u)).view_as(self._M)
            return
        # second factor accumulates straight into the state: no temporary, one pass less
        assert self._h is not None
        h1, h2 = self._h
        na, nb, n = h1.shape[0], h2.shape[0], u.shape[2]
        t = torch.matmul(h1, u.reshape(self.B, na, -1)).view(self.B * na, nb, n)
        self._m3.view(self.B * na, nb, n).baddbmm_(h2.expand(self.B * na, nb, nb), t)

    def _store_sparse(self, values: torch.Tensor, cs: torch.Tensor) -> None:
        v = values.coalesce()
        idx, val = v.indices(), v.values()  # (4, nnz): b, k, h, w
        b, k = idx[0], idx[1]
        n = idx[2] * self.W + idx[3]
        if cs.ndim == 2:
            contrib = cs[:, k] * val  # (L, nnz)
        else:
            contrib = cs[b, :, k].T * val
        grad = self._grad(val, cs)
        if self.B == 1:
            m2 = self.M.view(self.L, -1)
            if grad:
                self.M = m2.index_add(1, n, contrib).view_as(self.M)
            else:
                m2.index_add_(1, n, contrib)
            return
        lidx = torch.arange(self.L, device=self.device).unsqueeze(1)
        flat = (b.unsqueeze(0) * self.L + lidx) * (self.H * self.W) + n.unsqueeze(0)
        if grad:
            self.M = self.M.reshape(-1).index_add(0, flat.reshape(-1), contrib.reshape(-1))
            self.M = self.M.view(self.B, self.L, self.H, self.W)
        else:
            self.M.view(-1).index_add_(0, flat.reshape(-1), contrib.reshape(-1))

    def _alphas(self, alphas: Any, values: torch.Tensor, kp: int) -> torch.Tensor | None:
        if alphas is None:
            return None
        if isinstance(alphas, str):
            if alphas != "adaptive":
                raise ArgumentError(
                    f"alphas must be a number, a tensor or 'adaptive'; got {alphas!r}"
                )
            dense = values.to_dense() if values.layout == torch.sparse_coo else values
            norms = dense.detach().reshape(self.B, kp, -1).float().norm(dim=2)
            return (1.0 / norms.clamp_min(1e-12)).to(self.dtype)
        if _is_real(alphas):
            if not math.isfinite(alphas):
                raise ArgumentError(f"alphas must be finite; got {alphas}")
            return torch.full((self.B, kp), float(alphas), device=self.device, dtype=self.dtype)
        if not isinstance(alphas, torch.Tensor):
            raise ArgumentError(
                f"alphas must be a number, a tensor or 'adaptive'; got {_shown(alphas)}"
            )
        if alphas.shape not in ((kp,), (self.B, kp)):
            raise ShapeError(
                f"alphas must have shape ({kp},) or ({self.B}, {kp}); got {tuple(alphas.shape)}"
            )
        if alphas.device != self.device:
            raise ArgumentError(f"alphas must be on device {self.device}; got {alphas.device}")
        if not alphas.is_floating_point():
            raise DTypeError(f"alphas must be a floating tensor; got {alphas.dtype}")
        return alphas.to(self.dtype).expand(self.B, kp)

    def _book(self, keys: torch.Tensor | None, kp: int, a: torch.Tensor | None) -> None:
        if keys is None:
            self._pending_counts[kp] = self._pending_counts.get(kp, 0) + 1
            if a is not None:
                self.gains[:, :kp] = a.detach()
            return
        k2 = keys.expand(self.B, kp) if keys.ndim == 1 else keys
        self.counts.scatter_add_(1, k2.cpu(), torch.ones(self.B, kp, dtype=torch.int64))
        if a is not None:
            k2 = k2.to(self.device)
            # scatter_ with repeated keys keeps an unspecified one on CUDA: give every
            # occurrence the alpha of the key's last store, so each device agrees.
            self.gains.scatter_(1, k2, _last_occurrence(k2, a.detach()))

    # ------------------------------------------------------------------ reading
    @_locked
    def read(
        self, keys: Any = None, readout: str | None = None, unscale: bool = False
    ) -> torch.Tensor:
        """Recalls the patterns stored under ``keys``.

        Args:
            keys: ``None`` (all ``K`` keys), an int, a sequence, or an int tensor
                of shape ``(K',)`` or ``(B, K')``, each in ``[0, K)``.
            readout: Overrides the bank's readout for this call.
            unscale: Divide each recall by its key's last alpha (use after
                ``store(..., alphas="adaptive")``).

        Returns:
            ``(B, K', H, W)`` tensor of the bank's dtype, on its device.

        Past ``L`` stored keys the correlation readout degrades gracefully: each
        recall carries crosstalk of relative size about sqrt((K - 1) / L) with
        random codes (sqrt((K - L) / L) with ``codes="auto"``); a
        :class:`HopfieldCleanup` restores exact recall up to about ``K = 2L``.

        Raises:
            ArgumentError: keys out of range; ``pinv`` with more than ``L``
                distinct stored keys (it cannot separate them: use
                ``"correlation"`` and a :class:`HopfieldCleanup`).
        """
        readout = self.readout if readout is None else readout
        if readout not in READOUTS:
            raise ArgumentError(f"readout must be one of {READOUTS}; got {readout!r}")
        kp = self.K if keys is None else None
        keys_t = as_keys(keys, kp, self.B, self.K, "keys")
        if keys_t is not None:
            kp = keys_t.shape[-1]
        assert kp is not None
        if self._use_transform(kp):  # the dual of an orthonormal code book is itself
            y = self._transform(self._m3)
            if keys_t is None:
                y = y[:, :kp]
            elif keys_t.ndim == 1:
                y = y.index_select(1, keys_t.to(self.device))
            else:
                idx = keys_t.to(self.device).unsqueeze(-1).expand(-1, -1, y.shape[2])
                y = torch.gather(y, 1, idx)
            return self._finish_read(y, keys_t, kp, unscale)
        codes = self.C if readout == "correlation" else self._dual_for(keys_t)
        rs = self._select(codes, keys_t, kp)
        m3 = self._m3
        with self._precision():
            if rs.ndim == 2 and self.B == 1:
                y = torch.mm(rs.t(), m3[0]).unsqueeze(0)
            else:
                y = torch.matmul(rs.transpose(-1, -2), m3)
        return self._finish_read(y, keys_t, kp, unscale)

    def _finish_read(
        self, y: torch.Tensor, keys_t: torch.Tensor | None, kp: int, unscale: bool
    ) -> torch.Tensor:
        if unscale:
            g = self.gains[:, :kp] if keys_t is None else self._gather_gains(keys_t)
            y = y / g.unsqueeze(-1)
        if keys_t is None:
            self._pending_reads[kp] = self._pending_reads.get(kp, 0) + 1
        else:
            k2 = keys_t.expand(self.B, kp) if keys_t.ndim == 1 else keys_t
            self.reads.scatter_add_(1, k2.cpu(), torch.ones(self.B, kp, dtype=torch.int64))
        return y.reshape(self.B, kp, self.H, self.W)

    def read_all(self, readout: str | None = None) -> torch.Tensor:
        """Recalls every key: ``(B, K, H, W)``. Same as ``read(None)``."""
        return self.read(None, readout=readout)

    def _gather_gains(self, keys: torch.Tensor) -> torch.Tensor:
        k2 = keys.expand(self.B, -1) if keys.ndim == 1 else keys
        return torch.gather(self.gains, 1, k2.to(self.device))

    def _select(self, codes: torch.Tensor, keys: torch.Tensor | None, kp: int) -> torch.Tensor:
        if keys is None:
            return codes if kp == self.K else codes[:, :kp]
        keys = keys.to(codes.device)
        if keys.ndim == 1:
            return codes.index_select(1, keys)
        return codes[:, keys].permute(1, 0, 2)  # (B, L, K')

    @_locked
    def stored_keys(self) -> list[int]:
        """Keys stored in at least one bank since :meth:`clear`, ascending."""
        return torch.nonzero(self.counts.sum(0)).flatten().tolist()

    @_locked
    def _dual_for(self, keys: torch.Tensor | None) -> torch.Tensor:
        """Dual codes ``D`` with ``D^T C_S = I`` over the stored keys ``S`` (all keys if K <= L).

        Cached until the codes change: learned codes updated in place (an
        optimizer step) bump the tensor's version counter, so the dual is
        recomputed; so is a code book replaced by another tensor. Learned codes
        with grad enabled get a fresh dual in the autograd graph (not cached),
        so a ``pinv`` read differentiates through ``D(C)`` as well as ``M``.
        """
        grad = torch.is_grad_enabled() and self.C.requires_grad
        if self.K <= self.L:
            if grad:
                return self._pinv_t(self.C, "the code book", grad=True)
            key = (*self._codes_key(), None)
            if self._dual is None or self._dual_keys != key:
                self._dual, self._dual_keys = self._pinv_t(self.C, "the code book"), key
            return self._dual
        stored = tuple(self.stored_keys())
        if len(stored) > self.L:
            raise ArgumentError(
                f"readout 'pinv' separates at most L={self.L} stored keys; got {len(stored)} "
                "distinct stored keys (use readout='correlation', optionally with a "
                "HopfieldCleanup)"
            )
        key = (*self._codes_key(), stored)
        if grad or self._dual is None or self._dual_keys != key:
            d = torch.zeros_like(self.C.detach())
            if stored:
                idx = torch.tensor(stored, device=self.device)
                p = self._pinv_t(self.C[:, idx], "the stored keys' codes", grad=grad)
                d = d.index_copy(1, idx, p)  # out of place: p may carry grad
            if grad:
                return d
            self._dual, self._dual_keys = d, key
        return self._dual

    def _codes_key(self) -> tuple[Any, ...]:
        """(version, data_ptr, shape) of the code book: changes when the codes do."""
        try:
            version: Any = self.C._version
        except RuntimeError:  # an inference tensor has no version counter
            version = None
        return (id(self.C), version, self.C.data_ptr(), tuple(self.C.shape))

    def _pinv_t(self, c: torch.Tensor, what: str, grad: bool = False) -> torch.Tensor:
        c64 = c.detach().to(torch.float64)
        s = torch.linalg.svdvals(c64)
        if s.numel() == 0 or float(s[-1]) <= 1e-7 * float(s[0]):
            raise ArgumentError(
                f"readout 'pinv' needs full-rank codes; {what} have condition number "
                f"{float(s[0]) / max(float(s[-1]), 1e-300):.3g}"
            )
        if grad:  # full rank (checked above), so pinv is differentiable here
            c64 = c.to(torch.float64)
        return torch.linalg.pinv(c64).t().contiguous().to(self.dtype)

    @_locked
    def grow(self, K: int) -> None:
        """Extends the code book to ``K`` keys without disturbing stored patterns.

        The existing codes stay, bit for bit, as the first columns; the new ones
        come from :func:`~neuropil.membrane.codes.generate_codes` (orthonormal
        completion while ``K <= L``, a low-coherence frame past ``L``), seeded by
        ``seed``. ``C`` becomes a new tensor: learned codes (``requires_grad``)
        give a new leaf that requires grad, to be handed to the optimizer again.

        Args:
            K: New number of keys, at least the current ``K``.
        """
        check_int("K", K, minimum=self.K)
        if K == self.K:
            return
        # the new code book is built in float64 on the CPU, as the constructor's
        check_bank_size(
            _dims(self.L, self.H, self.W, self.B, K), self.dtype, self.device, 16 * self.L * K
        )
        extra = K - self.K
        old = self.C.detach()
        grown = _codes.generate_codes(self.L, K, existing=old, seed=self.seed)
        # generate_codes normalises the existing columns (and rounds them through
        # float64): put them back as they were, or custom codes that are not unit
        # (used as given) would read every stored pattern at another scale.
        grown[:, : self.K] = old
        self.C = grown.requires_grad_(self.C.requires_grad)
        self.gains = torch.cat(
            [self.gains, torch.ones_like(self.gains[:, :1]).expand(-1, extra)], 1
        )
        zeros = torch.zeros(self.B, extra, dtype=torch.int64)
        self.counts = torch.cat([self.counts, zeros], 1)
        self.reads = torch.cat([self.reads, zeros], 1)
        self.K = K
        self.code_kind = "grown"
        self._h = None
        self._dual, self._dual_keys = None, None

    # ------------------------------------------------------------------ persistence
    @_locked
    def decay(self, lam: float, steps: int = 1) -> None:
        """Decays every stored pattern: ``M <- lam^steps M``.

        Args:
            lam: Factor in (0, 1].
            steps: How many steps to apply at once (non-negative).
        """
        lam = _check_lambda(lam, "lam")
        check_int("steps", steps, minimum=0)
        if steps:
            self._scale_state(lam**steps)
            self.steps += steps

    @_locked
    def step(self, n: int = 1) -> None:
        """Applies ``n`` steps of the automatic persistence (no-op when it is off)."""
        check_int("n", n, minimum=0)
        if self.persistence is not None and n:
            self.decay(self.persistence, n)

    def _scale_state(self, f: float) -> None:
        if self.M.requires_grad:
            self.M = self.M * f
        else:
            self.M.mul_(f)

    @_locked
    def clear(self) -> None:
        """Forgets everything: zero state, counts, reads, gains, steps and cached duals."""
        self.M = torch.zeros_like(self.M, requires_grad=False)
        self.gains = torch.ones_like(self.gains)
        self.counts.zero_()
        self.reads.zero_()
        self.steps = 0
        self._dual, self._dual_keys = None, None

    # ------------------------------------------------------------------ telemetry
    @_locked
    def stats(self) -> dict[str, Any]:
        """Energy and capacity telemetry.

        Returns:
            dict with ``stored`` (distinct stored keys, max over banks),
            ``load`` (stored / L), ``energy`` (``||M||_F^2`` per bank, list),
            ``coherence`` (:func:`coherence_stats` of the stored keys' codes),
            ``expected_crosstalk`` (sqrt((K-1)/L) for K stored: the relative
            error of the correlation readout with random codes), ``code_crosstalk``
            (the same from the actual codes' Gram matrix), ``half_life``, ``steps``,
            ``readout`` and ``bytes`` (of the state).
        """
        per_bank = (self.counts > 0).sum(1)
        k = int(per_bank.max()) if self.B else 0
        stored = self.stored_keys()
        cs = self.C[:, stored] if stored else self.C[:, :0]
        coh = _codes.coherence_stats(cs) if stored else _codes.coherence_stats(self.C[:, :1])
        if len(stored) > 1:
            g = cs.detach().double().T @ cs.detach().double()
            off = g - torch.diag(torch.diag(g))
            code_xt = float(off.pow(2).sum(0).mean().sqrt())
        else:
            code_xt = 0.0
        return {
            "stored": k,
            "load": k / self.L,
            "energy": self.M.detach().double().pow(2).sum((1, 2, 3)).tolist(),
            "coherence": coh,
            "expected_crosstalk": math.sqrt(max(k - 1, 0) / self.L),
            "code_crosstalk": code_xt,
            "half_life": self.half_life,
            "steps": self.steps,
            "readout": self.readout,
            "bytes": self.M.numel() * self.M.element_size(),
        }

    # ------------------------------------------------------------------ save / load
    @_locked
    def save(self, path: Any) -> None:
        """Writes the bank to ``path`` (safetensors + JSON metadata, atomic rename)."""
        from ._io import save_bank

        save_bank(self, path)

    @classmethod
    def load(cls, path: Any, device: Any = None) -> MembraneBank:
        """Reads a bank written by :meth:`save`, validating every field.

        Args:
            path: File written by :meth:`save`.
            device: Device to load onto (default CPU).

        Raises:
            OSError: the file cannot be read (``FileNotFoundError``...), as from ``open``.
            FormatError: The file is missing fields, truncated, inconsistent or
                of an unknown format version.
        """
        from ._io import load_bank

        return load_bank(cls, path, device)

    # ------------------------------------------------------------------ helpers
    def _grad(self, *ts: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            self.M.requires_grad or any(t.requires_grad for t in ts)
        )

    def _precision(self) -> contextlib.AbstractContextManager[None]:
        if self.precision == "tf32" and self._M.dtype == torch.float32 and self._M.is_cuda:
            return _tf32()
        return _NULL

    def __repr__(self) -> str:
        return (
            f"MembraneBank(L={self.L}, H={self.H}, W={self.W}, batch={self.B}, K={self.K}, "
            f"codes={self.code_kind!r}, readout={self.readout!r}, dtype={dtype_name(self.dtype)}, "
            f"device={str(self.device)!r})"
        )


_NULL = contextlib.nullcontext()


def _is_real(x: Any) -> bool:
    """A real Python or numpy scalar (``np.float32(0.9)`` included), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _check_lambda(lam: Any, name: str) -> float:
    if not _is_real(lam):
        raise ArgumentError(f"{name} must be a number in (0, 1]; got {_shown(lam)}")
    lam = float(lam)
    if not (0.0 < lam <= 1.0):
        raise ArgumentError(f"{name} must be in (0, 1]; got {lam}")
    return lam


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _last_occurrence(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For ``(B, n)`` keys and values: each position gets the value of the last
    position in its row holding the same key (stable sort, then the end of each run)."""
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)
    n = keys.shape[1]
    idx = torch.arange(n, device=keys.device).expand_as(sorted_keys)
    run_end = torch.ones_like(sorted_keys, dtype=torch.bool)
    run_end[:, :-1] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    end = torch.where(run_end, idx, torch.full_like(idx, n))
    end = torch.flip(torch.cummin(torch.flip(end, [1]), 1).values, [1])
    last = torch.gather(torch.gather(values, 1, order), 1, end)
    return torch.empty_like(values).scatter_(1, order, last)

"""Code books for the membrane bank: columns are the keys' codes.

Every function returns a ``(L, K)`` tensor whose columns have unit L2 norm, so a
correlation readout of a pattern stored under its own code returns the pattern
itself. Codes are built in float64 on the CPU and then cast to ``dtype`` and
moved to ``device``, so they are the same on every OS, CPU and device.

Random codes (``gaussian_codes``, ``orthogonal_codes``, ``generate_codes`` past
``L``) draw from ``numpy.random.Generator(PCG64(seed))`` (``np.random.default_rng``),
whose stream does not depend on the platform.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, ShapeError, _shown
from ._checks import check_codes

__all__ = [
    "coherence_stats",
    "dct_codes",
    "gaussian_codes",
    "generate_codes",
    "hadamard_codes",
    "orthogonal_codes",
]


def _check_lk(L: Any, K: Any, *, at_most_l: bool, fn: str, seed: Any = 0) -> None:
    for name, v in (("L", L), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ArgumentError(f"{fn}: {name} must be a positive integer; got {_shown(v)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        # np.random.default_rng would raise its own ValueError/TypeError
        raise ArgumentError(f"{fn}: seed must be a non-negative integer; got {_shown(seed)}")
    if at_most_l and K > L:
        raise ArgumentError(
            f"{fn}: K must be <= L={L} (at most L mutually orthogonal codes of length L); "
            f"got K={K}; use generate_codes or gaussian_codes past L"
        )


def _finish(c: np.ndarray, device: Any, dtype: torch.dtype | None) -> torch.Tensor:
    c = c / np.linalg.norm(c, axis=0, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(c)).to(device=device, dtype=dtype or torch.float32)


def hadamard_codes(
    L: int, K: int, *, device: Any = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The first ``K`` columns of the Sylvester Hadamard matrix of order ``L``, over sqrt(L).

    Entries are +-1/sqrt(L): exactly orthonormal, and exact in every float type
    whose mantissa holds 1/sqrt(L) (powers of 4 are exact even in bfloat16).

    Args:
        L: Code length, a power of two.
        K: Number of codes, ``1 <= K <= L``.
        device: Torch device of the result (default CPU).
        dtype: Floating dtype of the result (default float32).

    Returns:
        ``(L, K)`` tensor with orthonormal columns.

    Raises:
        ArgumentError: ``L`` is not a power of two, or ``K > L``.
    """
    _check_lk(L, K, at_most_l=True, fn="hadamard_codes")
    if L & (L - 1):
        raise ArgumentError(
            f"hadamard_codes: L must be a power of two; got {L}; use dct_codes or "
            "orthogonal_codes for other lengths"
        )
    h = np.ones((1, 1))
    while h.shape[0] < L:
        h = np.block([[h, h], [h, -h]])
    return _finish(h[:, :K], device, dtype)


def dct_codes(
    L: int, K: int, *, device: Any = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The first ``K`` orthonormal DCT-II basis vectors of length ``L``.

    ``C[l, k] = s_k cos(pi (l + 1/2) k / L)`` with ``s_0 = sqrt(1/L)``,
    ``s_k = sqrt(2/L)``. Orthonormal for any ``L``, to float round-off.

    Args:
        L: Code length.
        K: Number of codes, ``1 <= K <= L``.
        device: Torch device of the result.
        dtype: Floating dtype of the result (default float32).

    Returns:
        ``(L, K)`` tensor with orthonormal columns.
    """
    _check_lk(L, K, at_most_l=True, fn="dct_codes")
    l_idx = np.arange(L)[:, None] + 0.5
    k_idx = np.arange(K)[None, :]
    return _finish(np.cos(np.pi * l_idx * k_idx / L), device, dtype)


def gaussian_codes(
    L: int, K: int, *, seed: int = 0, device: Any = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``K`` independent Gaussian codes of length ``L``, normalised to unit length.

    Not orthogonal: with the correlation readout each pattern picks up crosstalk
    of relative size about sqrt((K - 1) / L) from the others.

    Args:
        L: Code length.
        K: Number of codes (any positive count).
        seed: Seed of ``np.random.default_rng`` (PCG64).
        device: Torch device of the result.
        dtype: Floating dtype of the result (default float32).

    Returns:
        ``(L, K)`` tensor with unit columns.
    """
    _check_lk(L, K, at_most_l=False, fn="gaussian_codes", seed=seed)
    return _finish(np.random.default_rng(seed).standard_normal((L, K)), device, dtype)


def orthogonal_codes(
    L: int, K: int, *, seed: int = 0, device: Any = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``K`` random orthonormal codes: the Q factor of a Gaussian ``(L, K)`` matrix.

    The signs are fixed (``diag(R) > 0``), so the result is a Haar-random
    orthonormal frame that depends only on ``seed``.

    Args:
        L: Code length.
        K: Number of codes, ``1 <= K <= L``.
        seed: Seed of ``np.random.default_rng`` (PCG64).
        device: Torch device of the result.
        dtype: Floating dtype of the result (default float32).

    Returns:
        ``(L, K)`` tensor with orthonormal columns.
    """
    _check_lk(L, K, at_most_l=True, fn="orthogonal_codes", seed=seed)
    g = np.random.default_rng(seed).standard_normal((L, K))
    q, r = np.linalg.qr(g)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
    return _finish(q, device, dtype)


def _tight_frame(c: np.ndarray, fixed: int, iters: int) -> np.ndarray:
    """Alternating projection towards a unit-norm tight frame (C C^T = K/L I).

    A unit-norm tight frame meets the Welch bound on the mean squared coherence,
    (K - L) / (L (K - 1)); the first ``fixed`` columns are kept as they are.
    """
    for _ in range(iters):
        u, _, vt = np.linalg.svd(c, full_matrices=False)
        t = u @ vt  # nearest matrix with orthogonal rows (or columns, when K <= L)
        t = t / np.linalg.norm(t, axis=0, keepdims=True)
        t[:, :fixed] = c[:, :fixed]
        c = t
    return c


def generate_codes(
    L: int,
    K: int,
    existing: torch.Tensor | None = None,
    *,
    seed: int = 0,
    iters: int = 50,
    device: Any = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Codes for ``K`` keys: orthonormal while ``K <= L``, low-coherence past ``L``.

    While ``K <= L`` (and no ``existing`` codes) this is :func:`hadamard_codes` when
    ``L`` is a power of two, else :func:`orthogonal_codes`. Past ``L`` it returns
    a near-tight unit-norm frame: random codes refined by ``iters`` rounds of
    alternating projection, whose mean squared coherence approaches the Welch
    bound ``(K - L) / (L (K - 1))``, so the correlation readout's crosstalk is
    about sqrt((K - L) / L) instead of random codes' sqrt((K - 1) / L).

    Args:
        L: Code length.
        K: Total number of codes wanted (including ``existing``).
        existing: Optional ``(L, K0)`` codes to keep as the first ``K0`` columns
            (normalised); the new columns are chosen around them.
        seed: Seed of ``np.random.default_rng`` (PCG64) for the new columns.
        iters: Alternating-projection rounds past ``L``.
        device: Torch device (default: that of ``existing``, else CPU).
        dtype: Floating dtype (default: that of ``existing``, else float32).

    Returns:
        ``(L, K)`` tensor with unit columns.

    Raises:
        ShapeError: ``existing`` is not ``(L, K0)`` with ``K0 <= K``.
    """
    _check_lk(L, K, at_most_l=False, fn="generate_codes", seed=seed)
    if existing is None:
        if K <= L:
            if L & (L - 1) == 0:
                return hadamard_codes(L, K, device=device, dtype=dtype)
            return orthogonal_codes(L, K, seed=seed, device=device, dtype=dtype)
        c = np.random.default_rng(seed).standard_normal((L, K))
        c /= np.linalg.norm(c, axis=0, keepdims=True)
        return _finish(_tight_frame(c, 0, iters), device, dtype)
    if not isinstance(existing, torch.Tensor):
        raise ArgumentError(f"existing must be a torch.Tensor; got {type(existing).__name__}")
    if existing.ndim != 2 or existing.shape[0] != L or existing.shape[1] > K:
        raise ShapeError(
            f"existing must have shape ({L}, K0) with K0 <= {K}; got {tuple(existing.shape)}"
        )
    device = existing.device if device is None else device
    dtype = existing.dtype if dtype is None else dtype
    old = existing.detach().to("cpu", torch.float64).numpy()
    norms = np.linalg.norm(old, axis=0, keepdims=True)
    if not np.all(np.isfinite(old)) or np.any(norms == 0):
        raise ArgumentError("existing codes must be finite and non-zero")
    old = old / norms
    k0 = old.shape[1]
    new = np.random.default_rng(seed).standard_normal((L, K - k0))
    if K <= L:
        # Orthonormal completion: project the new columns off the old ones.
        q, _ = np.linalg.qr(np.concatenate([old, new], axis=1))
        ortho = np.abs(old.T @ old - np.eye(k0)).max() < 1e-6
        if ortho:
            return _finish(np.concatenate([old, q[:, k0:]], axis=1), device, dtype)
    c = np.concatenate([old, new / np.linalg.norm(new, axis=0, keepdims=True)], axis=1)
    return _finish(_tight_frame(c, k0, iters), device, dtype)


def coherence_stats(C: torch.Tensor) -> dict[str, float]:
    """Coherence of a code book: off-diagonal entries of its normalised Gram matrix.

    Args:
        C: ``(L, K)`` codes (any float dtype and device).

    Returns:
        ``{"max": ..., "mean": ..., "rms": ..., "welch_bound": ...}``: the largest,
        mean and root-mean-square ``|<c_i, c_j>| / (|c_i| |c_j|)`` over ``i != j``
        (0.0 when ``K == 1``), and the Welch lower bound on the max coherence.

    Raises:
        ShapeError: ``C`` is not 2-D, or has no rows.
        ArgumentError: ``C`` holds NaN or Inf, or a zero column (whose
            coherence is undefined, not 0).
    """
    if not isinstance(C, torch.Tensor):
        raise ArgumentError(f"C must be a torch.Tensor; got {type(C).__name__}")
    if C.ndim != 2 or C.shape[0] == 0:
        raise ShapeError(f"C must have shape (L, K) with L >= 1; got {tuple(C.shape)}")
    check_codes(C, "C")
    L, K = C.shape
    c = C.detach().to(torch.float64)
    c = c / c.norm(dim=0, keepdim=True)
    if K < 2:
        return {"max": 0.0, "mean": 0.0, "rms": 0.0, "welch_bound": 0.0}
    g = (c.T @ c).abs()
    off = g[~torch.eye(K, dtype=torch.bool, device=g.device)]
    welch = math.sqrt(max(K - L, 0) / (L * (K - 1)))
    return {
        "max": float(off.max()),
        "mean": float(off.mean()),
        "rms": float(off.pow(2).mean().sqrt()),
        "welch_bound": welch,
    }

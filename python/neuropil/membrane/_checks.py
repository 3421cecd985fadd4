"""Argument checks shared by the membrane modules: each error names the argument,
the expected and the found value."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, DTypeError, ShapeError, _non_finite, _shown

# Past this many bytes a tensor's size overflows torch's int64 byte count.
_MAX_BYTES = 2**63 - 1


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype)


def check_int(name: str, v: Any, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ArgumentError(f"{name} must be {what}; got {_shown(v)}")


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory ``device`` has: a CUDA device's total, the host's
    physical memory for the CPU, ``None`` where unknown: the meta device
    (it allocates nothing) and every other type (``xpu``, ``hpu``, ``mps``,
    ``privateuseone``...: their memory is not the host's, and a bank that fits
    the accelerator must not be refused for exceeding the host's RAM; only
    the 2**63-byte overflow bound applies there)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.get_device_properties(device).total_memory)
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device.type != "cpu":
        return None
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
        return None


def check_bank_size(
    dims: dict[str, int], dtype: torch.dtype, device: torch.device, code_book_bytes: int
) -> None:
    """Refuses a bank whose tensors could never be allocated, before any is.

    ``dims``: ``L, H, W, batch, K``. The bank holds ``M`` ``(batch, L, H, W)``,
    ``C`` ``(L, K)`` and ``gains`` ``(batch, K)`` of ``dtype`` on ``device``,
    and ``counts``/``reads`` ``(batch, K)`` int64 on the CPU; building a named
    code book takes ``code_book_bytes`` more on the CPU (float64). A bank
    needing more than the memory of its device (or, for the CPU tensors, of
    the host) would fail in torch or numpy with a message naming no argument
    (or after paging everything out); past 2**63 bytes the sizes overflow.
    The argument named is the largest extent (ties: the first of ``L, H, W,
    batch, K``).
    """
    L, H, W, B, K = (dims[n] for n in ("L", "H", "W", "batch", "K"))
    item = torch.empty(0, dtype=dtype).element_size()
    state = item * (B * L * H * W + L * K + B * K)
    what = f"the {dtype_name(dtype)} state (batch, L, H, W), codes (L, K) and gains"
    host = device_memory(torch.device("cpu"))
    counters = 16 * B * K + code_book_bytes
    extra = "the int64 counters (batch, K)" + (
        " and the code book (built in float64)" if code_book_bytes else ""
    )
    if device.type == "cpu":
        needs = [(state + counters, host, "cpu", f"{what}, {extra}")]
    else:
        needs = [(state, device_memory(device), str(device), what), (counters, host, "cpu", extra)]
    for need, have, where, parts in needs:
        limit = _MAX_BYTES if have is None else min(have, _MAX_BYTES)
        if need > limit:
            name = max(dims, key=lambda n: dims[n])  # (max keeps the first of equals)
            shown = ", ".join(f"{n}={v}" for n, v in dims.items())
            raise ArgumentError(
                f"{name} must give a bank that fits in the memory of {where} ({limit} bytes); "
                f"got {shown}: {parts} would need {need} bytes ({need / 2**30:.3g} GiB)"
            )


def check_codes(codes: torch.Tensor, name: str = "codes") -> None:
    """Codes must be finite with columns of non-zero, finite norm (in float64).

    The same test :func:`~neuropil.membrane._io.load_bank` applies, so a bank
    that can be built can be saved and loaded again.
    """
    c = codes.detach()
    norms = c.to(torch.float64).norm(dim=0)
    bad = (norms == 0) | ~torch.isfinite(norms)
    if bool(torch.isfinite(c).all()) and not bool(bad.any()):
        return
    if not bool(torch.isfinite(c).all()):
        raise _non_finite(name, c)
    cols = torch.nonzero(bad).flatten()[:5].tolist()
    raise ArgumentError(
        f"{name} must have columns of non-zero, finite norm (computed in float64); got "
        f"column(s) {cols} with norm {[float(norms[i]) for i in cols]}"
    )


def check_finite(values: torch.Tensor, alphas: torch.Tensor | None, adaptive: bool = False) -> None:
    """Raises unless ``values`` (dense or sparse COO) and ``alphas`` are all finite.

    One reduction and one device sync for both: a NaN or Inf stored once spreads
    over every pattern of the bank, so it is refused before the state changes.
    """
    v = values._values() if values.layout == torch.sparse_coo else values
    # The fast test: a float64 sum is finite exactly when every value is (a
    # NaN or an infinity propagates; finite float32/16 values cannot overflow
    # it). One reduction and one sync; the element-wise test runs only to
    # name the culprit.
    total = v.detach().sum(dtype=torch.float64)
    if alphas is not None:
        total = total + alphas.detach().sum(dtype=torch.float64)
    if math.isfinite(float(total)):
        return
    if not bool(torch.isfinite(v.detach()).all()):
        n = int((~torch.isfinite(v.detach())).sum())
        raise ArgumentError(f"values must be finite; got {n} NaN or Inf entries")
    if alphas is None or bool(torch.isfinite(alphas.detach()).all()):
        return  # finite float64 values so large that their sum overflowed
    bad = alphas.detach()[~torch.isfinite(alphas.detach())]
    hint = " (1 / ||V|| of a tiny pattern overflows it)" if adaptive else ""
    raise ArgumentError(
        f"alphas must be finite in the bank's dtype {alphas.dtype}{hint}; got {bad[:8].tolist()}"
    )


def check_values(values: Any, bank: Any) -> torch.Tensor:
    """``values`` as a ``(B, K', H, W)`` tensor (a view when given ``(K', H, W)``)."""
    if isinstance(values, np.ndarray):
        if not values.dtype.isnative:
            values = values.astype(values.dtype.newbyteorder("="))  # torch needs native order
        try:
            values = torch.from_numpy(values)
        except TypeError:
            raise DTypeError(
                f"values must have a floating dtype torch can hold; got {values.dtype}"
            ) from None
    if not isinstance(values, torch.Tensor):
        raise ArgumentError(f"values must be a torch.Tensor; got {type(values).__name__}")
    want = f"(K, {bank.H}, {bank.W}) or ({bank.B}, K, {bank.H}, {bank.W})"
    if values.ndim not in (3, 4) or tuple(values.shape[-2:]) != (bank.H, bank.W):
        raise ShapeError(f"values must have shape {want}; got {tuple(values.shape)}")
    if values.ndim == 4 and values.shape[0] != bank.B:
        raise ShapeError(f"values must have shape {want}; got {tuple(values.shape)}")
    if values.shape[-3] == 0:
        raise ShapeError(f"values must hold at least one pattern; got shape {tuple(values.shape)}")
    if values.dtype != bank.dtype:
        raise DTypeError(
            f"values must have the bank's dtype {bank.dtype}; got {values.dtype} "
            f"(convert with values.to({bank.dtype}))"
        )
    if values.device != bank.device:
        raise ArgumentError(
            f"values must be on the bank's device {bank.device}; got {values.device}"
        )
    if values.ndim == 4:
        return values
    if values.layout == torch.sparse_coo:
        v = values.coalesce()
        idx, val = v.indices(), v.values()
        nnz = val.shape[0]
        b = torch.arange(bank.B, device=idx.device).repeat_interleave(nnz)
        idx4 = torch.cat([b.unsqueeze(0), idx.repeat(1, bank.B)], 0)
        return torch.sparse_coo_tensor(
            idx4,
            val.repeat(bank.B),
            (bank.B, *values.shape),
            is_coalesced=True,
            check_invariants=False,
        )
    return values.unsqueeze(0).expand(bank.B, -1, -1, -1)


def as_keys(keys: Any, kp: int | None, B: int, K: int, name: str) -> torch.Tensor | None:
    """Validated int64 keys of shape ``(K',)`` or ``(B, K')``, or None for ``0 .. kp-1``."""
    if keys is None:
        if kp is not None and kp > K:
            raise ShapeError(
                f"values hold {kp} patterns but the bank has K={K} keys; pass keys or a "
                "larger code book"
            )
        return None
    if isinstance(keys, (int, np.integer)) and not isinstance(keys, bool):
        if not 0 <= int(keys) < K:
            raise ArgumentError(f"{name} must be in [0, {K}); got {int(keys)}")
        t = torch.tensor([int(keys)], dtype=torch.int64)
    elif isinstance(keys, torch.Tensor):
        if keys.dtype in (torch.bool,) or keys.is_floating_point() or keys.is_complex():
            raise DTypeError(f"{name} must be an integer tensor; got {keys.dtype}")
        t = keys.to(torch.int64)
        if t.ndim == 0:
            t = t.reshape(1)
    elif isinstance(keys, (Sequence, range, np.ndarray)) and not isinstance(keys, (str, bytes)):
        arr = np.asarray(keys)
        if arr.size and arr.dtype.kind not in "iu":
            raise DTypeError(f"{name} must hold integers; got dtype {arr.dtype}")
        if arr.size and arr.dtype == np.uint64 and int(arr.max()) >= K:
            # checked before the int64 cast, which would wrap 2**63 + 1 to a negative key
            raise ArgumentError(f"{name} must be in [0, {K}); got {int(arr.max())}")
        t = torch.from_numpy(arr.astype(np.int64, copy=False).reshape(arr.shape))
    else:
        raise ArgumentError(
            f"{name} must be an int, a sequence or a tensor of ints; got {_shown(keys)}"
        )
    if t.ndim not in (1, 2) or (t.ndim == 2 and t.shape[0] != B):
        raise ShapeError(f"{name} must have shape (K',) or ({B}, K'); got {tuple(t.shape)}")
    if kp is not None and t.shape[-1] != kp:
        raise ShapeError(f"{name} must hold {kp} keys to match values; got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ShapeError(f"{name} must hold at least one key; got shape {tuple(t.shape)}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= K:
        bad = lo if lo < 0 else hi
        raise ArgumentError(f"{name} must be in [0, {K}); got {bad}")
    return t

"""Batch-1 4-bit mat-vec on CUDA with Triton, reading the packed codes directly.

``QuantizedLinear`` on a CUDA device uses this for one input row and 4-bit
weights when Triton is importable; the first call of each process checks it
against the torch path (dequantize + ``F.linear``) and falls back to that path,
with a warning, if Triton fails or disagrees. Anything else (batches, 2/3/8-bit)
takes the torch path.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

_STATE: dict[str, Any] = {"checked": False, "ok": False}

try:  # pragma: no cover - needs CUDA
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv4(
        q_ptr, s_ptr, m_ptr, x_ptr, xs_ptr, y_ptr, R, G, RB,
        HAS_MIN: tl.constexpr, OFF: tl.constexpr, H: tl.constexpr,
        BLOCK_R: tl.constexpr, GB: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_R rows; each step reads GB whole groups of every row
        # (BLOCK_R x GB x H contiguous bytes per row), so the grid has enough
        # programs (rows / BLOCK_R) to fill every SM. Byte j of group k holds
        # code j (low nibble) and code H + j (high nibble).
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        kk = tl.arange(0, GB)
        j = tl.arange(0, H)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, G, GB):
            ks = k0 + kk
            kmask = ks < G
            offs = rows[:, None, None] * RB + ks[None, :, None] * H + j[None, None, :]
            m3 = rmask[:, None, None] & kmask[None, :, None]
            b = tl.load(q_ptr + offs, mask=m3, other=0).to(tl.int32)
            xo = ks[:, None] * (2 * H) + j[None, :]
            xl = tl.load(x_ptr + xo, mask=kmask[:, None], other=0.0)
            xh = tl.load(x_ptr + xo + H, mask=kmask[:, None], other=0.0)
            lo = (b & 15).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            d = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2)
            so = rows[:, None] * G + ks[None, :]
            m2 = rmask[:, None] & kmask[None, :]
            s = tl.load(s_ptr + so, mask=m2, other=0.0).to(tl.float32)
            if HAS_MIN:
                m = tl.load(m_ptr + so, mask=m2, other=0.0).to(tl.float32)
            else:
                m = s * (-OFF)
            xs = tl.load(xs_ptr + ks, mask=kmask, other=0.0)
            acc += tl.sum(s * d + m * xs[None, :], axis=1)
        tl.store(y_ptr + rows, acc, mask=rmask)

    HAVE_TRITON = True
except Exception:  # triton missing or unusable
    HAVE_TRITON = False

#: Rows per program, groups per step and warps (swept on an H200: 26% of HBM
#: on one 65536 x 4096 layer at 16 / 8 / 4, the best of 4-32 rows x 1-8 groups).
BLOCK_R, GROUPS_PER_STEP, WARPS = 16, 8, 4


def _launch(mod: Any, x: torch.Tensor) -> torch.Tensor:
    g = mod.group_size
    groups = mod.scales.shape[1]
    xp = torch.zeros(groups * g, device=x.device, dtype=torch.float32)
    xp[: mod.in_features] = x.reshape(-1)
    xs = xp.view(groups, g).sum(1)
    y = torch.empty(mod.out_features, device=x.device, dtype=torch.float32)
    has_min = mod.mins.numel() > 0
    grid = (triton.cdiv(mod.out_features, BLOCK_R),)
    _gemv4[grid](
        mod.qdata, mod.scales, mod.mins if has_min else mod.scales, xp, xs, y,
        mod.out_features, groups, mod.qdata.shape[1],
        HAS_MIN=has_min, OFF=float(1 << (mod.bits - 1)), H=g // 2,
        BLOCK_R=BLOCK_R, GB=GROUPS_PER_STEP, num_warps=WARPS,
    )  # fmt: skip
    return y


def gemv4(mod: Any, x: torch.Tensor, reference) -> torch.Tensor | None:
    """``W x`` for one row ``x`` (in_features,) on CUDA, or ``None`` to use the torch path."""
    if not HAVE_TRITON or mod.bits != 4:
        return None
    if _STATE["checked"] and not _STATE["ok"]:
        return None
    try:
        y = _launch(mod, x)
    except Exception as e:  # pragma: no cover - needs CUDA
        _STATE.update(checked=True, ok=False)
        warnings.warn(
            f"neuropil: Triton 4-bit mat-vec unavailable ({e}); using torch", stacklevel=3
        )
        return None
    if not _STATE["checked"]:
        want = reference().float().reshape(-1)
        ok = bool(torch.allclose(y, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-3))
        _STATE.update(checked=True, ok=ok)
        if not ok:  # pragma: no cover
            warnings.warn(
                "neuropil: Triton 4-bit mat-vec disagrees with torch; using torch", stacklevel=3
            )
            return None
    return y

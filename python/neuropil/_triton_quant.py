"""Batch-1 4-bit mat-vec on CUDA with Triton, reading the packed codes directly.

``QuantizedLinear`` on a CUDA device uses this for one input row and 4-bit
weights when Triton is importable; the first call of each process checks it
against the torch path (dequantize + ``F.linear``) and falls back to that path,
with a warning, if Triton fails or disagrees. Anything else (batches, 2/3/8-bit)
takes the torch path.

One launch per call (two on large layers, see ``_SPLIT_WEIGHTS``): ``x`` is
read in its own dtype (float16, bfloat16 or float32, converted to float32 in
registers, so nothing is rounded), the per-group sums of ``x`` are taken in the
kernel, the bias is added and ``y`` is written in ``x``'s dtype.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

_STATE: dict[str, Any] = {"checked": False, "ok": False}


def _nibbles_ptx(extract: str) -> str:
    """PTX turning 4 packed code bytes into 4 float32 values ``0.5 + code / 32``.

    ``extract`` moves each byte's nibble to bits 3-6; ``prmt`` then places that
    byte under the exponent byte of 0.5 (0x3F000000), giving the float bits of
    exactly ``0.5 + code / 32``. The kernel multiplies these by ``x`` and takes
    ``code . x = 32 * (sum - sum(x) / 2)`` per group, so a code costs one integer
    permute and one FMA. A plain int-to-float conversion runs at a quarter of
    the FMA rate and capped the kernel at ~47% of HBM bandwidth on an H200.
    """
    ptx = "{ .reg .b32 t, k; mov.b32 k, 0x3F000000; " + extract
    for i in range(4):  # selector 0x7i54: bytes 0, 1 of k, byte i of t, byte 3 of k
        ptx += f"prmt.b32 ${i}, t, k, 0x7{i}54; "
    return ptx + "}"


try:  # pragma: no cover - needs CUDA
    import triton
    import triton.language as tl

    _LO = tl.constexpr(_nibbles_ptx("shl.b32 t, $4, 3; and.b32 t, t, 0x78787878; "))
    _HI = tl.constexpr(_nibbles_ptx("shr.u32 t, $4, 1; and.b32 t, t, 0x78787878; "))

    @triton.jit
    def _groups(
        q_ptr, s_ptr, m_ptr, x_ptr, rows, rmask, C, G, RB,
        HAS_MIN: tl.constexpr, OFF: tl.constexpr, H: tl.constexpr, BLOCK_R: tl.constexpr,
        GB: tl.constexpr, EVEN: tl.constexpr, PTX: tl.constexpr, HEADROOM: tl.constexpr,
    ):  # fmt: skip
        # Per-group terms of BLOCK_R rows: each step reads GB whole groups of every
        # row (BLOCK_R x GB x H contiguous bytes per row). Byte j of group k holds
        # code j (low nibble) and code H + j (high nibble).
        kk = tl.arange(0, GB)
        j = tl.arange(0, H)
        acc = tl.zeros([BLOCK_R, GB], dtype=tl.float32)
        for k0 in range(0, G, GB):
            ks = k0 + kk
            kmask = ks < G
            offs = rows[:, None, None] * RB + ks[None, :, None] * H + j[None, None, :]
            m3 = rmask[:, None, None] & kmask[None, :, None]
            # The codes are read once: stream them past the cache; x stays.
            b = tl.load(q_ptr + offs, mask=m3, other=0, eviction_policy="evict_first")
            xo = ks[:, None] * (2 * H) + j[None, :]
            if EVEN:  # in_features is a multiple of the group: no padded columns
                xml = kmask[:, None]
                xmh = xml
            else:
                xml = kmask[:, None] & (xo < C)
                xmh = kmask[:, None] & (xo + H < C)
            xl = tl.load(x_ptr + xo, mask=xml, other=0.0, eviction_policy="evict_last")
            xh = tl.load(x_ptr + xo + H, mask=xmh, other=0.0, eviction_policy="evict_last")
            xl = xl.to(tl.float32)
            xh = xh.to(tl.float32)
            if HEADROOM:
                # A group with max|x| >= 2^96 runs on x * 2^-64, and its term is
                # multiplied back by 2^64: both exact (powers of two).
                gm = tl.maximum(tl.max(tl.abs(xl), axis=1), tl.max(tl.abs(xh), axis=1))
                huge = gm >= 79228162514264337593543950336.0  # 2^96
                down = tl.where(huge, 5.421010862427522e-20, 1.0)  # 2^-64
                xl = xl * down[:, None]
                xh = xh * down[:, None]
            if PTX:  # 0.5 + code / 32, exactly
                lo = tl.inline_asm_elementwise(
                    _LO, "=r,=r,=r,=r,r", [b], dtype=tl.float32, is_pure=True, pack=4
                )
                hi = tl.inline_asm_elementwise(
                    _HI, "=r,=r,=r,=r,r", [b], dtype=tl.float32, is_pure=True, pack=4
                )
            else:  # the same values where there is no PTX (interpreter, other GPUs)
                lo = (b & 15).to(tl.float32) * 0.03125 + 0.5
                hi = (b >> 4).to(tl.float32) * 0.03125 + 0.5
            xs = tl.sum(xl + xh, axis=1)  # sum of x per group (for the mins)
            f = tl.sum(lo * xl[None, :, :] + hi * xh[None, :, :], axis=2)
            d = 32.0 * (f - 0.5 * xs[None, :])
            so = rows[:, None] * G + ks[None, :]
            m2 = rmask[:, None] & kmask[None, :]
            s = tl.load(s_ptr + so, mask=m2, other=0.0, eviction_policy="evict_first").to(
                tl.float32
            )
            if HAS_MIN:
                m = tl.load(m_ptr + so, mask=m2, other=0.0, eviction_policy="evict_first").to(
                    tl.float32
                )
            else:
                m = s * (-OFF)
            term = s * d + m * xs[None, :]
            if HEADROOM:
                term = term * tl.where(huge, 18446744073709551616.0, 1.0)[None, :]  # 2^64
            acc += term
        return tl.sum(acc, axis=1)

    @triton.jit
    def _bad(y):
        # How many of y's values are NaN or infinite.
        return tl.sum(((y != y) | (tl.abs(y) == float("inf"))).to(tl.int32), axis=0)

    @triton.jit
    def _gemv4(
        q_ptr, s_ptr, m_ptr, x_ptr, b_ptr, y_ptr, R, C, G, RB,
        HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, OFF: tl.constexpr, H: tl.constexpr,
        BLOCK_R: tl.constexpr, GB: tl.constexpr, EVEN: tl.constexpr, PTX: tl.constexpr,
        RESCUE: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_R rows, so the grid has enough programs (rows /
        # BLOCK_R) to fill every SM.
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        y = _groups(q_ptr, s_ptr, m_ptr, x_ptr, rows, rmask, C, G, RB, HAS_MIN, OFF, H,
                    BLOCK_R, GB, EVEN, PTX, False)  # fmt: skip
        # Headroom: a group's code dot and sum of x reach ~1000 max|x| before its
        # scale brings them down, so from max|x| ~1e35 they overflow float32
        # although W x fits (as on the CPU, rust/src/quant/headroom.rs). An
        # overflow never returns to a finite value, so rows that are finite are
        # exact as they are; the others run again with huge groups rescaled,
        # here (RESCUE) or in `_rescue4`. Checking x per group on every call
        # cost 15-28% of the time of a large layer on an H100.
        if RESCUE:
            if _bad(y) > 0:
                y = _groups(q_ptr, s_ptr, m_ptr, x_ptr, rows, rmask, C, G, RB, HAS_MIN, OFF,
                            H, BLOCK_R, GB, EVEN, PTX, True)  # fmt: skip
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y, mask=rmask)

    @triton.jit
    def _rescue4(
        q_ptr, s_ptr, m_ptr, x_ptr, b_ptr, y_ptr, R, C, G, RB,
        HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr, OFF: tl.constexpr, H: tl.constexpr,
        BLOCK_R: tl.constexpr, GB: tl.constexpr, EVEN: tl.constexpr, PTX: tl.constexpr,
        SPAN: tl.constexpr,
    ):  # fmt: skip
        # The headroom pass of a large layer, after `_gemv4` without RESCUE: one
        # program scans SPAN row blocks of y at once and redoes only blocks
        # with a non-finite row. (A float16 y that overflowed although its
        # float32 value was finite is redone too, to the same result.)
        pid = tl.program_id(0)
        r = pid * (SPAN * BLOCK_R) + tl.arange(0, SPAN * BLOCK_R)
        yv = tl.load(y_ptr + r, mask=r < R, other=0.0).to(tl.float32)
        if _bad(yv) > 0:
            for i in range(SPAN):
                rows = (pid * SPAN + i) * BLOCK_R + tl.arange(0, BLOCK_R)
                rmask = rows < R
                old = tl.load(y_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
                if _bad(old) > 0:
                    y = _groups(q_ptr, s_ptr, m_ptr, x_ptr, rows, rmask, C, G, RB, HAS_MIN,
                                OFF, H, BLOCK_R, GB, EVEN, PTX, True)  # fmt: skip
                    if HAS_BIAS:
                        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
                    tl.store(y_ptr + rows, y, mask=rmask)

    HAVE_TRITON = True
except Exception:  # triton missing or unusable
    HAVE_TRITON = False

#: Rows per program, code bytes per row and step, and warps: swept on an H200
#: (65536 x 4096 layer, 4-16 rows x 256-1024 bytes x 1-4 warps): 53% of the
#: HBM read bandwidth at 4 / 256 / 1, the best configuration within noise.
BLOCK_R, STEP_BYTES, WARPS = 4, 256, 1

#: Layers of at least this many weights check for the headroom rerun in a second
#: launch that scans 1,024 rows per program, not in the main kernel. On an H100
#: (CUDA graph, float16 / float32 x, against the kernel without any rerun): in the
#: kernel +21% / +18% on 65536 x 4096, +26% / +6% on 11008 x 4096, -5% / -2% on
#: 4096 x 4096; in a second launch +2% / +2%, +9% / +7%, +12% / +12% at 8192 x
#: 4096. The second launch costs ~1.5 us whatever the size, the check in the
#: kernel slows all of it. Both give the same bits (same warps, same order).
_SPLIT_WEIGHTS = 1 << 25
_RESCUE_ROWS = 1024


def _use_ptx(x: torch.Tensor) -> bool:
    return (
        torch.version.cuda is not None and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    )


def _launch(mod: Any, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    g = mod.group_size
    groups = mod.scales.shape[1]
    x = x.reshape(-1).contiguous()
    even = mod.in_features == groups * g
    y = torch.empty(mod.out_features, device=x.device, dtype=x.dtype)
    has_min = mod.mins.numel() > 0
    has_bias = bias and mod.bias is not None
    rescue_here = mod.out_features * mod.in_features < _SPLIT_WEIGHTS
    args = (
        mod.qdata, mod.scales, mod.mins if has_min else mod.scales, x,
        mod.bias if has_bias else x, y,
        mod.out_features, mod.in_features, groups, mod.qdata.shape[1],
    )  # fmt: skip
    meta = dict(
        HAS_MIN=has_min, HAS_BIAS=has_bias, OFF=float(1 << (mod.bits - 1)), H=g // 2,
        BLOCK_R=BLOCK_R, GB=max(1, STEP_BYTES // (g // 2)), EVEN=even, PTX=_use_ptx(x),
    )  # fmt: skip
    grid = (triton.cdiv(mod.out_features, BLOCK_R),)
    _gemv4[grid](*args, **meta, RESCUE=rescue_here, num_warps=WARPS)
    if not rescue_here:
        span = _RESCUE_ROWS // BLOCK_R
        _rescue4[(triton.cdiv(mod.out_features, _RESCUE_ROWS),)](
            *args, **meta, SPAN=span, num_warps=WARPS
        )
    return y


def gemv4(mod: Any, x: torch.Tensor, reference) -> torch.Tensor | None:
    """``W x + b`` for one row ``x`` on CUDA in ``x``'s dtype, or ``None`` to use the torch path."""
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
        yf = y.float()
        ok = bool(torch.allclose(yf, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-3))
        _STATE.update(checked=True, ok=ok)
        if not ok:  # pragma: no cover
            warnings.warn(
                "neuropil: Triton 4-bit mat-vec disagrees with torch; using torch", stacklevel=3
            )
            return None
    return y

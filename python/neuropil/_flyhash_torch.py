"""The torch path of :class:`neuropil.flyhash.FlyHash` for tensors on a GPU.

The projection comes from the Rust core as packed arrays (sign bits, or sparse
indices and sign bits: the same bytes on every device), is uploaded once per
device and expanded to ±1 (or 0/1) float32 rows in blocks during encode, so
the GPU holds the compact projection plus one block; ``hash``, ``encode`` and
``encode_indices`` run over steps of rows, so their activations and sort
buffers are one step's, not ``(n, m)``. Activations are float32
matmuls at full precision (TF32 off); winner-take-all is a stable descending
sort, which keeps the lowest index among equal values: the CPU's tie rule.
Codes therefore equal the CPU's except where two activations are within float
rounding of each other at the threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._scoped import no_tf32
from .errors import DTypeError, ShapeError, _non_finite

if TYPE_CHECKING:
    import torch

    from .flyhash import FlyHash

_BLOCK_ROWS = 4096

# Winner-take-all runs over steps of rows whose intermediates (activations,
# the sort's values and int64 indices: 16 bytes per output) take about this
# much, so ``hash`` and ``encode_indices`` of n rows need their small outputs
# plus one step, not 16 n m bytes (1M x 4992 outputs: 80 GB), as the CPU path
# needs one batch of rows.
_STEP_BYTES = 256 << 20


def _weights(fh: FlyHash, device: torch.device) -> dict[str, torch.Tensor]:
    import torch

    key = str(device)
    cached = fh._torch_cache.get(key)
    if cached is None:
        cached = {
            name: torch.from_numpy(
                arr.astype("int64") if arr.dtype.kind == "u" and arr.dtype.itemsize == 2 else arr
            ).to(device)
            for name, arr in fh.projection_arrays().items()
        }
        fh._torch_cache[key] = cached
    return cached


def _block(fh: FlyHash, w: dict[str, torch.Tensor], r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of the projection as a dense float32 ``(r1 - r0, d)`` tensor."""
    import torch

    d = fh.input_dim
    if "sign_bits" in w:
        bits = w["sign_bits"][r0:r1]
        shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
        unpacked = (bits.unsqueeze(-1) >> shifts) & 1
        on = unpacked.reshape(r1 - r0, -1)[:, :d].to(torch.float32)
        return on * 2 - 1
    idx = w["indices"][r0:r1]
    c = idx.shape[1]
    signs = w["signs"][r0:r1]
    shifts = torch.arange(8, device=idx.device, dtype=torch.uint8)
    neg = ((signs.unsqueeze(-1) >> shifts) & 1).reshape(r1 - r0, -1)[:, :c]
    vals = 1.0 - 2.0 * neg.to(torch.float32)
    dense = torch.zeros((r1 - r0, d), dtype=torch.float32, device=idx.device)
    return dense.scatter_(1, idx, vals)


def _check_input(fh: FlyHash, x: torch.Tensor) -> None:
    """DTypeError / ShapeError unless ``x`` is a float ``(n, d)`` tensor; n may
    be 0 (an empty batch gives an empty output, as on the CPU)."""
    if not x.is_floating_point():
        raise DTypeError(f"x must have a float dtype; got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != fh.input_dim:
        raise ShapeError(f"x must have shape (n, {fh.input_dim}); got {tuple(x.shape)}")


def activations(fh: FlyHash, x: torch.Tensor) -> torch.Tensor:
    """``(n, d)`` -> ``(n, m)`` float32 activations on ``x``'s device."""
    import torch

    _check_input(fh, x)
    x = x.to(torch.float32).contiguous()
    if not bool(torch.isfinite(x).all()):
        raise _non_finite("x", x)
    w = _weights(fh, x.device)
    m = fh.output_dim
    out = torch.empty((x.shape[0], m), dtype=torch.float32, device=x.device)
    with no_tf32():
        for r0 in range(0, m, _BLOCK_ROWS):
            r1 = min(m, r0 + _BLOCK_ROWS)
            out[:, r0:r1] = x @ _block(fh, w, r0, r1).T
    return out


def winners(fh: FlyHash, acts: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` int64 winner indices, ascending (ties: lowest index)."""
    import torch

    order = torch.sort(acts + 0.0, dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, : fh.active_bits], dim=1).values


def _pack(win: torch.Tensor, m: int) -> torch.Tensor:
    """Winner indices ``(r, k)`` as packed bits: bit ``j % 8`` of byte ``j // 8``."""
    import torch

    r = win.shape[0]
    nb = (m + 7) // 8
    bits = torch.zeros((r, nb * 8), dtype=torch.uint8, device=win.device)
    bits.scatter_(1, win, 1)
    weights = (1 << torch.arange(8, device=win.device, dtype=torch.int32)).to(torch.uint8)
    return (bits.reshape(r, nb, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def encode(fh: FlyHash, x: Any, want: str) -> Any:
    import torch

    if want == "activations":
        return activations(fh, x)
    _check_input(fh, x)
    n, m, k = x.shape[0], fh.output_dim, fh.active_bits
    if want == "encode":
        out = torch.zeros((n, m), dtype=torch.float32, device=x.device)
    elif want == "encode_indices":
        out = torch.empty((n, k), dtype=torch.int64, device=x.device)
    else:
        out = torch.empty((n, (m + 7) // 8), dtype=torch.uint8, device=x.device)
    step = max(1, _STEP_BYTES // (16 * m))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        acts = activations(fh, x[r0:r1])
        win = winners(fh, acts)
        if want == "encode_indices":
            out[r0:r1] = win
        elif want == "encode":
            out[r0:r1].scatter_(1, win, acts.gather(1, win))
        else:
            out[r0:r1] = _pack(win, m)
    return out

"""Image-quality metrics for recalled patterns: PSNR and SSIM (standard definitions).

Both accept torch tensors of any float dtype on any device (computed in float64,
or float32 on devices without float64) and return Python floats.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ..errors import ArgumentError, DTypeError, ShapeError, _shown

__all__ = ["psnr", "ssim"]


def _pair(x: torch.Tensor, y: torch.Tensor, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{fn}: {name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise DTypeError(f"{fn}: {name} must be a floating tensor; got {t.dtype}")
    if x.shape != y.shape:
        raise ShapeError(f"{fn}: y must have the shape of x {tuple(x.shape)}; got {tuple(y.shape)}")
    if x.device != y.device:
        raise ArgumentError(f"{fn}: y must be on x's device {x.device}; got {y.device}")
    if x.numel() == 0:
        raise ShapeError(f"{fn}: x must not be empty; got shape {tuple(x.shape)}")
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    return x.detach().to(wide), y.detach().to(wide)


def _range(x: torch.Tensor, data_range: float | None, fn: str) -> float:
    if data_range is None:
        data_range = float(x.max() - x.min())
    elif isinstance(data_range, bool) or not isinstance(data_range, numbers.Real):
        raise ArgumentError(f"{fn}: data_range must be a number; got {_shown(data_range)}")
    if not (data_range > 0 and math.isfinite(data_range)):
        raise ArgumentError(
            f"{fn}: data_range must be positive and finite; got {data_range} "
            "(pass data_range when the reference is constant)"
        )
    return float(data_range)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE(x, y))`` in dB.

    Args:
        x: Reference, any shape, float.
        y: Estimate, same shape, dtype kind and device as ``x``.
        data_range: Peak-to-peak range of the signal (e.g. 1.0, 255); default
            ``x.max() - x.min()``.

    Returns:
        PSNR in dB; ``inf`` when ``x == y`` exactly, ``-inf`` when the error
        is infinite (e.g. an overflowed float16 recall), NaN when ``y`` holds NaN.
    """
    x, y = _pair(x, y, "psnr")
    r = _range(x, data_range, "psnr")
    mse = float((x - y).pow(2).mean())
    if mse == 0:
        return math.inf
    if mse == math.inf:
        return -math.inf
    # In two logarithms: r * r / mse underflows to 0 (log10 raises) or overflows
    # for a tiny or huge data_range or error.
    return 20 * math.log10(r) - 10 * math.log10(mse)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float | None = None,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean structural similarity (Wang et al. 2004), as ``skimage.metrics.structural_similarity``.

    Uniform ``win_size x win_size`` windows over valid positions, sample
    (co)variances (``N / (N - 1)``), ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2``: the
    defaults of scikit-image, whose values this matches (it crops the border
    the same way). Leading dimensions are treated as separate images and averaged.

    Args:
        x: Reference, ``(..., H, W)`` with ``H, W >= win_size``.
        y: Estimate, same shape.
        data_range: As for :func:`psnr`.
        win_size: Odd window size.
        k1: Luminance constant.
        k2: Contrast constant.

    Returns:
        Mean SSIM in [-1, 1]; 1.0 when ``x == y``.
    """
    x, y = _pair(x, y, "ssim")
    if x.ndim < 2:
        raise ShapeError(f"ssim: x must have shape (..., H, W); got {tuple(x.shape)}")
    if (
        isinstance(win_size, bool)
        or not isinstance(win_size, numbers.Integral)
        or win_size < 3
        or win_size % 2 == 0
    ):
        raise ArgumentError(f"ssim: win_size must be an odd integer >= 3; got {win_size}")
    win_size = int(win_size)
    h, w = x.shape[-2:]
    if h < win_size or w < win_size:
        raise ShapeError(f"ssim: x must be at least {win_size}x{win_size} (win_size); got {h}x{w}")
    r = _range(x, data_range, "ssim")
    x = x.reshape(-1, 1, h, w)
    y = y.reshape(-1, 1, h, w)
    n = win_size * win_size
    cov = n / (n - 1)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, win_size, stride=1)

    ux, uy = mean(x), mean(y)
    vx = cov * (mean(x * x) - ux * ux)
    vy = cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())

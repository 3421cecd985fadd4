"""Fidelity, capacity and persistence measurements shared by the tour and the
benchmark (``neuropil bench membrane`` prints them next to the speeds)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .bank import MembraneBank
from .extras import AdaptivePersistence, HierarchicalMembraneBank, HopfieldCleanup
from .metrics import psnr


def digits(n: int = 1797, seed: int = 0) -> torch.Tensor:
    """scikit-learn's 8x8 handwritten digits in [0, 1], shuffled: ``(n, 8, 8)`` float32."""
    from sklearn.datasets import load_digits

    d = load_digits().images.astype(np.float32) / 16.0
    d = d[np.random.default_rng(seed).permutation(len(d))[:n]]
    return torch.from_numpy(np.ascontiguousarray(d))


def photo_patches(size: int = 32, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Grayscale ``size x size`` tiles of scikit-learn's sample photos, in [0, 1].

    Returns ``(n, size, size)`` float32.
    """
    from sklearn.datasets import load_sample_images

    tiles = []
    for im in load_sample_images().images:
        g = im.astype(np.float32).mean(2) / 255.0
        for i in range(0, g.shape[0] - size + 1, size):
            for j in range(0, g.shape[1] - size + 1, size):
                tiles.append(g[i : i + size, j : j + size])
    t = np.stack(tiles)[np.random.default_rng(seed).permutation(len(tiles))[:n]]
    return torch.from_numpy(np.ascontiguousarray(t))


def rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    x64, y64 = x.double(), y.double()
    return float((x64 - y64).norm() / x64.norm())


def fidelity(
    patterns: torch.Tensor, L: int, codes: str, readout: str, **kw: Any
) -> dict[str, float]:
    """Stores ``patterns`` (K, H, W) under keys 0..K-1 and reads them back."""
    K, H, W = patterns.shape
    bank = MembraneBank(
        L,
        H,
        W,
        codes=codes,
        K=max(K, L) if codes in ("gaussian", "auto") else L,
        readout=readout,
        **kw,
    )
    bank.store(patterns.to(bank.device, bank.dtype))
    y = bank.read(range(K))[0].to(patterns.device, patterns.dtype)
    return {"psnr": psnr(patterns, y, data_range=1.0), "rel_error": rel_error(patterns, y)}


def crosstalk(L: int, K: int, codes: str = "gaussian", seed: int = 0) -> dict[str, float]:
    """Relative error of the correlation readout with K zero-mean random patterns."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(K, 16, 16, generator=g)
    bank = MembraneBank(L, 16, 16, codes=codes, K=K, seed=seed)
    bank.store(v)
    meas = rel_error(v, bank.read()[0])
    want = math.sqrt((K - 1) / L)
    return {
        "measured": meas,
        "sqrt((K-1)/L)": want,
        "ratio": meas / want,
        "code_crosstalk": bank.stats()["code_crosstalk"],
    }


def cleanup(patterns: torch.Tensor, L: int, K: int, iters: int = 3) -> dict[str, float]:
    """Top-1 recall and PSNR of K patterns in a bank of L layers (codes="auto")."""
    v = patterns[:K]
    mu = v.mean(0)
    bank = MembraneBank(L, v.shape[1], v.shape[2], codes="auto", K=K)
    bank.store(v - mu, alphas="adaptive")
    raw = bank.read(unscale=True)[0] + mu
    hop = HopfieldCleanup(v, beta=1000.0)
    keys, near0, _ = hop.decode(bank, iters=0, offset=mu)
    keys, near, out = hop.decode(bank, iters=iters, offset=mu)
    return {
        "top1_readout": float((near0 == keys).float().mean()),
        "top1_cleanup": float((near == keys).float().mean()),
        "psnr_readout": psnr(v, raw, data_range=1.0),
        "psnr_cleanup": psnr(v, out, data_range=1.0),
    }


def persistence(lam: float = 0.95, T: int = 50) -> dict[str, float]:
    """Amplitude of a recalled pattern after T automatic-persistence steps."""
    bank = MembraneBank(32, 16, 16, codes="hadamard", persistence=lam)
    v = torch.rand(32, 16, 16, generator=torch.Generator().manual_seed(1))
    bank.store(v)  # one step (decays the empty state)
    bank.step(T)
    y = bank.read()[0].double()
    amp = float((y * v.double()).sum() / v.double().pow(2).sum())
    return {
        "lam": lam,
        "T": T,
        "amplitude": amp,
        "lam^T": lam**T,
        "abs_error": abs(amp - lam**T),
        "half_life": bank.half_life,
    }


def adaptive_alpha(L: int = 64, seed: int = 0) -> dict[str, float]:
    """Worst-pattern PSNR of mixed-energy digits (energies spread over 100x) past L."""
    v = digits(2 * L, seed)
    scale = torch.logspace(-1, 1, 2 * L)
    mixed = v * scale[:, None, None]
    out = {}
    for mode in ("uniform", "adaptive"):
        bank = MembraneBank(L, 8, 8, codes="auto", K=2 * L)
        bank.store(mixed, alphas=None if mode == "uniform" else "adaptive")
        y = bank.read(unscale=True)[0]
        worst = min(psnr(mixed[k], y[k], data_range=float(scale[k])) for k in range(2 * L))
        out[f"worst_psnr_{mode}"] = worst
    return out


def adaptive_persistence(T: int = 40) -> dict[str, float]:
    """Amplitude after T steps of keys read 0 and 100 times, vs uniform decay."""
    bank = MembraneBank(32, 8, 8, codes="dct")
    v = digits(32)
    bank.store(v)
    for _ in range(100):
        bank.read(range(8))  # keys 0..7 are "hot"
    ap = AdaptivePersistence(bank, base_lambda=0.9, max_lambda=0.99, saturation=100)
    lam = ap.lambdas()[0]
    ap.step(T)
    y = bank.read()[0].double()
    amp = ((y * v.double()).sum((1, 2)) / v.double().pow(2).sum((1, 2))).tolist()
    want = (lam**T).tolist()
    return {
        "hot_amplitude": amp[0],
        "cold_amplitude": amp[-1],
        "hot_expected": want[0],
        "cold_expected": want[-1],
        "max_abs_error": max(abs(a - b) for a, b in zip(amp, want, strict=True)),
    }


def hierarchical(L: int = 32) -> dict[str, float]:
    """Hierarchical (L, L/2, L/4) vs one flat bank of the same total layers."""
    hb = HierarchicalMembraneBank(L, 8, 8, levels=3, codes="dct")
    total = hb.K
    flat = MembraneBank(total, 8, 8, codes="dct")
    v = digits(total)
    hb.store(v, range(total))
    flat.store(v)
    return {
        "keys": total,
        "psnr_hierarchical": psnr(v, hb.read()[0], data_range=1.0),
        "psnr_flat": psnr(v, flat.read()[0], data_range=1.0),
        "bytes_hierarchical": hb.stats()["bytes"],
        "bytes_flat": flat.stats()["bytes"],
    }

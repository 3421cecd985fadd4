"""Tour section of the membrane bank: real images (scikit-learn's digits and
sample photos) stored and recalled, a PNG grid of stored vs recalled patterns
with PSNR, and a capacity plot (PSNR and top-1 recall vs K/L)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def membrane(out: Path, verbose: bool = True) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .membrane import HopfieldCleanup, MembraneBank, psnr, ssim
    from .membrane import _evaluate as ev

    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    photos = ev.photo_patches(32, 32)  # 32 real 32x32 photo tiles
    digits = ev.digits()

    # 1. Fidelity on real photo tiles, K = L = 32.
    fid = {}
    recalls = {}
    for codes, readout in [
        ("hadamard", "correlation"),
        ("dct", "correlation"),
        ("gaussian", "correlation"),
        ("gaussian", "pinv"),
    ]:
        bank = MembraneBank(32, 32, 32, codes=codes, readout=readout)
        bank.store(photos)
        y = bank.read()[0]
        name = f"{codes}/{readout}"
        recalls[name] = y
        fid[name] = {
            "psnr_db": round(psnr(photos, y, data_range=1.0), 1),
            "ssim": round(ssim(photos, y, data_range=1.0), 4),
            "rel_error": float(f"{ev.rel_error(photos, y):.3g}"),
        }
    report["photos_K=L=32"] = fid

    # 2. PNG grid: 6 tiles, stored vs each recall, with PSNR.
    cols = 6
    fig, axes = plt.subplots(1 + len(recalls), cols, figsize=(cols * 1.4, (1 + len(recalls)) * 1.6))
    rows = [("stored", photos), *recalls.items()]
    for r, (name, imgs) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(imgs[c].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r:
                p = psnr(photos[c], imgs[c], data_range=1.0)
                ax.set_title(f"{'inf' if math.isinf(p) else f'{p:.0f}'} dB", fontsize=7)
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.suptitle("membrane bank, L = K = 32: stored vs recalled (PSNR)", fontsize=9)
    fig.tight_layout()
    grid = out / "membrane_grid.png"
    fig.savefig(grid, dpi=110)
    plt.close(fig)
    report["grid_png"] = str(grid)

    # 3. Capacity: digits, L = 64, K/L from 0.25 to 4, per code and readout.
    L = 64
    fracs = [0.25, 0.5, 1.0, 2.0, 4.0]
    curves: dict[str, dict[str, list[float | None]]] = {}
    configs = [
        ("hadamard", "correlation", False),
        ("gaussian", "correlation", False),
        ("gaussian", "pinv", False),
        ("auto", "correlation", False),
        ("auto", "correlation", True),
    ]
    for codes, readout, clean in configs:
        name = f"{codes}/{readout}" + ("+cleanup" if clean else "")
        ps: list[float | None] = []
        top: list[float | None] = []
        for f in fracs:
            K = int(f * L)
            if (codes == "hadamard" or readout == "pinv") and K > L:
                ps.append(None)
                top.append(None)
                continue
            v = digits[:K]
            hop = HopfieldCleanup(v, beta=1000.0)
            if clean:
                res = ev.cleanup(digits, L, K)
                ps.append(min(res["psnr_cleanup"], 150.0))
                top.append(res["top1_cleanup"])
                continue
            bank = MembraneBank(L, 8, 8, codes=codes, K=max(K, L), readout=readout)
            bank.store(v)
            y = bank.read(range(K))[0]
            ps.append(min(psnr(v, y, data_range=1.0), 150.0))
            top.append(float((hop.nearest(y) == torch.arange(K)).float().mean()))
        curves[name] = {"psnr_db": ps, "top1": top}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, cv in curves.items():
        xs = [f for f, p in zip(fracs, cv["psnr_db"], strict=True) if p is not None]
        a1.plot(xs, [p for p in cv["psnr_db"] if p is not None], marker="o", label=name)
        a2.plot(xs, [t for t in cv["top1"] if t is not None], marker="o", label=name)
    for ax, lab in ((a1, "PSNR (dB, capped at 150)"), (a2, "top-1 recall")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K / L (L = 64, 8x8 digits)")
        ax.set_ylabel(lab)
        ax.axvline(1.0, color="gray", lw=0.5)
    a2.legend(fontsize=7)
    fig.tight_layout()
    cap = out / "membrane_capacity.png"
    fig.savefig(cap, dpi=110)
    plt.close(fig)
    report["capacity_png"] = str(cap)
    report["capacity_K/L"] = fracs
    report["capacity"] = curves

    # 4. Persistence and the improvement list, measured.
    report["persistence"] = ev.persistence(0.95, 50)
    report["crosstalk_gaussian_K=2L"] = ev.crosstalk(64, 128)
    report["cleanup_digits_K=2L"] = ev.cleanup(digits, 64, 128)
    report["adaptive_alpha"] = ev.adaptive_alpha()
    report["adaptive_persistence"] = ev.adaptive_persistence()
    report["hierarchical"] = ev.hierarchical()

    if verbose:
        print("  32 real photo tiles (32x32) in a bank of L = 32 layers:")
        for name, fd in fid.items():
            print(
                f"    {name:<22} PSNR {fd['psnr_db']:>6} dB  SSIM {fd['ssim']:.4f}  "
                f"rel.err {fd['rel_error']:.2g}"
            )
        c = report["crosstalk_gaussian_K=2L"]
        print(
            f"  crosstalk, Gaussian codes, K = 2L: {c['measured']:.3f} "
            f"(sqrt((K-1)/L) = {c['sqrt((K-1)/L)']:.3f})"
        )
        cl = report["cleanup_digits_K=2L"]
        print(
            f"  digits at K = 2L = 128: top-1 recall {cl['top1_readout']:.1%} raw, "
            f"{cl['top1_cleanup']:.1%} after the Hopfield clean-up"
        )
        p = report["persistence"]
        print(
            f"  persistence lam = {p['lam']}: amplitude after {p['T']} steps {p['amplitude']:.6f} "
            f"(lam^T = {p['lam^T']:.6f}); half-life {p['half_life']:.1f} steps"
        )
        a = report["adaptive_alpha"]
        print(
            f"  adaptive alpha (energies over 100x, K = 2L): worst PSNR "
            f"{a['worst_psnr_uniform']:.1f} -> {a['worst_psnr_adaptive']:.1f} dB"
        )
        ap = report["adaptive_persistence"]
        print(
            f"  adaptive persistence, 40 steps: hot key {ap['hot_amplitude']:.3f}, "
            f"cold key {ap['cold_amplitude']:.3f}"
        )
        print(f"  wrote {grid.name} and {cap.name} to {out}")
    return report

"""``neuropil bench membrane``: the membrane bank against plain torch ``einsum``.

Speeds are patterns per second (stores or reads), measured side by side with
``einsum('lk,bkhw->blhw')`` / ``einsum('blhw,lk->bkhw')`` on the same tensors,
next to the original prototype's best figures (134,041 writes/s, 341,295
reads/s) and the GEMM limit (the machine's measured ``torch.mm`` FLOP/s over
the write's ``2 L H W`` FLOPs per pattern). Fidelity, crosstalk, clean-up and
persistence figures of the acceptance list are printed as rows too.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

from ._timing import Row

ORIGINAL_WRITES = 134_041.0
ORIGINAL_READS = 341_295.0


def _paired(
    fns: dict[str, Callable[[], Any]], device: Any = None, repeat: int = 7, min_time: float = 0.1
) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved.

    Each round times every function once (looping it for at least ``min_time``),
    so load from other processes falls on all of them alike.
    """
    import statistics
    import time

    import torch

    cuda = getattr(device, "type", device) == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    inner = {}
    for name, fn in fns.items():
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-9)))
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t0) / inner[name])
    return {n: statistics.median(v) for n, v in samples.items()}


def _gemm_flops(device: Any, dtype: Any, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = _paired({"mm": lambda: torch.mm(a, b)}, device, repeat=3, min_time=0.02)["mm"]
    return 2 * n**3 / t


def _case(
    L: int,
    H: int,
    W: int,
    B: int,
    device: Any,
    dtype: Any,
    precision: str,
    quick: bool,
    fast: bool | None = None,
) -> dict[str, float]:
    """Stores/s and reads/s of the bank and of plain einsum, one K = L write/read per call.

    With ``L >= 64`` the bank's GEMM path (``fast_hadamard=False``) is timed too.
    """
    import torch

    from ._scoped import tf32
    from .membrane import MembraneBank

    g = torch.Generator().manual_seed(0)
    v = torch.rand(B, L, H, W, generator=g).to(device, dtype)
    kw = {"batch": B, "codes": "hadamard", "device": device, "dtype": dtype}
    bank = MembraneBank(L, H, W, precision=precision, fast_hadamard=fast, **kw)
    C = bank.C
    M = torch.zeros(B, L, H, W, device=device, dtype=dtype)
    rep = 2 if quick else 7
    mt = 0.002 if quick else 0.2

    def ein_store() -> None:
        M.add_(torch.einsum("lk,bkhw->blhw", C, v))

    def ein_read() -> Any:
        return torch.einsum("blhw,lk->bkhw", M, C)

    # the einsum baselines run at the bank's precision; through the arbiter, so
    # the user's setting comes back exactly and exact blocks elsewhere still win
    with tf32() if precision == "tf32" else contextlib.nullcontext():
        fns = {
            "einsum_store": ein_store,
            "store": lambda: bank.store(v),
            "einsum_read": ein_read,
            "read": lambda: bank.read(),
        }
        if L >= 64:
            gemm = MembraneBank(L, H, W, precision=precision, fast_hadamard=False, **kw)
            fns["gemm_store"] = lambda: gemm.store(v)
            fns["gemm_read"] = lambda: gemm.read()
        t = _paired(
            fns,
            device,
            repeat=rep,
            min_time=mt,
        )
    out = {name: B * L / sec for name, sec in t.items()}
    # fidelity of this precision on a fresh write
    bank.clear()
    bank.store(v)
    y = bank.read().float()
    from .membrane import psnr

    out["psnr"] = psnr(v.float(), y, data_range=1.0)
    return out


def _fidelity_rows(rows: list[Row]) -> None:
    """Fidelity, crosstalk, clean-up, persistence and adaptive-alpha rows (real images)."""
    import torch

    from .membrane import _evaluate as ev

    digits = ev.digits(64)
    photos = ev.photo_patches(32, 32)
    rnd = torch.rand(64, 16, 16, generator=torch.Generator().manual_seed(0))
    gauss_corr = ev.fidelity(digits, 64, "gaussian", "correlation")["psnr"]
    for codes in ("hadamard", "dct"):
        for name, pats, L in (
            ("random 16x16", rnd, 64),
            ("digits 8x8", digits, 64),
            ("photo tiles 32x32", photos, 32),
        ):
            f = ev.fidelity(pats, L, codes, "correlation")
            rows.append(
                Row(
                    f"PSNR {codes}, K=L={L}, {name} (rel.err {f['rel_error']:.1e})",
                    "dB",
                    min(f["psnr"], 999.0),
                    {"gaussian correlation": gauss_corr},
                    limit=">= 100 dB, rel.err <= 1e-6",
                )
            )
    for name, pats, L in (("digits 8x8", digits, 64), ("photo tiles 32x32", photos, 32)):
        f = ev.fidelity(pats, L, "gaussian", "pinv")
        base = ev.fidelity(pats, L, "gaussian", "correlation")["psnr"]
        rows.append(
            Row(
                f"PSNR gaussian codes, pinv readout, K=L={L}, {name}",
                "dB",
                f["psnr"],
                {"gaussian correlation": base},
                limit=">= 100 dB",
            )
        )
    for K in (128, 256):
        c = ev.crosstalk(64, K)
        rows.append(
            Row(
                f"crosstalk gaussian codes, L=64, K={K} (measured / sqrt((K-1)/L))",
                "ratio",
                c["ratio"],
                {},
                limit="1 +- 0.2",
            )
        )
    cl = ev.cleanup(ev.digits(), 64, 128)
    rows.append(
        Row(
            "top-1 recall, digits, L=64, K=2L, Hopfield clean-up",
            "fraction",
            cl["top1_cleanup"],
            {"readout alone": cl["top1_readout"]},
            limit=">= 0.99",
        )
    )
    p = ev.persistence(0.95, 50)
    rows.append(
        Row(
            f"persistence lam=0.95, T=50: |amplitude - lam^T| (half-life "
            f"{p['half_life']:.1f} steps)",
            "abs",
            p["abs_error"],
            {},
            limit="<= 1e-5",
            lower_is_better=True,
        )
    )
    a = ev.adaptive_alpha()
    rows.append(
        Row(
            "adaptive alpha: worst PSNR, energies over 100x, K=2L",
            "dB",
            a["worst_psnr_adaptive"],
            {"alpha=1": a["worst_psnr_uniform"]},
        )
    )


def membrane(quick: bool = False, verbose: bool = True) -> list[Row]:
    import torch

    from .membrane import MembraneBank

    rows: list[Row] = []
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()

    # --- fidelity (acceptance); real images come with scikit-learn ---
    try:
        _fidelity_rows(rows)
    except ModuleNotFoundError as e:
        if verbose:
            print(f"fidelity rows skipped: missing optional dependency {e.name}")

    # --- CPU speed ---
    small = (32, 16, 16, 64)
    big = (128, 32, 32, 1) if quick else (256, 128, 128, 1)
    r = _case(*small, cpu, torch.float32, "highest", quick)
    lim = f"original: {ORIGINAL_WRITES:,.0f}/s; {threads} threads"
    rows.append(
        Row(
            "CPU store, L=32, 16x16, batch 64",
            "patterns/s",
            r["store"],
            {"torch einsum": r["einsum_store"], "original": ORIGINAL_WRITES},
            limit=lim,
        )
    )
    rows.append(
        Row(
            "CPU read, L=32, 16x16, batch 64",
            "patterns/s",
            r["read"],
            {"torch einsum": r["einsum_read"], "original": ORIGINAL_READS},
            limit=f"original: {ORIGINAL_READS:,.0f}/s",
        )
    )
    flops = _gemm_flops(cpu, torch.float32, 256 if quick else 1024)
    L, H, W, B = big
    gemm_limit = flops / (2 * L * H * W)
    r = _case(*big, cpu, torch.float32, "highest", quick)
    lim = f"GEMM limit {gemm_limit:,.0f}/s (torch.mm {flops / 1e9:.0f} GFLOP/s)"
    rows.append(
        Row(
            f"CPU store, L={L}, {H}x{W} (factored Hadamard)",
            "patterns/s",
            r["store"],
            {
                "torch einsum": r["einsum_store"],
                "GEMM limit": gemm_limit,
                "bank GEMM path": r["gemm_store"],
            },
            limit=lim,
        )
    )
    rows.append(
        Row(
            f"CPU read, L={L}, {H}x{W} (factored Hadamard)",
            "patterns/s",
            r["read"],
            {
                "torch einsum": r["einsum_read"],
                "GEMM limit": gemm_limit,
                "bank GEMM path": r["gemm_read"],
            },
            limit=lim,
        )
    )

    # batched banks vs a loop over single banks
    Bn = 16 if quick else 64
    v = torch.rand(Bn, 32, 16, 16, generator=torch.Generator().manual_seed(2))
    batched = MembraneBank(32, 16, 16, batch=Bn)
    singles = [MembraneBank(32, 16, 16) for _ in range(Bn)]

    def loop() -> None:
        for i, s in enumerate(singles):
            s.store(v[i])

    rep, mt = (2, 0.002) if quick else (5, 0.05)
    tt = _paired({"batched": lambda: batched.store(v), "loop": loop}, repeat=rep, min_time=mt)
    t_b, t_l = tt["batched"], tt["loop"]
    rows.append(
        Row(
            f"CPU batched store, {Bn} banks in one call",
            "patterns/s",
            Bn * 32 / t_b,
            {"loop of banks": Bn * 32 / t_l},
        )
    )

    # sparse patterns: scatter path vs dense GEMM
    Ls, Hs, Ks = 64, 64, 64
    for density in (0.001, 0.01) if quick else (0.0005, 0.001, 0.002, 0.01):
        g = torch.Generator().manual_seed(3)
        dense = torch.rand(Ks, Hs, Hs, generator=g)
        dense = dense * (torch.rand(Ks, Hs, Hs, generator=g) < density)
        sp = dense.to_sparse()
        bank = MembraneBank(Ls, Hs, Hs, codes="hadamard")
        tt = _paired(
            {
                "s": functools.partial(bank.store, sp),
                "d": functools.partial(bank.store, dense),
            },
            repeat=rep,
            min_time=mt,
        )
        t_s, t_d = tt["s"], tt["d"]
        rows.append(
            Row(
                f"CPU sparse store, density {density:.2%}, L={Ls}, {Hs}x{Hs}",
                "patterns/s",
                Ks / t_s,
                {"dense store": Ks / t_d},
            )
        )

    # --- GPU ---
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        for L, H, W in ((32, 16, 16), (256, 64, 64) if quick else (256, 128, 128)):
            B = 64
            f32 = _case(L, H, W, B, gpu, torch.float32, "highest", quick)
            tf32 = _case(L, H, W, B, gpu, torch.float32, "tf32", quick)
            bf16 = _case(L, H, W, B, gpu, torch.bfloat16, "highest", quick)
            name = f"GPU L={L}, {H}x{W}, batch {B}"
            rows.append(
                Row(
                    f"{name} store fp32",
                    "patterns/s",
                    f32["store"],
                    {"torch einsum fp32": f32["einsum_store"]},
                )
            )
            rows.append(
                Row(
                    f"{name} read fp32",
                    "patterns/s",
                    f32["read"],
                    {"torch einsum fp32": f32["einsum_read"]},
                )
            )
            if L >= 64:
                fh = _case(L, H, W, B, gpu, torch.float32, "highest", quick, fast=True)
                for op in ("store", "read"):
                    rows.append(
                        Row(
                            f"{name} {op} fp32, fast_hadamard=True (PSNR {fh['psnr']:.1f} dB)",
                            "patterns/s",
                            fh[op],
                            {"bank fp32 GEMM": f32[op], "torch einsum fp32": f32[f"einsum_{op}"]},
                        )
                    )
            for tag, rr in (("tf32", tf32), ("bf16", bf16)):
                rows.append(
                    Row(
                        f"{name} store {tag} (PSNR {rr['psnr']:.1f} dB; fp32 {f32['psnr']:.1f})",
                        "patterns/s",
                        rr["store"],
                        {"bank fp32": f32["store"], f"torch einsum {tag}": rr["einsum_store"]},
                        limit=">= 2x fp32",
                    )
                )
                rows.append(
                    Row(
                        f"{name} read {tag} (PSNR {rr['psnr']:.1f} dB)",
                        "patterns/s",
                        rr["read"],
                        {"bank fp32": f32["read"], f"torch einsum {tag}": rr["einsum_read"]},
                        limit=">= 2x fp32",
                    )
                )
    for row in rows:
        if isinstance(row.neuropil, float) and math.isinf(row.neuropil):
            row.neuropil = 999.0
    return rows

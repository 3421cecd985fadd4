"""``neuropil bench flyhash``: encode speed and memory against numpy float32, the
``flyhash`` package and a per-vector int8 encoder; Hamming top-10 against faiss
``IndexBinaryFlat``; with ``--quality`` the retrieval-quality comparison
(FlyHash vs the paper's LSH and SimHash, mAP) on digits and MiniLM embeddings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from . import _native
from ._timing import Row, median_seconds
from .flyhash import BinaryIndex, FlyHash


def _numpy_baseline(d: int, m: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = (rng.integers(0, 2, size=(m, d), dtype=np.int8) * 2 - 1).astype(np.float32)

    def encode(x):
        a = x @ w.T
        return np.argpartition(a, -k, axis=1)[:, -k:]

    return w, encode


def _package_baseline(d: int, m: int, k: int):
    if importlib.util.find_spec("flyhash") is None:
        return None, 0
    import flyhash

    fh = flyhash.FlyHash(d, m, density=0.1, sparsity=k / m, seed=0)
    pm = fh.projection_matrix  # scipy CSR where scipy is installed, else a dense array
    if hasattr(pm, "indptr"):
        nbytes = pm.data.nbytes + pm.indices.nbytes + pm.indptr.nbytes
    else:
        nbytes = pm.nbytes
    return fh, nbytes


def flyhash(quick: bool = False, verbose: bool = True, quality: bool = False) -> list[Row]:
    rows: list[Row] = []
    d, ratio = (384, 13.0) if quick else (1536, 13.0)
    n = 64 if quick else 1024
    repeat = 3 if quick else 5
    x = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
    enc = {p: FlyHash(d, ratio, 0.05, seed=0, projection=p) for p in ("sign", "sparse", "seeded")}
    m, k = enc["sign"].output_dim, enc["sign"].active_bits
    size = f"d={d}, m={m}, k={k}"

    # ---- memory
    w, np_encode = _numpy_baseline(d, m, k)
    pkg, pkg_bytes = _package_baseline(d, m, k)
    mem_base = {"numpy float32": w.nbytes / 1e6, "int8 (original option A)": w.size / 1e6}
    if pkg is not None:
        mem_base["flyhash pkg"] = pkg_bytes / 1e6
    for p, fh in enc.items():
        rows.append(
            Row(
                f"projection memory, {p}, {size}",
                "MB",
                fh.memory_bytes / 1e6,
                mem_base,
                lower_is_better=True,
            )
        )

    # ---- encode speed (vectors/s), baselines measured once in this run
    t_np = median_seconds(lambda: np_encode(x), repeat=repeat)
    base = {"numpy float32": n / t_np}
    if pkg is not None:
        t_pkg = median_seconds(lambda: pkg(x), repeat=repeat)
        base["flyhash pkg"] = n / t_pkg
    w8 = w.astype(np.int8)
    few = x[: 2 if quick else 8]

    def per_vector():
        for v in few:
            a = w8.astype(np.float32) @ v
            np.argpartition(a, -k)[-k:]

    t_pv = median_seconds(per_vector, repeat=1 if quick else 3)
    base["per-vector int8->float"] = len(few) / t_pv
    best = _native.simd_level()
    speed: dict[str, float] = {}
    for p, fh in enc.items():
        for level in dict.fromkeys([best, "scalar"]):
            t = median_seconds(
                lambda fh=fh, lv=level: fh.encode_indices(x, level=lv), repeat=repeat
            )
            speed[f"{p}/{level}"] = n / t
            rows.append(Row(f"encode {p}, {size}, n={n}, {level}", "vectors/s", n / t, base))
    rows.append(
        Row(
            f"seeded encode vs sign (same codes, nothing stored), {best}",
            "vectors/s",
            speed[f"seeded/{best}"],
            {"sign (stored bits)": speed[f"sign/{best}"]},
            limit="ratio < 1 = the seeded slowdown",
        )
    )

    # ---- the torch CUDA path, when a GPU is present (same codes up to float ties)
    if not quick and importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            xc = torch.from_numpy(x).cuda()
            for p, fh in enc.items():
                cpu_idx = fh.encode_indices(x).astype(np.int64)

                def gpu(fh=fh):
                    out = fh.encode_indices(xc)
                    torch.cuda.synchronize()
                    return out

                t = median_seconds(gpu, repeat=repeat)
                agree = float((gpu().cpu().numpy() == cpu_idx).all(axis=1).mean())
                rows.append(
                    Row(
                        f"encode {p} on {torch.cuda.get_device_name()} (torch), {size}, n={n}",
                        "vectors/s",
                        n / t,
                        base,
                        limit=f"codes equal to the CPU's: {agree:.1%} of rows",
                    )
                )

    # ---- Hamming top-10 over packed codes
    nb_codes, nq = (10_000, 100) if quick else (100_000, 1000)
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 256, size=(nb_codes, 128), dtype=np.uint8)
    queries = rng.integers(0, 256, size=(nq, 128), dtype=np.uint8)
    ix = BinaryIndex(1024)
    ix.add(codes)
    hbase: dict[str, float] = {}
    fx = None
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        fx = faiss.IndexBinaryFlat(1024)
        fx.add(codes)
        t_f = median_seconds(lambda: fx.search(queries, 10), repeat=repeat)
        hbase["faiss IndexBinaryFlat"] = nq / t_f
    for level in dict.fromkeys([best, "scalar"]):
        t = median_seconds(
            lambda lv=level: ix._native.search(queries, 10, "hamming", lv), repeat=repeat
        )
        kern = _native.popcount_kernel(level)
        rows.append(
            Row(
                f"Hamming top-10, {nb_codes:,} x 1024-bit codes, {kern}",
                "queries/s",
                nq / t,
                hbase,
            )
        )
    if fx is not None:
        t = median_seconds(lambda: ix.range_search(queries[:100], 480), repeat=repeat)
        t_f = median_seconds(lambda: fx.range_search(queries[:100], 481), repeat=repeat)
        rows.append(
            Row(
                f"range search (distance <= 480), {nb_codes:,} codes",
                "queries/s",
                100 / t,
                {"faiss IndexBinaryFlat": 100 / t_f},
            )
        )
    t = median_seconds(lambda: ix.search(queries, 10, metric="jaccard"), repeat=repeat)
    rows.append(Row(f"Jaccard top-10, {nb_codes:,} x 1024-bit codes", "queries/s", nq / t, hbase))

    if quality:
        from . import _flyhash_quality

        report = _flyhash_quality.run(quick=quick, out_dir=Path("neuropil-bench"), verbose=verbose)
        for name in ("digits", "MiniLM"):
            r = report[name]
            for j, kk in enumerate(r["ks"]):
                rows.append(
                    Row(
                        f"{name} mAP, hash length k={kk} (m={r['m']})",
                        "mAP",
                        r["FlyHash"][j],
                        {
                            "LSH (paper)": r["LSH"][j],
                            "FlyHash bits": r["FlyHash bits"][j],
                            "SimHash k bits": r["SimHash k bits"][j],
                            "SimHash m bits": r["SimHash m bits"][j],
                        },
                    )
                )
    return rows

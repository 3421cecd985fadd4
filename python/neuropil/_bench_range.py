"""``neuropil bench range``: exact range search on real SmolLM2 keys, against
faiss ``IndexFlatIP.range_search`` and numpy brute force, on the same queries
and answers; plus random Gaussian keys, incremental adds, and (with CUDA) the
torch path and sparse decode attention against dense attention."""

from __future__ import annotations

import time

import numpy as np

from ._range_data import LAYERS, smollm2_keys, top_fraction_thresholds
from ._timing import Row, median_seconds
from .range import RangeIndex


def _faiss_search(index, q: np.ndarray, t: np.ndarray):
    """faiss takes one radius per call: search at the batch's lowest threshold,
    then keep each query's own hits (the filter is timed too)."""
    lims, scores, ids = index.range_search(q, float(t.min()))
    keep = scores >= np.repeat(t, np.diff(lims.astype(np.int64)))
    return lims, ids, scores, keep


def _numpy_search(k: np.ndarray, q: np.ndarray, t: np.ndarray):
    s = q @ k.T
    rows, ids = np.nonzero(s >= t[:, None])
    return rows, ids, s[rows, ids]


def _agree(k, q, t, lims, ids) -> bool:
    """Same answers as float64 brute force, up to ties within the documented
    tolerance (|q.k - t| <= 2 d 2^-24 |q| |k|)."""
    s = q.astype(np.float64) @ k.astype(np.float64).T
    tol = 2 * k.shape[1] * 2.0**-24 * np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(k, axis=1)
    want = s >= t[:, None]
    got = np.zeros_like(want)
    for i in range(len(q)):
        got[i, ids[lims[i] : lims[i + 1]]] = True
    diff = got != want
    return bool(np.all(np.abs(s - t[:, None])[diff] <= tol[diff]))


def _case(keys_by_head, queries_by_head, label, repeat, verbose) -> list[Row]:
    import faiss

    t_np = t_fa = t_fl = 0.0
    t_ours = 0.0
    scanned, agree, nq_total = [], True, 0
    build = 0.0
    for k, q in zip(keys_by_head, queries_by_head, strict=True):
        t = top_fraction_thresholds(k, q)
        b0 = time.perf_counter()
        ix = RangeIndex(k)  # method="auto", the default
        build += time.perf_counter() - b0
        flat = RangeIndex(k, "flat")
        fi = faiss.IndexFlatIP(k.shape[1])
        fi.add(k)
        t_ours += median_seconds(lambda ix=ix, q=q, t=t: ix.search(q, t), repeat=repeat)
        lims, ids, _ = ix.search(q, t)
        scanned.extend(np.asarray(ix.last_scanned).tolist())
        agree &= _agree(k, q, t, lims, ids)
        t_fl += median_seconds(lambda f=flat, q=q, t=t: f.search(q, t), repeat=repeat)
        t_fa += median_seconds(lambda fi=fi, q=q, t=t: _faiss_search(fi, q, t), repeat=repeat)
        t_np += median_seconds(lambda k=k, q=q, t=t: _numpy_search(k, q, t), repeat=repeat)
        nq_total += len(q)
    med = float(np.median(scanned))
    rows = [
        Row(
            f"{label}: range search, top-1% thresholds",
            "queries/s",
            nq_total / t_ours,
            {"faiss": nq_total / t_fa, "numpy": nq_total / t_np, "neuropil flat": nq_total / t_fl},
            limit=f"scanned {100 * med:.1f}% (median), exact={'yes' if agree else 'NO'}",
        )
    ]
    if verbose:
        print(
            f"  {label}: {nq_total / t_ours:,.0f} q/s vs faiss {nq_total / t_fa:,.0f}, "
            f"numpy {nq_total / t_np:,.0f}; scanned {100 * med:.1f}%; build "
            f"{1e3 * build / len(keys_by_head):.0f} ms/head; answers agree: {agree}"
        )
    return rows


def range_bench(quick: bool = False, verbose: bool = True) -> list[Row]:
    sizes = (8192,) if quick else (8192, 32768, 65536)
    nq = 64 if quick else 256
    z = smollm2_keys(max(sizes) if not quick else 8192, queries_per_head=256, verbose=verbose)
    heads = [(li, h) for li in range(len(LAYERS)) for h in range(3)]
    if quick:
        heads = heads[:2]
    repeat = 3 if quick else 5
    rows: list[Row] = []
    for n in sizes:
        ks = [np.ascontiguousarray(z["keys"][li, h, :n]) for li, h in heads]
        qs = [np.ascontiguousarray(z["queries"][li, h, :nq]) for li, h in heads]
        label = f"SmolLM2 keys n={n:,} d=64, {len(heads)} heads x {nq} queries"
        rows += _case(ks, qs, label, repeat, verbose)
    # Random Gaussian keys: nothing low-rank to exploit.
    rng = np.random.default_rng(0)
    n = 8192 if quick else 32768
    kg = rng.standard_normal((n, 64), dtype=np.float32)
    qg = rng.standard_normal((nq, 64), dtype=np.float32)
    rows += _case([kg], [qg], f"Gaussian keys n={n:,} d=64, {nq} queries", repeat, verbose)
    rows.append(
        _add_row(z["keys"][0, 0, : 8192 if quick else 32768], z["queries"][0, 0, :1], verbose)
    )
    rows += _cuda_rows(quick, verbose)
    return rows


def _add_row(k: np.ndarray, q: np.ndarray, verbose: bool) -> Row:
    """Decode-style appends: one key at a time after indexing half the keys."""
    half = len(k) // 2
    ix = RangeIndex(k[:half])
    t0 = time.perf_counter()
    for i in range(half, len(k)):
        ix.add(k[i : i + 1])
    per_add = (time.perf_counter() - t0) / (len(k) - half)
    t = top_fraction_thresholds(k, q)
    per_search = median_seconds(lambda: ix.search(q, t), repeat=5, min_time=0.01)
    if verbose:
        print(
            f"  add: {1e6 * per_add:.1f} us per key amortised (rebuilds: {ix.stats['builds'] - 1}),"
            f" one search {1e6 * per_search:.1f} us"
        )
    return Row(
        f"add one key (amortised, rebuilds included), n={len(k):,}",
        "us",
        1e6 * per_add,
        {"one search (1 query)": 1e6 * per_search},
        limit=f"{ix.stats['builds'] - 1} rebuilds",
        lower_is_better=True,
    )


def _cuda_rows(quick: bool, verbose: bool) -> list[Row]:
    try:
        import torch
    except ModuleNotFoundError:
        return []
    if not torch.cuda.is_available():
        return []
    from .hf import sparse_decode_attention

    rows = []
    n = 32768 if not quick else 8192
    try:
        z = smollm2_keys(65536 if not quick else 8192, queries_per_head=256)
        src = "SmolLM2 keys"
    except (FileNotFoundError, ImportError, OSError):
        # No model on this machine (e.g. an offline GPU box): low-rank stand-ins.
        rng = np.random.default_rng(0)
        basis = rng.standard_normal((8, 64)).astype(np.float32)
        lr = rng.standard_normal((1, 3, n, 8)).astype(np.float32) @ basis
        z = {
            "keys": lr + 0.1 * rng.standard_normal(lr.shape, dtype=np.float32),
            "queries": rng.standard_normal((1, 3, 256, 64), dtype=np.float32),
        }
        src = "low-rank synthetic keys"
    k = z["keys"][0, 0, :n]
    q = z["queries"][0, 0, :64]
    t = top_fraction_thresholds(k, q)
    cpu = RangeIndex(k)
    gpu = RangeIndex(torch.from_numpy(k).cuda())
    gl, gi, _ = gpu.search(torch.from_numpy(q).cuda(), torch.from_numpy(t).cuda())
    same = _agree(k, q, t, gl.cpu().numpy(), gi.cpu().numpy())

    def sync_search():
        gpu.search(torch.from_numpy(q).cuda(), torch.from_numpy(t).cuda())
        torch.cuda.synchronize()

    t_gpu = median_seconds(sync_search, repeat=7)
    t_cpu = median_seconds(lambda: cpu.search(q, t), repeat=7)
    rows.append(
        Row(
            f"torch CUDA path, {src} n={n:,}, 64 queries",
            "queries/s",
            64 / t_gpu,
            {"neuropil CPU": 64 / t_cpu},
            limit=f"same sets as CPU (ties aside): {same}",
        )
    )
    # Decode attention at 32k keys: 9 query heads, 3 kv heads, d=64.
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    kk = torch.from_numpy(z["keys"][0, :, :n]).to(dev)[None]  # (1, 3, n, 64)
    vv = torch.randn(kk.shape, device=dev, generator=g)
    qq = torch.from_numpy(z["queries"][0, :, :3]).to(dev).reshape(1, 9, 1, 64)
    scale = 64**-0.5

    def dense():
        kr = kk.repeat_interleave(3, dim=1)
        vr = vv.repeat_interleave(3, dim=1)
        torch.nn.functional.scaled_dot_product_attention(qq, kr, vr, scale=scale)
        torch.cuda.synchronize()

    def sparse():
        sparse_decode_attention(qq, kk, vv, scale, top_p=0.99)
        torch.cuda.synchronize()

    td, ts = median_seconds(dense, repeat=9), median_seconds(sparse, repeat=9)
    _, info = sparse_decode_attention(qq, kk, vv, scale, top_p=0.99)
    rows.append(
        Row(
            f"decode attention, {src}, {n:,} keys, top-p 0.99 (GPU)",
            "us",
            1e6 * ts,
            {"dense sdpa": 1e6 * td},
            limit=f"keys read {100 * info['fraction_read']:.1f}%",
            lower_is_better=True,
        )
    )
    if verbose:
        print(f"  GPU: sparse decode {1e6 * ts:.0f} us vs dense {1e6 * td:.0f} us")
    return rows

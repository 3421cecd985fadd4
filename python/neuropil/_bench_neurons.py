"""``neuropil bench neurons``: the neuron cache's throughput, the sparse FFNs'
speed (CATS: ``SparseFFN``; TEAL: ``InputSparseFFN``) against their own dense
kernels, numpy and torch (same run, same weight format), and, without
``--quick``, hit rates and accuracy on the real models."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ._timing import Row, median_seconds


def _cache_rows(quick: bool) -> list[Row]:
    from .neurons import NeuronCache

    rows = []
    n = 1 << 20
    batch = 16 if quick else 64
    rng = np.random.default_rng(0)
    mask = rng.random((batch, n), dtype=np.float32) < 0.3
    events = int(mask.sum())
    counts = np.zeros(n, np.int64)

    def numpy_record() -> None:
        counts.__iadd__(mask.sum(0))

    t_np = median_seconds(numpy_record, repeat=3 if quick else 5)
    policies: list[tuple[str, dict[str, Any]]] = [
        ("frequency", {}),
        ("frequency, decay 0.99", {"decay": 0.99}),
        ("window k=16", {"policy": "window", "window": 16}),
    ]
    for name, kw in policies:
        c = NeuronCache(n, n // 5, hysteresis=0.1, **kw)
        t = median_seconds(lambda c=c: c.record(mask), repeat=3 if quick else 5)
        rows.append(
            Row(
                f"NeuronCache.record, ({batch}, 1M) bool mask, 30% active, {name}",
                "M events/s",
                events / t / 1e6,
                {"numpy counts += mask.sum(0)": events / t_np / 1e6},
                limit="acceptance: >= 100 M events/s",
            )
        )
        t = median_seconds(c.reclassify, repeat=5 if quick else 11)
        freq = c.activation_frequency()
        t_arg = median_seconds(lambda f=freq: np.argpartition(-f, n // 5)[: n // 5], repeat=5)
        rows.append(
            Row(
                f"NeuronCache.reclassify, 1M neurons, capacity 20%, {name}",
                "ms",
                t * 1e3,
                {"numpy argpartition": t_arg * 1e3},
                limit="acceptance: < 5 ms",
                lower_is_better=True,
            )
        )
    return rows


def _ffn_rows(h: int, d: int, dtype: str, quick: bool, torch_mod: Any) -> list[Row]:
    from .neurons import InputSparseFFN, SparseFFN

    rng = np.random.default_rng(1)
    scale = np.float32(1 / np.sqrt(d))  # float32 products on numpy 1 and 2 (NEP 50)
    gate = (rng.standard_normal((h, d), dtype=np.float32) * scale).astype(np.float32)
    up = (rng.standard_normal((h, d), dtype=np.float32) * scale).astype(np.float32)
    down = (rng.standard_normal((d, h), dtype=np.float32) * scale).astype(np.float32)
    # Eight inputs in turn, so a sparse call's active set changes from call to call.
    xs = rng.standard_normal((8, d), dtype=np.float32)
    it = itertools.cycle(xs)
    bits = {"int8": 8, "int4": 4}.get(dtype)
    kw: dict[str, Any] = {"bits": bits} if bits else {"dtype": dtype}
    ffn = SparseFFN(gate, up, down, activation="silu", **kw)
    mib = h * ffn.bytes_per_neuron / 2**20
    rep = 7 if quick else 15
    t_dense = median_seconds(lambda: ffn(next(it), dense=True), repeat=rep, min_time=0.02)
    base: dict[str, float] = {}
    if dtype == "float32":

        def np_ffn() -> Any:
            x = next(it)
            g = gate @ x
            return down @ (g / (1 + np.exp(-g)) * (up @ x))

        base["numpy dense"] = median_seconds(np_ffn, repeat=rep, min_time=0.02) * 1e3
        if torch_mod is not None:
            torch = torch_mod
            F = torch.nn.functional
            tg, tu, td = (torch.from_numpy(a) for a in (gate, up, down))
            txs = itertools.cycle([torch.from_numpy(x) for x in xs])

            def torch_ffn() -> Any:
                tx = next(txs)
                with torch.no_grad():
                    return F.linear(F.silu(F.linear(tx, tg)) * F.linear(tx, tu), td)

            base["torch dense"] = median_seconds(torch_ffn, repeat=rep, min_time=0.02) * 1e3
    shape = f"{d}x{h} {dtype} ({mib:.0f} MiB), batch 1"
    rows = [
        Row(
            f"FFN {shape}: dense",
            "ms",
            t_dense * 1e3,
            dict(base),
            limit="memory bandwidth (all weights read once)",
            lower_is_better=True,
        )
    ]
    for s in (0.5, 0.7, 0.9):
        # Threshold at the s-quantile of |act| over the rotating inputs: the
        # single-sweep path sparsify_mlp uses; the realised density is reported.
        ffn.calibrate(xs, s)
        ffn.reset_stats()
        t = median_seconds(lambda: ffn(next(it)), repeat=rep, min_time=0.02)
        dens = ffn.stats()["density"]
        ideal = t_dense * (1 - s)
        allowed = t_dense * (1 / 3 + 2 / 3 * (1 - s))
        rows.append(
            Row(
                f"FFN {shape}: sparsity {s:.0%} (threshold; {1 - dens:.1%} realised); "
                f"t / (dense x (1-s)) = {t / ideal:.2f}, "
                f"t / (gate + (1-s) x up,down) = {t / allowed:.2f}",
                "ms",
                t * 1e3,
                {"neuropil dense": t_dense * 1e3, **base},
                limit="gate read densely: floor = 1/3 + 2/3 (1-s) of dense",
                lower_is_better=True,
            )
        )
    # TEAL: the same weights, inputs and hidden values masked instead of neurons.
    # Dense and each sparsity are timed in alternation, round after round, and
    # each ratio is the median of its per-round ratios: the memory bandwidth of
    # a VM drifts from minute to minute, and a ratio of two times taken minutes
    # apart would measure the drift.
    teal = InputSparseFFN(gate, up, down, activation="silu", **kw)
    levels = (0.5, 0.7, 0.9)
    thresholds = {}
    for s in levels:
        teal.calibrate(xs, s)
        thresholds[s] = (teal.t_in, teal.t_hidden)
    dense_t: list[float] = []
    sparse_t: dict[float, list[float]] = {s: [] for s in levels}
    density: dict[float, tuple[float, float]] = {}
    for _ in range(3 if quick else 5):
        dense_t.append(
            median_seconds(lambda: teal(next(it), dense=True), repeat=rep // 2, min_time=0.02)
        )
        for s in levels:
            teal.set_thresholds(*thresholds[s])
            teal.reset_stats()
            sparse_t[s].append(
                median_seconds(lambda: teal(next(it)), repeat=rep // 2, min_time=0.02)
            )
            st = teal.stats()
            density[s] = (st["input_density"], st["hidden_density"])
    t_tdense = float(np.median(dense_t))
    rows.append(
        Row(
            f"FFN {shape}: TEAL dense (InputSparseFFN, every input kept)",
            "ms",
            t_tdense * 1e3,
            {"neuropil dense (SparseFFN)": t_dense * 1e3, **base},
            limit="memory bandwidth (all weights read once)",
            lower_is_better=True,
        )
    )
    for s in levels:
        t = float(np.median(sparse_t[s]))
        ratio = float(
            np.median([ts / (td * (1 - s)) for ts, td in zip(sparse_t[s], dense_t, strict=True)])
        )
        speedup = float(np.median([td / ts for ts, td in zip(sparse_t[s], dense_t, strict=True)]))
        rows.append(
            Row(
                f"FFN {shape}: TEAL sparsity {s:.0%} ({1 - density[s][0]:.1%} of inputs, "
                f"{1 - density[s][1]:.1%} of hidden values dropped); "
                f"t / (TEAL dense x (1-s)) = {ratio:.2f}, TEAL dense / t = {speedup:.2f} "
                f"(medians of {len(dense_t)} alternating rounds)",
                "ms",
                t * 1e3,
                {"TEAL dense": t_tdense * 1e3, "neuropil dense (SparseFFN)": t_dense * 1e3, **base},
                limit="acceptance: <= 1.3 x dense x (1-s); at 50% >= 1.6x dense and torch",
                lower_is_better=True,
            )
        )
    # A small batch (speculative or batched decoding): 4 rows, each masked by
    # the 50% thresholds; a weight is read if any row keeps it.
    x4 = itertools.cycle([np.ascontiguousarray(xs[:4]), np.ascontiguousarray(xs[4:])])
    teal.set_thresholds(*thresholds[0.5])
    teal.reset_stats()
    t4 = median_seconds(lambda: teal(next(x4)), repeat=rep, min_time=0.02)
    st = teal.stats()
    t4_dense = median_seconds(lambda: teal(next(x4), dense=True), repeat=rep, min_time=0.02)
    b4 = {"TEAL dense, 4 rows": t4_dense * 1e3}
    if dtype == "float32" and torch_mod is not None:
        t4x = itertools.cycle([torch.from_numpy(np.ascontiguousarray(xs[:4])),
                               torch.from_numpy(np.ascontiguousarray(xs[4:]))])  # fmt: skip

        def torch_ffn4() -> Any:
            tx = next(t4x)
            with torch.no_grad():
                return F.linear(F.silu(F.linear(tx, tg)) * F.linear(tx, tu), td)

        b4["torch dense, 4 rows"] = median_seconds(torch_ffn4, repeat=rep, min_time=0.02) * 1e3
    rows.append(
        Row(
            f"FFN {shape[: -len(', batch 1')]}, batch 4: TEAL at the 50% thresholds "
            f"({1 - st['input_density']:.1%} of (row, input) pairs dropped; a weight is "
            "read if any row keeps it)",
            "ms",
            t4 * 1e3,
            b4,
            limit="small batches: no acceptance line",
            lower_is_better=True,
        )
    )
    return rows


def _real_rows(verbose: bool) -> list[Row]:
    from . import _neurons_real as real
    from . import data

    model, tok = data.load_smollm2()
    calib, ev = real.texts_for_smollm2(tok, 512, 1024)
    ca = real.smollm2_activations(model, calib)
    ea = real.smollm2_activations(model, ev)
    rows = []
    for s in (0.5, 0.7):
        hr = real.hit_rates(ca, ea, sparsity=s)
        frac = real.active_fraction(ca, ea, s)
        for pol, by_cap in hr.items():
            for cap, rate in by_cap.items():
                rows.append(
                    Row(
                        f"SmolLM2 hit rate, {pol}, capacity {cap:.0%}, "
                        f"threshold for {s:.0%} sparsity ({frac:.0%} active on eval)",
                        "hit rate",
                        rate,
                        {"capacity share": cap},
                        limit=f"{ev.shape[1]} GPL-3 tokens, 30 layers",
                    )
                )
    for method in ("cats", "teal"):
        acc = real.accuracy_table(
            smollm2=(model, tok), progress=print if verbose else None, method=method
        )
        dense = acc["smollm2"][0.0]
        for s, ppl in acc["smollm2"].items():
            if s == 0.0:
                continue
            rows.append(
                Row(
                    f"SmolLM2-135M perplexity, sparsify_mlp {method} {s:.0%} "
                    f"({acc['eval_tokens']} GPL-3 tokens; +{ppl / dense - 1:.1%})",
                    "ppl",
                    ppl,
                    {"dense": dense},
                    lower_is_better=True,
                )
            )
        for s, (mean, low) in acc["minilm"].items():
            rows.append(
                Row(
                    f"all-MiniLM-L6-v2 cosine to dense, sparsify_mlp {method} {s:.0%} "
                    f"({acc['sentences']} sentences; min {low:.4f})",
                    "cosine",
                    mean,
                    {"dense": 1.0},
                )
            )
    return rows


def neurons(quick: bool = False, verbose: bool = True) -> list[Row]:
    torch: Any  # (the module, or None without torch)
    try:
        import torch

        torch.set_num_threads(__import__("neuropil").get_num_threads())
    except ImportError:
        torch = None
    rows = _cache_rows(quick)
    shapes = [(1536, 576)] + ([(2816, 1024)] if quick else [(11008, 4096)])
    for h, d in shapes:
        for dtype in ("float32", "float16", "int8", "int4"):
            rows += _ffn_rows(h, d, dtype, quick, torch)
            if verbose:
                print(f"  measured FFN {d}x{h} {dtype}")
    if not quick:
        rows += _real_rows(verbose)
    return rows

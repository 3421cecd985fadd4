"""Tour section ``neurons``: activation sparsity on SmolLM2-135M and
all-MiniLM-L6-v2, measured on real text.

1. A real SmolLM2 FFN (layer 15) as a :class:`~neuropil.neurons.SparseFFN`:
   calibrated at 50% on the hidden states of real text, checked against numpy,
   and timed against its own dense kernel.
2. How well each :class:`~neuropil.neurons.NeuronCache` policy serves the real
   activations (hit rate at 10/20/50% capacity).
3. Accuracy through ``neuropil.torch.sparsify_mlp``: perplexity and embedding
   cosine against the dense models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import _neurons_real as real
from . import data
from ._timing import median_seconds


def neurons(out: Path, verbose: bool = True) -> dict[str, Any]:
    import torch

    from .neurons import SparseFFN

    say = print if verbose else (lambda *a, **k: None)
    model, tok = data.load_smollm2()
    # Short texts keep the section to about a minute on 2 cores; `neuropil bench
    # neurons` measures the same on 512 + 1024 tokens.
    calib, ev = real.texts_for_smollm2(tok, 192, 384)
    report: dict[str, Any] = {}

    # 1. One real FFN, fed the hidden states that reach it on real text.
    layer = model.model.layers[15]
    captured: list[np.ndarray] = []
    hook = layer.mlp.register_forward_hook(lambda m, i, o: captured.append(i[0][0].numpy()))
    with torch.no_grad():
        model(calib)
        model(ev)
    hook.remove()
    xc, xe = captured
    mlp = layer.mlp
    w = [p.weight.detach().numpy() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    ffn = SparseFFN(w[0], w[1], w[2], activation="silu", hot_capacity=w[0].shape[0] // 5)
    t = ffn.calibrate(xc, sparsity=0.5)
    g = xe @ w[0].T
    a = g / (1 + np.exp(-g))
    ref = (np.where(np.abs(a) > t, a, 0) * (xe @ w[1].T)) @ w[2].T
    got = ffn(xe)
    ffn.reset_stats()
    for row in xe[:128]:  # token by token, as in decoding
        ffn(row)
    st = ffn.stats()
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    x1 = xe[len(xe) // 2]
    t_dense = median_seconds(lambda: ffn(x1, dense=True), min_time=0.02)
    t_sparse = median_seconds(lambda: ffn(x1), min_time=0.02)
    fetches = st["hot_fetches"] + st["cold_fetches"]
    report["ffn_layer15"] = {
        "threshold": t,
        "density_on_eval_text": st["density"],
        "hot_tier_share_of_fetches": st["hot_fetches"] / max(fetches, 1),
        "max_rel_error_vs_numpy": err,
        "batch1_dense_ms": t_dense * 1e3,
        "batch1_sparse_ms": t_sparse * 1e3,
    }
    say(f"  SmolLM2 layer 15 FFN (576 x 1536), threshold {t:.4f} calibrated for 50% sparsity:")
    say(
        f"    density on unseen text (GPL-3) {st['density']:.1%}; max rel. error vs numpy {err:.1e}"
    )
    say(
        f"    batch 1: dense {t_dense * 1e3:.3f} ms, sparse {t_sparse * 1e3:.3f} ms "
        f"({t_dense / t_sparse:.2f}x); hot tier (20% of neurons) served "
        f"{report['ffn_layer15']['hot_tier_share_of_fetches']:.0%} of fetched neurons"
    )

    # 2. Cache policies on every layer's real activations.
    ca = real.smollm2_activations(model, calib)
    ea = real.smollm2_activations(model, ev)
    hr = real.hit_rates(ca, ea, sparsity=0.5)
    report["hit_rates_50pct_sparsity"] = {
        p: {f"{c:.0%}": r for c, r in v.items()} for p, v in hr.items()
    }
    say(f"  hit rates over {ev.shape[1]} GPL-3 tokens, 30 layers (threshold for 50% sparsity):")
    say("    policy                     10%     20%     50% of neurons cached")
    for p, v in hr.items():
        say(f"    {p:<24}" + "".join(f"{r:8.1%}" for r in v.values()))

    # 3. Accuracy through sparsify_mlp (shorter than `neuropil bench neurons`):
    # CATS masks neurons (the gate is still read densely), TEAL masks each
    # projection's inputs (sparsity s skips s of every weight matrix).
    for method in ("cats", "teal"):
        acc = real.accuracy_table(
            sparsities=(0.25, 0.5), calib_tokens=192, eval_tokens=384, sentences=80,
            smollm2=(model, tok), method=method,
        )  # fmt: skip
        dense = acc["smollm2"][0.0]
        report[f"perplexity_{method}"] = acc["smollm2"]
        report[f"minilm_cosine_{method}"] = acc["minilm"]
        say(
            f"  sparsify_mlp method={method!r}, SmolLM2 perplexity on {acc['eval_tokens']} "
            f"tokens (dense {dense:.2f}):"
        )
        for s in (0.25, 0.5):
            ppl = acc["smollm2"][s]
            mean, low = acc["minilm"][s]
            say(
                f"    {s:.0%}: perplexity {ppl:.2f} (+{ppl / dense - 1:.1%}); "
                f"MiniLM cosine to dense mean {mean:.4f}, min {low:.4f}"
            )
    return report

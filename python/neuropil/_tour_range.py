"""Tour section ``range``: exact range search on SmolLM2's real attention keys,
then sparse decode attention in ``transformers`` with :class:`neuropil.hf.SparseCache`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from . import data
from ._range_data import LAYERS, smollm2_keys, top_fraction_thresholds
from .range import RangeIndex


def range_tour(out: Path, verbose: bool = True, tokens: int = 200) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    from . import hf

    model, tok = data.load_smollm2()
    z = smollm2_keys(8192, model_and_tok=(model, tok), verbose=verbose)
    report: dict[str, Any] = {"search": {}}
    for li, layer in enumerate(LAYERS):
        k, q = z["keys"][li, 0], z["queries"][li, 0, :64]
        t = top_fraction_thresholds(k, q)
        row = {}
        for method in ("auto", "pca", "kmeans"):
            ix = RangeIndex(k, method)
            lims, ids, _ = ix.search(q, t)
            flat = RangeIndex(k, "flat").search(q, t)
            assert np.array_equal(ids, flat[1]) and np.array_equal(lims, flat[0])
            row[method] = round(float(np.median(ix.last_scanned)), 4)
        report["search"][f"layer {layer}"] = row
        if verbose:
            print(
                f"  layer {layer:>2} head 0, 8,192 keys, top-1%: keys scored in full "
                + ", ".join(f"{m} {100 * v:.1f}%" for m, v in row.items())
                + " (answers identical to the flat scan)"
            )
    # Generation: dense reference vs the sparse cache, greedy, several real prompts.
    texts = data.real_sentences(40)
    prompts = [" ".join(texts[i : i + 3]) for i in (0, 10, 20)]
    n_new = tokens // len(prompts) + 1
    agree = total = 0
    fractions, bounds = [], []
    impl = model.config._attn_implementation
    t0 = time.perf_counter()
    for p in prompts:
        inp = tok(p, return_tensors="pt")
        with torch.inference_mode():
            model.set_attn_implementation(impl)
            ref = model.generate(
                **inp,
                max_new_tokens=n_new,
                do_sample=False,
                **hf.cache_kwargs(model, DynamicCache()),
            )
            model.set_attn_implementation(hf.ATTENTION)
            cache = hf.SparseCache(model, "top_p", top_p=0.99)
            got = model.generate(
                **inp, max_new_tokens=n_new, do_sample=False, **hf.cache_kwargs(model, cache)
            )
        model.set_attn_implementation(impl)
        a, b = ref[0, inp["input_ids"].shape[1] :], got[0, inp["input_ids"].shape[1] :]
        m = min(len(a), len(b))
        agree += int((a[:m] == b[:m]).sum())
        total += m
        s = cache.summary()
        fractions.append(s["fraction_read"])
        bounds.append(s["dropped_bound"])
    report["generation"] = {
        "tokens": total,
        "greedy_agreement": agree / max(total, 1),
        "fraction_read": float(np.mean(fractions)),
        "max_dropped_bound": float(max(bounds)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if verbose:
        g = report["generation"]
        print(
            f"  SmolLM2 greedy, top-p 0.99 vs dense: {100 * g['greedy_agreement']:.1f}% of "
            f"{g['tokens']} tokens agree; keys read {100 * g['fraction_read']:.1f}%, "
            f"dropped softmax mass <= {g['max_dropped_bound']:.4f}"
        )
    report["perplexity"] = perplexity_shift(model, tok, 160)
    if verbose:
        pp = report["perplexity"]
        print(
            f"  perplexity on GPL-3 ({pp['tokens']} tokens, decode steps): "
            f"dense {pp['dense']:.3f}, "
            f"top-p 0.99 {pp['sparse']:.3f} ({100 * pp['relative_change']:+.2f}%), "
            f"keys read {100 * pp['fraction_read']:.1f}%"
        )
    return report


def perplexity_shift(model, tok, n_tokens: int) -> dict[str, float]:
    """Perplexity of GPL-3 text scored token by token (decode steps after a
    short dense prefill), dense vs the top-p 0.99 sparse cache."""
    import torch
    from transformers import DynamicCache

    from . import hf

    ids = tok(data.gpl3_text(), return_tensors="pt")["input_ids"][:, : n_tokens + 1]
    impl = model.config._attn_implementation

    def nll(cache, attn) -> float:
        model.set_attn_implementation(attn)
        total, pre = 0.0, 16
        with torch.inference_mode():
            out = model(ids[:, :pre], use_cache=True, **hf.cache_kwargs(model, cache))
            logits = out.logits[0, -1]
            for i in range(pre, ids.shape[1]):
                total -= float(torch.log_softmax(logits.float(), -1)[ids[0, i]])
                out = model(ids[:, i : i + 1], use_cache=True, **hf.cache_kwargs(model, cache))
                logits = out.logits[0, -1]
        model.set_attn_implementation(impl)
        return total / (ids.shape[1] - pre)

    dense = nll(DynamicCache(), impl)
    model.set_attn_implementation(hf.ATTENTION)
    cache = hf.SparseCache(model, "top_p", top_p=0.99)
    sparse = nll(cache, hf.ATTENTION)
    s = cache.summary()
    return {
        "tokens": int(ids.shape[1]),
        "dense": float(np.exp(dense)),
        "sparse": float(np.exp(sparse)),
        "relative_change": float(np.exp(sparse) / np.exp(dense) - 1),
        "fraction_read": s["fraction_read"],
    }

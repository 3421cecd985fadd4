"""Measurements of activation sparsity on the real models, shared by
``neuropil bench neurons`` and ``neuropil tour --only neurons``:

- :func:`smollm2_activations`: per-layer ``|SiLU(gate x)|`` of SmolLM2-135M on
  real text (the GPL-3) and on calibration text (the other license texts).
- :func:`hit_rates`: each NeuronCache policy replayed online over those
  activations (the hot set is re-chosen after every token; the next token's
  active neurons are hits or misses).
- :func:`accuracy_table`: SmolLM2 perplexity and all-MiniLM-L6-v2 embedding
  cosine against the dense models, through ``neuropil.torch.sparsify_mlp``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import data


def texts_for_smollm2(tok: Any, calib_tokens: int, eval_tokens: int) -> tuple[Any, Any]:
    """(calibration ids, evaluation ids): other license texts vs the GPL-3."""
    calib = "\n".join(t for n, t in data.license_texts().items() if n != "GPL-3")
    c = tok(calib[: calib_tokens * 8], return_tensors="pt").input_ids[:, :calib_tokens]
    e = tok(data.gpl3_text(), return_tensors="pt").input_ids[:, :eval_tokens]
    return c, e


def smollm2_activations(model: Any, ids: Any) -> list[np.ndarray]:
    """``|act(gate x)|`` of every MLP for ``ids`` (1, t): one (t, h) float32 array per layer."""
    import torch

    out: list[np.ndarray] = []
    hooks = []

    def make_hook(act: Any) -> Any:
        def hook(_m: Any, _inp: Any, o: Any) -> None:
            out.append(act(o).detach().abs()[0].float().numpy())

        return hook

    for layer in model.model.layers:
        mlp = layer.mlp
        hooks.append(mlp.gate_proj.register_forward_hook(make_hook(mlp.act_fn)))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return out


POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("static (calibrated)", {"policy": "static"}),
    ("frequency", {"policy": "frequency"}),
    ("frequency, decay 0.99", {"policy": "frequency", "decay": 0.99}),
    ("window k=5", {"policy": "window", "window": 5}),
]


def hit_rates(
    calib_acts: list[np.ndarray],
    eval_acts: list[np.ndarray],
    sparsity: float = 0.5,
    capacities: tuple[float, ...] = (0.1, 0.2, 0.5),
) -> dict[str, dict[float, float]]:
    """Mean hit rate over layers for each policy and capacity (fraction of neurons).

    A neuron is active where its ``|act|`` exceeds the layer's threshold for
    ``sparsity`` on the calibration text. Each cache first records the
    calibration text (and is classified once), then replays the evaluation text
    token by token, re-choosing its hot set after every token (except static).
    """
    from .neurons import NeuronCache

    result: dict[str, dict[float, float]] = {}
    for name, kw in POLICIES:
        result[name] = {}
        for cap in capacities:
            rates = []
            for ca, ea in zip(calib_acts, eval_acts, strict=True):
                t = float(np.quantile(ca, sparsity))
                h = ca.shape[1]
                every = 0 if kw["policy"] == "static" else 1
                cache = NeuronCache(h, int(cap * h), reclassify_every=every, **kw)
                cache.record(ca > t)
                cache.reclassify()
                cache.reset_stats()
                cache.record(ea > t)
                rates.append(cache.stats()["hit_rate"])
            result[name][cap] = float(np.mean(rates))
    return result


def active_fraction(
    calib_acts: list[np.ndarray], eval_acts: list[np.ndarray], sparsity: float
) -> float:
    """Fraction of (token, neuron) pairs of the evaluation text that are active."""
    fr = [(e > np.quantile(c, sparsity)).mean() for c, e in zip(calib_acts, eval_acts, strict=True)]
    return float(np.mean(fr))


def perplexity(model: Any, ids: Any, window: int = 512) -> float:
    """Perplexity of ``ids`` (1, t) in non-overlapping windows."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, s : s + window]
            if chunk.shape[1] < 2:
                break
            loss = float(model(chunk, labels=chunk).loss)
            nll += loss * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1
    return float(np.exp(nll / count))


def accuracy_table(
    sparsities: tuple[float, ...] = (0.25, 0.4, 0.5, 0.7),
    calib_tokens: int = 512,
    eval_tokens: int = 1024,
    sentences: int = 200,
    smollm2: Any = None,
    minilm: Any = None,
    progress: Any = None,
    method: str = "cats",
) -> dict[str, Any]:
    """SmolLM2 perplexity and MiniLM cosine vs dense at each sparsity, via
    ``sparsify_mlp(..., method=method)``."""
    import copy

    from .torch import sparsify_mlp

    model, tok = smollm2 if smollm2 is not None else data.load_smollm2()
    model = copy.deepcopy(model)
    calib, ev = texts_for_smollm2(tok, calib_tokens, eval_tokens)
    rows: dict[str, Any] = {"smollm2": {}, "minilm": {}}
    dense_ppl = perplexity(model, ev)
    rows["smollm2"][0.0] = dense_ppl
    for s in sparsities:
        sparsify_mlp(model, s, calibration=calib, method=method)
        rows["smollm2"][s] = perplexity(model, ev)
        if progress:
            progress(
                f"SmolLM2 {method} at {s:.0%}: perplexity {rows['smollm2'][s]:.2f} "
                f"(dense {dense_ppl:.2f})"
            )
    st = copy.deepcopy(minilm if minilm is not None else data.load_minilm())
    texts = data.real_sentences(sentences)
    half = len(texts) // 2
    dense = st.encode(texts[half:], normalize_embeddings=True)
    for s in sparsities:
        sparsify_mlp(
            st[0].auto_model, s, calibration=lambda: st.encode(texts[:half]), method=method
        )
        emb = st.encode(texts[half:], normalize_embeddings=True)
        cos = (dense * emb).sum(1)
        rows["minilm"][s] = (float(cos.mean()), float(cos.min()))
        if progress:
            progress(
                f"MiniLM {method} at {s:.0%}: cosine mean {cos.mean():.4f}, min {cos.min():.4f}"
            )
    rows["eval_tokens"] = int(ev.shape[1])
    rows["sentences"] = len(texts) - half
    return rows

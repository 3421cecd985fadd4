"""Accuracy measurements of packed quantization on real models, shared by the
tour, the benchmark and the tests: MiniLM sentence-embedding cosine, SmolLM2
perplexity, and a plain numpy round-to-nearest reference."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np


def numpy_rtn(w: np.ndarray, bits: int, group_size: int, scheme: str = "asym") -> np.ndarray:
    """Plain round-to-nearest reference (float32 scale/min, rows zero-padded to whole groups)."""
    rows, cols = w.shape
    pad = -cols % group_size
    g = np.pad(w.astype(np.float32), ((0, 0), (0, pad))).reshape(rows, -1, group_size)
    maxq = 2**bits - 1
    if scheme == "sym":
        half = 2 ** (bits - 1)
        s = np.abs(g).max(-1, keepdims=True) / (half - 1)
        s[s == 0] = 1
        d = np.clip(np.round(g / s), -half, half - 1) * s
    else:
        lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
        s = (hi - lo) / maxq
        s[s == 0] = 1
        d = np.clip(np.round((g - lo) / s), 0, maxq) * s + lo
    return d.reshape(rows, -1)[:, :cols].astype(np.float32)


def _linears(model: Any) -> list[Any]:
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def minilm_cosine(
    model: Any, sentences: list[str], configs: list[dict[str, Any]], base: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Mean cosine of sentence embeddings to fp32, every Linear quantized, per config.

    A config holds ``bits``, ``group_size`` and either ``reference=True`` (numpy
    round-to-nearest, weights replaced by the dequantized matrix) or
    neuropil's options (``scheme``, ``search``).
    """
    import torch

    from .torch import quantize_model

    if base is None:
        base = model.encode(sentences, convert_to_numpy=True, normalize_embeddings=True)
    out = []
    for cfg in configs:
        m = copy.deepcopy(model)
        if cfg.get("reference"):
            with torch.no_grad():
                for lin in _linears(m):
                    w = lin.weight.detach().float().numpy()
                    d = numpy_rtn(w, cfg["bits"], cfg["group_size"], cfg.get("scheme", "asym"))
                    lin.weight.copy_(torch.from_numpy(d))
        else:
            quantize_model(
                m,
                cfg["bits"],
                cfg["group_size"],
                cfg.get("scheme", "asym"),
                search=cfg.get("search", False),
            )
        emb = m.encode(sentences, convert_to_numpy=True, normalize_embeddings=True)
        cos = float(np.mean(np.sum(emb * base, axis=1)))
        out.append({**cfg, "cosine": cos})
    return out


def perplexity(model: Any, tok: Any, text: str, max_tokens: int = 256) -> float:
    """Perplexity of ``model`` on the first ``max_tokens`` tokens of ``text`` (one pass)."""
    import torch

    ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return float(torch.exp(loss))


def decode_ms_per_token(model: Any, tok: Any, text: str, n_tokens: int = 32) -> float:
    """Median milliseconds per greedy token, one token per forward with the KV cache,
    after a prompt of the first 16 tokens of ``text`` (the batch-1 path)."""
    import time

    import torch
    from transformers import DynamicCache

    from .hf import cache_kwargs

    ids = tok(text, return_tensors="pt").input_ids[:, :16]
    times = []
    cache = cache_kwargs(model, DynamicCache())  # updated in place by each forward
    with torch.no_grad():
        out = model(ids, use_cache=True, **cache)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(n_tokens):
            t = time.perf_counter()
            out = model(nxt, use_cache=True, **cache)
            times.append(time.perf_counter() - t)
            nxt = out.logits[:, -1:].argmax(-1)
    return float(np.median(times) * 1e3)


def linear_bytes(model: Any) -> int:
    """Bytes of every Linear / QuantizedLinear weight (packed size for quantized ones)."""
    import torch

    from .torch import QuantizedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.memory_bytes
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def minilm_table(
    n_sentences: int = 200,
    bits: tuple[int, ...] = (8, 4, 3, 2),
    groups: tuple[int, ...] = (32, 64, 128),
) -> list[dict[str, Any]]:
    """The accuracy table: numpy round-to-nearest vs neuropil (plain and ``search=True``)
    for every bit width and group size, all-MiniLM-L6-v2 on real sentences."""
    from . import data

    model = data.load_minilm()
    sentences = data.real_sentences(n_sentences)
    configs = []
    for b in bits:
        for g in groups:
            configs += [
                {"bits": b, "group_size": g, "reference": True},
                {"bits": b, "group_size": g},
                {"bits": b, "group_size": g, "search": True},
            ]
    return minilm_cosine(model, sentences, configs)

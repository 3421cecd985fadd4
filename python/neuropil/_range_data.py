"""Real attention keys and queries of SmolLM2-135M, for the range benchmark and tour.

Keys and queries are captured after RoPE, exactly as the attention function sees
them, by running the model's first layers over windows of real text (the OS's
license texts, ``neuropil.data.license_texts()``, GPL-3 first). Windows are
2,048 tokens long; once the text is used up, windows start again at an offset
of 1,024 tokens, so every window holds different token/position pairs. The
capture is cached as ``.npz`` under ``$NEUROPIL_CACHE`` (default: the system's
temp dir, ``neuropil-cache/``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: Layers captured (0-based); the model runs up to the last of them only.
LAYERS = (2, 6, 10, 14)
WINDOW = 2048
_CAPTURE = "neuropil_capture"


def cache_dir() -> Path:
    root = Path(os.environ.get("NEUROPIL_CACHE", Path(tempfile.gettempdir()) / "neuropil-cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _token_windows(tok: Any, n_tokens: int) -> list[list[int]]:
    from . import data

    texts = data.license_texts()
    order = ["GPL-3"] + [k for k in texts if k != "GPL-3"]
    ids: list[int] = []
    for name in order:
        if name in texts:
            ids.extend(tok(texts[name])["input_ids"])
    windows: list[list[int]] = []
    offset, total = 0, 0
    while total < n_tokens:
        for a in range(offset, len(ids) - WINDOW + 1, WINDOW):
            windows.append(ids[a : a + WINDOW])
            total += WINDOW
            if total >= n_tokens:
                break
        offset = (offset + WINDOW // 2) % WINDOW or 1
    return windows


def smollm2_keys(
    n_keys: int,
    queries_per_head: int = 256,
    model_and_tok: Any = None,
    verbose: bool = False,
    cache: Path | None = None,
) -> dict[str, np.ndarray]:
    """Keys ``(L, H, n_keys, 64)`` and queries ``(L, H, queries_per_head, 64)``
    (float32) of SmolLM2-135M layers :data:`LAYERS`, kv heads 0..2.

    Queries of kv head ``h`` are drawn (seeded, numpy PCG64 seed 0) from its
    grouped query heads at random positions of the captured windows.
    """
    path = (
        cache or cache_dir()
    ) / f"smollm2_qk_{n_keys}_{queries_per_head}_{'-'.join(map(str, LAYERS))}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {"keys": z["keys"], "queries": z["queries"]}
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from . import data

    model, tok = model_and_tok if model_and_tok is not None else data.load_smollm2()
    captured: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in LAYERS}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in captured:
            captured[module.layer_idx].append(
                (query[0].float().numpy().copy(), key[0].float().numpy().copy())
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE, capture)
    inner = model.model
    saved_layers, saved_impl = inner.layers, model.config._attn_implementation
    inner.layers = saved_layers[: max(LAYERS) + 1]
    model.set_attn_implementation(_CAPTURE)
    windows = _token_windows(tok, n_keys)
    try:
        from tqdm import tqdm

        with torch.inference_mode():
            for w in tqdm(windows, desc="capturing SmolLM2 keys", disable=not verbose, leave=False):
                inner(input_ids=torch.tensor([w]), use_cache=False)
    finally:
        inner.layers = saved_layers
        model.set_attn_implementation(saved_impl)
    rng = np.random.default_rng(0)
    keys = np.empty((len(LAYERS), 3, n_keys, 64), dtype=np.float32)
    queries = np.empty((len(LAYERS), 3, queries_per_head, 64), dtype=np.float32)
    for li, layer in enumerate(LAYERS):
        q_all = np.concatenate([q for q, _ in captured[layer]], axis=1)  # (9, T, 64)
        k_all = np.concatenate([k for _, k in captured[layer]], axis=1)  # (3, T, 64)
        for h in range(3):
            keys[li, h] = k_all[h, :n_keys]
            group = q_all[3 * h : 3 * h + 3].reshape(-1, 64)
            queries[li, h] = group[rng.choice(len(group), queries_per_head, replace=False)]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, keys=keys, queries=queries)
    os.replace(tmp, path)
    return {"keys": keys, "queries": queries}


def top_fraction_thresholds(
    keys: np.ndarray, queries: np.ndarray, frac: float = 0.01
) -> np.ndarray:
    """Per query, the score of its ``ceil(frac * n)``-th best key (float64 scores)."""
    s = queries.astype(np.float64) @ keys.astype(np.float64).T
    k = max(1, int(np.ceil(frac * keys.shape[0])))
    return np.partition(s, -k, axis=1)[:, -k].astype(np.float32)

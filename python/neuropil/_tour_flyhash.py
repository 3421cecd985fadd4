"""Tour section: FlyHash codes of MiniLM sentence embeddings, searched by Hamming
distance, checked against exact cosine neighbours; plus the retrieval-quality
comparison with the paper's LSH (quick setting) and its plot."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from . import _flyhash_quality, data
from .flyhash import BinaryIndex, FlyHash


def flyhash(out: Path, verbose: bool = True) -> dict[str, Any]:
    model = data.load_minilm()
    sentences = data.real_sentences(2000)
    emb = np.asarray(model.encode(sentences, batch_size=64), dtype=np.float32)
    n, d = emb.shape
    fh = FlyHash(d, expansion_ratio=13.0, active_fraction=0.05, seed=0, projection="sparse")
    t0 = time.perf_counter()
    codes = fh.hash(emb - emb.mean(1, keepdims=True))
    t_enc = time.perf_counter() - t0
    index = BinaryIndex(fh.output_dim)
    index.add(codes)
    out.mkdir(parents=True, exist_ok=True)
    index.save(out / "flyhash_index.safetensors")
    fh.save(out / "flyhash_encoder.safetensors")
    back = BinaryIndex.load(out / "flyhash_index.safetensors")
    _, ids = back.search(codes, 11)
    cos = emb @ emb.T
    np.fill_diagonal(cos, -np.inf)
    exact = np.argsort(-cos, axis=1)[:, :10]
    recall = float(np.mean([len(set(ids[i, 1:]) & set(exact[i])) / 10 for i in range(n)]))
    q = int(np.argmax([len(s) < 120 for s in sentences]))
    quality = _flyhash_quality.run(quick=True, out_dir=out, verbose=False, embeddings=emb)
    result: dict[str, Any] = {
        "sentences": n,
        "dims": d,
        "encoder": repr(fh),
        "projection_bytes": fh.memory_bytes,
        "dense_float32_bytes": fh.output_dim * d * 4,
        "encode_vectors_per_s": round(n / t_enc),
        "code_bytes": fh.code_bytes,
        "recall_at_10_vs_exact_cosine": round(recall, 3),
        "example": {
            "query": sentences[q],
            "neighbours": [sentences[j] for j in ids[q, 1:4]],
        },
        "quality_mAP": {k: v for k, v in quality.items() if k != "plot"},
        "plot": quality.get("plot"),
    }
    if verbose:
        print(f"  {n} real sentences -> all-MiniLM-L6-v2 ({d}-d) -> {fh!r}")
        print(
            f"  projection {fh.memory_bytes / 1e6:.2f} MB (a float32 matrix: "
            f"{result['dense_float32_bytes'] / 1e6:.0f} MB); {result['encode_vectors_per_s']:,}"
            f" vectors/s; codes {fh.code_bytes} B each"
        )
        print(f"  Hamming top-10 recall of the exact cosine top-10: {recall:.3f}")
        print(f"  query: {sentences[q]!r}")
        for s in result["example"]["neighbours"]:
            print(f"    ~ {s[:100]!r}")
        for name in ("digits", "MiniLM"):
            r = quality[name]
            cells = ", ".join(
                f"k={k}: fly {f:.3f} vs LSH {lsh:.3f}"
                for k, f, lsh in zip(r["ks"], r["FlyHash"], r["LSH"], strict=True)
            )
            print(f"  mAP (paper protocol, quick) {name}: {cells}")
        print(f"  plot: {result['plot']}")
    return result

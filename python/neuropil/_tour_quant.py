"""Tour section ``quant``: SmolLM2-135M and all-MiniLM-L6-v2 quantized for real.

Reports the weights' size before and after, SmolLM2's GGUF Q4_1 blocks
re-quantized byte for byte, SmolLM2's perplexity on the GPL-3 text, and
MiniLM's sentence-embedding cosine to float32.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, cast

import numpy as np


def quant(out: Path, verbose: bool = True) -> dict[str, Any]:
    from . import data
    from ._quant_eval import decode_ms_per_token, linear_bytes, minilm_cosine, perplexity
    from .quant import QuantizedWeights, quantize
    from .torch import quantize_model

    report: dict[str, Any] = {}
    say = print if verbose else (lambda *a, **k: None)

    # ---- SmolLM2's GGUF: Q4_1 blocks -> float -> Q4_1 again
    from gguf import GGUFReader

    reader = GGUFReader(data.smollm2_gguf())
    same = total = 0
    for t in reader.tensors:
        if t.tensor_type.name != "Q4_1":
            continue
        # (a cast: these Q4_1 tensors are matrices; from_gguf checks the shape)
        shape = cast("tuple[int, int]", tuple(int(s) for s in reversed(t.shape.tolist())))
        raw = np.asarray(t.data)
        again = quantize(QuantizedWeights.from_gguf(raw, "q4_1", shape).dequantize(), scheme="q4_1")
        eq = (raw.reshape(-1, 20) == again.to_gguf().reshape(-1, 20)).all(axis=1)
        same += int(eq.sum())
        total += eq.size
    report["smollm2_q4_1_blocks_identical"] = f"{same}/{total}"
    say(f"  SmolLM2 GGUF: {same}/{total} Q4_1 blocks re-quantize to identical bytes")

    # ---- SmolLM2 perplexity
    model, tok = data.load_smollm2()
    text = data.gpl3_text()
    n_tok = 2048  # 256 tokens let 8-bit rounding noise swing the result by 1%
    base = perplexity(model, tok, text, n_tok)
    fp32 = linear_bytes(model)
    rows = [("float32", fp32, base)]
    speed = [("float32", decode_ms_per_token(model, tok, text))]
    # Its weights are Q4_1 g32 already (lm_head: the tied Q8_0 embedding): 4-bit
    # g32 holds that grid; 8-bit re-rounds it, and search=True refits each group.
    for label, bits, g, sdt, skip, search in (
        ("8-bit g64", 8, 64, "float16", (), False),
        ("8-bit g32", 8, 32, "float16", (), False),
        ("8-bit g32, search", 8, 32, "float16", (), True),
        ("8-bit g32, f32 scales", 8, 32, "float32", (), False),
        ("4-bit g32 (lm_head fp32)", 4, 32, "float16", ("lm_head",), False),
        ("4-bit g32", 4, 32, "float16", (), False),
    ):
        m = quantize_model(copy.deepcopy(model), bits, g, skip=skip, scale_dtype=sdt, search=search)
        rows.append((label, linear_bytes(m), perplexity(m, tok, text, n_tok)))
        if bits == 4:
            speed.append((label, decode_ms_per_token(m, tok, text)))
        del m
    del model
    report["smollm2"] = [
        {"weights": label, "linear_MiB": round(b / 2**20, 1), "perplexity": round(p, 4)}
        for label, b, p in rows
    ]
    report["smollm2_decode_ms_per_token"] = {label: round(ms, 2) for label, ms in speed}
    say(f"  SmolLM2-135M, perplexity on {n_tok} tokens of GPL-3 (Linear weights):")
    for label, b, p in rows:
        say(f"    {label:<26} {b / 2**20:7.1f} MiB   ppl {p:.4f} ({(p / base - 1) * 100:+.3f}%)")
    say("  SmolLM2-135M, greedy decoding with the KV cache (median per token, this machine):")
    for label, ms in speed:
        say(f"    {label:<26} {ms:6.1f} ms/token")

    # ---- MiniLM cosine
    st = data.load_minilm()
    sentences = data.real_sentences(200)
    configs = [
        {"bits": 8, "group_size": 64},
        {"bits": 4, "group_size": 64},
        {"bits": 4, "group_size": 64, "search": True},
        {"bits": 4, "group_size": 64, "reference": True},
        {"bits": 3, "group_size": 32, "search": True},
    ]
    res = minilm_cosine(st, sentences, configs)
    before = linear_bytes(st)
    after = linear_bytes(quantize_model(copy.deepcopy(st), 4, 64))
    report["minilm"] = res
    report["minilm_linear_bytes"] = {"float32": before, "4-bit g64": after}
    say(f"  all-MiniLM-L6-v2, {len(sentences)} real sentences, mean cosine to float32:")
    for r in res:
        how = (
            "numpy round-to-nearest"
            if r.get("reference")
            else ("neuropil search" if r.get("search") else "neuropil")
        )
        say(f"    {r['bits']}-bit g{r['group_size']:<4} {how:<24} {r['cosine']:.5f}")
    say(
        f"    Linear weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB at 4-bit g64 "
        f"({before / after:.1f}x smaller)"
    )
    return report

"""Tour section: lazy sliding windows over MiniLM embeddings of real text.

Frames are all-MiniLM-L6-v2 embeddings (384 float32) of consecutive sentences of
the system's license texts; each text is an episode. Windows of 8 sentences
carry the embedding and word count of the sentence that follows as targets.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import data

# Sentences kept per license text (the tour embeds about 700 in all).
PER_TEXT = 60


def _sentences_by_text(per_text: int, min_words: int = 4) -> tuple[list[str], list[int]]:
    sentences: list[str] = []
    lengths: list[int] = []
    for text in data.license_texts().values():
        parts = [
            s.strip()
            for s in re.split(r"(?<=[.!?;:])\s+", " ".join(text.split()))
            if len(s.split()) >= min_words
        ][:per_text]
        if parts:
            sentences.extend(parts)
            lengths.append(len(parts))
    return sentences, lengths


def windows(out: Path, verbose: bool = True, model: Any = None) -> dict[str, Any]:
    """Runs the section; ``model``: a loaded MiniLM ``SentenceTransformer`` to reuse."""
    from .windows import SlidingWindows

    sentences, lengths = _sentences_by_text(PER_TEXT)
    if model is None:
        model = data.load_minilm()
    t0 = time.perf_counter()
    emb = model.encode(sentences, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    t_embed = time.perf_counter() - t0
    words = np.array([len(s.split()) for s in sentences], dtype=np.int64)
    w = 8
    sw = SlidingWindows(
        emb,
        window=w,
        episodes=lengths,
        targets={"next": emb, "next_words": words},
        target_offset=1,
    )
    # No window (nor its target sentence) crosses from one text into the next.
    offsets = sw.episode_offsets
    starts = sw.starts
    first_ep = np.searchsorted(offsets, starts, side="right") - 1
    target_ep = np.searchsorted(offsets, starts + w, side="right") - 1
    crossing = int(np.sum(first_ep != target_ep))
    naive = len(sentences) - w  # windows + next sentence, ignoring text boundaries

    # Targets align on real text: the next sentence is closer to its window's mean
    # embedding than the next sentence of another window is.
    t0 = time.perf_counter()
    aligned, shuffled, count = [], [], 0
    rng = np.random.default_rng(0)
    it = sw.batches(64, seed=0, epoch=0)
    for batch in it:
        ctx = batch["frames"].mean(axis=1)
        ctx /= np.linalg.norm(ctx, axis=1, keepdims=True)
        nxt = batch["next"]
        aligned.append(np.sum(ctx * nxt, axis=1))
        shuffled.append(np.sum(ctx * nxt[rng.permutation(len(nxt))], axis=1))
        count += 1
    t_epoch = time.perf_counter() - t0
    a, s = float(np.mean(np.concatenate(aligned))), float(np.mean(np.concatenate(shuffled)))
    plan = sw.memory_plan(batch_size=64)
    result = {
        "sentences": len(sentences),
        "texts (episodes)": len(lengths),
        "embedding_seconds": round(t_embed, 2),
        "window": w,
        "windows": len(sw),
        "windows_if_boundaries_ignored": naive,
        "windows_crossing_a_boundary": crossing,
        "batches": count,
        "epoch_seconds": round(t_epoch, 4),
        "cos(window mean, next sentence)": round(a, 4),
        "cos(window mean, another window's next)": round(s, 4),
        "memory_plan": str(plan),
    }
    if verbose:
        print(
            f"  {len(sentences)} sentences of {len(lengths)} license texts -> MiniLM "
            f"{emb.shape[1]}-dim frames ({t_embed:.1f} s)"
        )
        print(
            f"  {len(sw)} windows of {w} sentences + next sentence "
            f"({naive - len(sw)} fewer than ignoring text boundaries; {crossing} cross one)"
        )
        print(f"  one epoch, {count} batches of 64: {t_epoch * 1e3:.1f} ms")
        print(f"  cosine(window mean, its next sentence) {a:.3f} vs another window's {s:.3f}")
        print(f"  memory plan: {plan}")
    return result

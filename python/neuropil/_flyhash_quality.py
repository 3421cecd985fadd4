"""Retrieval quality of FlyHash following Dasgupta et al. (Science 2017).

Protocol: each input is centred (its own mean subtracted); for random queries
the true neighbours are the 2% of the other inputs nearest in Euclidean
distance; every other input is ranked by distance in hash space; the score is
the mean average precision (mAP) over queries, averaged over repeats (new
projections and queries each time). Methods, at hash length ``k``:

- ``FlyHash``: sparse binary projection (each output reads ``connectivity`` of
  the inputs, 0/1 weights), expansion to ``m = expansion * d``, top ``k`` winners
  kept with their activations (``FlyHash.encode``); ranked by Euclidean distance.
- ``FlyHash bits``: the same winners as packed bits (``FlyHash.hash``), ranked by
  Hamming distance (:class:`BinaryIndex`).
- ``LSH``: the paper's baseline, ``k`` dense Gaussian random projections,
  ranked by Euclidean distance of the projections (equal hash length).
- ``SimHash k bits``: signs of ``k`` Gaussian projections, Hamming ranking.
- ``SimHash m bits``: signs of ``m`` projections: the same code size in bits as
  FlyHash's packed code (equal bits).

Ties in hash space are broken at random (codes are indexed in a random order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .flyhash import BinaryIndex, FlyHash

METHODS = ("FlyHash", "FlyHash bits", "LSH", "SimHash k bits", "SimHash m bits")


def _hamming_rank(codes: npt.NDArray[np.uint8], q: npt.NDArray[np.int64], perm: Any) -> Any:
    ix = BinaryIndex(codes.shape[1] * 8)
    ix.add(codes[perm], ids=perm)
    return ix.search(codes[q], len(codes))[1]


def _euclid_rank(y: Any, q: Any, perm: Any) -> Any:
    y = y.astype(np.float64)
    sq = (y**2).sum(1)
    dy = sq[q, None] + sq[None, perm] - 2 * y[q] @ y[perm].T
    return perm[np.argsort(dy, axis=1, kind="stable")]


def _average_precision(ranked: Any, query: int, true: Any) -> float:
    ranked = ranked[ranked != query]
    rel = np.isin(ranked, true)
    hits = np.cumsum(rel)
    pos = np.flatnonzero(rel)
    return float(np.mean(hits[pos] / (pos + 1))) if len(pos) else 0.0


def evaluate(
    x: npt.NDArray[np.floating],
    ks: tuple[int, ...] = (2, 4, 8, 16, 32),
    n_queries: int = 100,
    repeats: int = 5,
    expansion: float = 20.0,
    connectivity: float = 0.1,
    seed: int = 0,
) -> dict[str, npt.NDArray[np.float64]]:
    """mAP of each method (``(len(ks),)`` means over repeats) on inputs ``x`` ``(n, d)``."""
    x = np.asarray(x, dtype=np.float32)
    x = x - x.mean(axis=1, keepdims=True)
    n, d = x.shape
    n_true = max(1, round(0.02 * n))
    m = int(d * expansion)
    scores = {name: np.zeros((repeats, len(ks))) for name in METHODS}
    sq = (x.astype(np.float64) ** 2).sum(1)
    for rep in range(repeats):
        rng = np.random.default_rng(seed + rep)
        q = rng.choice(n, size=min(n_queries, n), replace=False)
        dist = sq[q, None] + sq[None, :] - 2 * x[q].astype(np.float64) @ x.T.astype(np.float64)
        dist[np.arange(len(q)), q] = np.inf
        true = np.argsort(dist, axis=1, kind="stable")[:, :n_true]
        perm = rng.permutation(n)
        g_m = rng.standard_normal((d, m)).astype(np.float32)
        sim_m = np.packbits(x @ g_m > 0, axis=1, bitorder="little")
        ranked_sim_m = _hamming_rank(sim_m, q, perm)
        for j, k in enumerate(ks):
            fly = FlyHash(
                d,
                expansion,
                (k + 0.5) / m,
                seed=int(rng.integers(2**63)),
                projection="sparse",
                connectivity=connectivity,
                binary=True,
            )
            assert fly.active_bits == k
            ranked = {
                "FlyHash": _euclid_rank(fly.encode(x), q, perm),
                "FlyHash bits": _hamming_rank(fly.hash(x), q, perm),
            }
            g = rng.standard_normal((d, k)).astype(np.float32)
            y = x @ g
            ranked["LSH"] = _euclid_rank(y, q, perm)
            ranked["SimHash k bits"] = _hamming_rank(
                np.packbits(y > 0, axis=1, bitorder="little"), q, perm
            )
            ranked["SimHash m bits"] = ranked_sim_m
            for name in METHODS:
                scores[name][rep, j] = np.mean(
                    [_average_precision(ranked[name][i], q[i], true[i]) for i in range(len(q))]
                )
    return {name: s.mean(axis=0) for name, s in scores.items()}


def digits() -> npt.NDArray[np.float32]:
    """scikit-learn's 8x8 handwritten digits, ``(1797, 64)``."""
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float32)


def minilm_embeddings(n: int = 2000, model: Any = None) -> npt.NDArray[np.float32]:
    """all-MiniLM-L6-v2 embeddings ``(n', 384)`` of real sentences (the license texts)."""
    from . import data

    model = model if model is not None else data.load_minilm()
    sentences = data.real_sentences(n)
    return np.asarray(model.encode(sentences, batch_size=64), dtype=np.float32)


def run(
    quick: bool = False,
    out_dir: Path | None = None,
    model: Any = None,
    verbose: bool = True,
    embeddings: npt.NDArray[np.float32] | None = None,
) -> dict[str, Any]:
    """Both datasets; returns ``{dataset: {"n", "d", "ks", method: [mAP per k]}}``
    and writes ``flyhash_quality.png`` to ``out_dir`` when given. ``embeddings``:
    MiniLM sentence embeddings already computed (else computed here)."""
    ks = (4, 16) if quick else (2, 4, 8, 16, 32)
    kw: dict[str, Any] = (
        {"n_queries": 50, "repeats": 2} if quick else {"n_queries": 200, "repeats": 5}
    )
    if embeddings is None:
        embeddings = minilm_embeddings(400 if quick else 2000, model)
    sets = {"digits": digits(), "MiniLM": embeddings}
    report: dict[str, Any] = {}
    for name, x in sets.items():
        res = evaluate(x, ks=ks, **kw)
        report[name] = {"n": len(x), "d": x.shape[1], "ks": list(ks)}
        report[name].update({m: [round(float(v), 4) for v in res[m]] for m in METHODS})
        if verbose:
            print(f"  {name}: n={len(x)}, d={x.shape[1]}, 2% true neighbours, mAP by hash length")
            print("    " + f"{'k':>4} " + " ".join(f"{m:>15}" for m in METHODS))
            for j, k in enumerate(ks):
                print("    " + f"{k:>4} " + " ".join(f"{res[m][j]:>15.4f}" for m in METHODS))
    if out_dir is not None:
        report["plot"] = str(plot(report, Path(out_dir)))
        if verbose:
            print(f"  plot: {report['plot']}")
    return report


def plot(report: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = [k for k in report if isinstance(report[k], dict)]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        r = report[name]
        for m in METHODS:
            ax.plot(r["ks"], r[m], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hash length k")
        ax.set_ylabel("mAP (2% true neighbours)")
        ax.set_title(f"{name} (n={r['n']}, d={r['d']})")
        ax.legend()
    fig.tight_layout()
    path = out_dir / "flyhash_quality.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

"""Retrieval quality of FlyHash under the protocol of Dasgupta, Stevens, Navlakha,
"A neural algorithm for a fundamental computing problem", *Science* 358:793 (2017).

Sources: the paper's main text ("text") and the authors' released code for it
(``src/hash.py`` and its README, https://bitbucket.org/navlakha/flylsh, cited in the
paper's acknowledgments, read from the GitHub mirror ``andrewluetgers/flylsh``; "code").
Every parameter below follows them:

- Inputs (code, ``standardize_data``): each feature (column) is shifted by the
  absolute value of its minimum so that all values are >= 0, then each input (row)
  is scaled to mean ``SET_MEAN = 100`` and truncated to integers. This is the
  paper's "centers the mean" step (text: PN firing rates have "close to the same
  mean for all odors"): a divisive normalisation, not a subtraction. True neighbours
  and every hash are computed on these standardized inputs.
- True neighbours (text: "for each query, we found the top 2% (200) of its true
  nearest neighbors in input space, determined on the basis of Euclidean distance";
  code: ``NUM_NNS = max(10, int(0.02 * N))``); the query itself and exact duplicates
  of it (input distance 0) are left out of both lists (code).
- Predicted neighbours: the ``NUM_NNS`` nearest in hash space (text: "the top 2% of
  predicted nearest neighbors in m-dimensional hash space, determined on the basis
  of the Euclidean distance between tags"). Score (code, ``tesht_map_dist``): for
  each query the mean, over the true neighbours found in that predicted list, of the
  precision at their position (0 when none is found); averaged over the queries, then
  over trials.
- Trials (text: "We averaged the mean average precision over 50 trials, in which,
  for each trial, the random projection matrices and the queries changed"; code:
  ``NUM_REPEATS = 50``). Queries per trial: 100 random inputs (code:
  ``random.sample(range(N), 100)``; the text says 1000 of 10,000, the released code
  100). All methods of a trial see the same queries, so FlyHash - LSH is also
  reported as a paired per-trial difference.
- FlyHash (text, Fig. 3: "A 10d expansion was used for the fly"; code README,
  "Examples for Figure 3": ``-p SB12 -y 1280 -w top`` on SIFT, d = 128): ``m = 10 d``
  Kenyon cells, a sparse binary projection in which each cell sums exactly
  ``INPUTS_PER_KC = 12`` distinct random inputs (0/1 weights), activities quantized
  as ``floor(a / 10)`` (code: ``offset, width = 0, 10``), the top ``k`` kept with
  their values and zeros elsewhere (text: "The firing rates of these remaining 5%
  correspond to the tag"), ranked by Euclidean distance. Winners are chosen on the
  activities before quantization (``FlyHash.encode``), which is one of the code's
  choices among quantization ties. The 12 inputs per cell are the only count the
  released material gives (the README's SIFT command, 12/128 ~ 9%; the fly itself:
  "about six randomly selected PNs" of 50, text); it is used for every dataset here.
- ``LSH``, the paper's baseline (code README: ``-p DG -y k -w all``): ``k`` dense
  Gaussian projections, quantized the same way, ranked by Euclidean distance (equal
  hash length ``k``).

Not from the paper, reported alongside (same inputs, same scoring):

- ``FlyHash bits``: the same winners as packed bits (``FlyHash.hash``), ranked by
  Hamming distance (:class:`BinaryIndex`).
- ``SimHash k bits``: signs of ``k`` Gaussian projections, Hamming ranking.
- ``SimHash m bits``: signs of ``m`` projections, the same code size in bits as
  FlyHash's packed code (equal bits).

Deviations, forced by the data: the paper used 10,000 inputs of SIFT, GloVe and
MNIST; here scikit-learn's digits (1797 x 64, so 35 true neighbours) and MiniLM
embeddings of the real sentences available offline (fewer than 10,000). Ties in hash
space are broken in a random order per trial (the code breaks them by input index,
which is the same thing on data in random order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .flyhash import BinaryIndex, FlyHash

METHODS = ("FlyHash", "FlyHash bits", "LSH", "SimHash k bits", "SimHash m bits")

SET_MEAN = 100  # code: SET_MEAN, the mean firing rate of every input after standardizing
EXPANSION = 10.0  # text, Fig. 3: m = 10 d Kenyon cells
INPUTS_PER_KC = 12  # code README, Figure 3: SB12, each Kenyon cell samples 12 inputs
BIN_WIDTH = 10  # code: K = floor((K + 0) / 10) for the fly and for LSH
TRUE_FRACTION = 0.02  # text and code: the top 2% are the true neighbours (at least 10)
N_QUERIES = 100  # code: 100 random queries per trial
N_TRIALS = 50  # text and code: 50 trials


def standardize(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The code's ``standardize_data``: columns shifted to be >= 0, rows scaled to
    mean ``SET_MEAN`` and truncated to integers."""
    x = np.array(x, dtype=np.float64)
    x += np.abs(x.min(axis=0))
    x *= SET_MEAN / x.mean(axis=1, keepdims=True)
    return np.trunc(x)


def _top(
    dist: npt.NDArray[np.float64], perm: Any, t: int, excluded: Any = None
) -> npt.NDArray[np.int64]:
    """Per row, the ``t`` columns of smallest ``dist`` (``excluded`` ones left out);
    ties in ``perm``'s order."""
    if excluded is not None:
        dist[excluded] = np.inf
    order = np.argsort(dist[:, perm], axis=1, kind="stable")[:, :t]
    return np.asarray(perm[order], dtype=np.int64)


def _sq_euclid(a: Any, b: Any) -> npt.NDArray[np.float64]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def _hamming(codes: npt.NDArray[np.uint8], q: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    n = len(codes)
    ix = BinaryIndex(codes.shape[1] * 8)
    ix.add(codes)
    dist, ids = ix.search(codes[q], n)
    out = np.empty((len(q), n))
    np.put_along_axis(out, np.asarray(ids, dtype=np.int64), np.asarray(dist, np.float64), axis=1)
    return out


def _average_precision(pred: npt.NDArray[np.int64], true: npt.NDArray[np.int64]) -> float:
    hit = np.isin(pred, true)
    pos = np.flatnonzero(hit)
    return float(np.mean(np.arange(1, len(pos) + 1) / (pos + 1))) if len(pos) else 0.0


def evaluate_trials(
    x: npt.ArrayLike,
    ks: tuple[int, ...] = (2, 4, 8, 16, 32),
    n_queries: int = N_QUERIES,
    trials: int = N_TRIALS,
    expansion: float = EXPANSION,
    inputs_per_kc: int = INPUTS_PER_KC,
    seed: int = 0,
) -> dict[str, npt.NDArray[np.float64]]:
    """mAP of each method per trial and hash length: ``{method: (trials, len(ks))}``.

    ``x`` ``(n, d)`` is standardized here (:func:`standardize`)."""
    data = standardize(x)
    n, d = data.shape
    n_true = max(10, int(TRUE_FRACTION * n))
    m = int(d * expansion)
    c = min(inputs_per_kc, d)
    x32 = data.astype(np.float32)
    scores = {name: np.zeros((trials, len(ks))) for name in METHODS}
    for rep in range(trials):
        rng = np.random.default_rng([seed, rep])
        q = rng.choice(n, size=min(n_queries, n), replace=False)
        perm = rng.permutation(n)
        dist_in = _sq_euclid(data[q], data)
        excluded = dist_in <= 0  # the query itself and its exact duplicates
        dist_in[excluded] = np.inf
        true = _top(dist_in, perm, n_true)

        g_m = rng.standard_normal((d, m))
        sim_m = np.packbits(data @ g_m > 0, axis=1, bitorder="little")
        pred_sim_m = _top(_hamming(sim_m, q), perm, n_true, excluded)
        for j, k in enumerate(ks):
            fly = FlyHash(
                d,
                expansion,
                (k + 0.5) / m,
                seed=int(rng.integers(2**63)),
                projection="sparse",
                connectivity=min(1.0, (c + 0.25) / d),
                binary=True,
            )
            assert fly.active_bits == k and fly.connections == c and fly.output_dim == m
            tags = np.floor(fly.encode(x32).astype(np.float64) / BIN_WIDTH)
            y = data @ rng.standard_normal((d, k))
            y_lsh = np.floor(y / BIN_WIDTH)
            dists = {
                "FlyHash": _sq_euclid(tags[q], tags),
                "FlyHash bits": _hamming(fly.hash(x32), q),
                "LSH": _sq_euclid(y_lsh[q], y_lsh),
                "SimHash k bits": _hamming(np.packbits(y > 0, axis=1, bitorder="little"), q),
            }
            pred = {name: _top(dv, perm, n_true, excluded) for name, dv in dists.items()}
            pred["SimHash m bits"] = pred_sim_m
            for name in METHODS:
                scores[name][rep, j] = np.mean(
                    [_average_precision(pred[name][i], true[i]) for i in range(len(q))]
                )
    return scores


def summarize(scores: dict[str, npt.NDArray[np.float64]]) -> dict[str, Any]:
    """Means, standard errors over trials, and the paired FlyHash - LSH difference."""

    def se(a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return a.std(axis=0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.zeros(a.shape[1])

    diff = scores["FlyHash"] - scores["LSH"]
    out: dict[str, Any] = {name: s.mean(axis=0) for name, s in scores.items()}
    out["se"] = {name: se(s) for name, s in scores.items()}
    out["FlyHash - LSH"] = diff.mean(axis=0)
    out["FlyHash - LSH se"] = se(diff)
    return out


def evaluate(
    x: npt.ArrayLike,
    ks: tuple[int, ...] = (2, 4, 8, 16, 32),
    n_queries: int = N_QUERIES,
    repeats: int = N_TRIALS,
    seed: int = 0,
) -> dict[str, npt.NDArray[np.float64]]:
    """mAP of each method (``(len(ks),)`` means over ``repeats`` trials) on ``x`` ``(n, d)``."""
    scores = evaluate_trials(x, ks=ks, n_queries=n_queries, trials=repeats, seed=seed)
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
    """Both datasets; returns ``{dataset: {"n", "d", "m", "ks", method: [mAP per k],
    "se": {method: [...]}, "FlyHash - LSH": [...], "FlyHash - LSH se": [...]}}`` and
    writes ``flyhash_quality.png`` to ``out_dir`` when given. ``embeddings``: MiniLM
    sentence embeddings already computed (else computed here)."""
    ks = (4, 16) if quick else (2, 4, 8, 16, 32)
    trials = 4 if quick else N_TRIALS
    if embeddings is None:
        embeddings = minilm_embeddings(400 if quick else 2000, model)
    sets = {"digits": digits(), "MiniLM": embeddings}
    report: dict[str, Any] = {}
    for name, x in sets.items():
        res = summarize(evaluate_trials(x, ks=ks, trials=trials))
        r: dict[str, Any] = {"n": len(x), "d": x.shape[1], "m": int(x.shape[1] * EXPANSION)}
        r["ks"] = list(ks)
        r["trials"] = trials
        r.update({mt: [round(float(v), 4) for v in res[mt]] for mt in METHODS})
        r["se"] = {mt: [round(float(v), 4) for v in res["se"][mt]] for mt in METHODS}
        for key in ("FlyHash - LSH", "FlyHash - LSH se"):
            r[key] = [round(float(v), 4) for v in res[key]]
        report[name] = r
        if verbose:
            n_true = max(10, int(TRUE_FRACTION * len(x)))
            print(
                f"  {name}: n={len(x)}, d={x.shape[1]}, m={r['m']}, {n_true} true neighbours, "
                f"{N_QUERIES} queries x {trials} trials; mAP (± s.e.) by hash length"
            )
            print(
                "    "
                + f"{'k':>3} "
                + " ".join(f"{mt:>15}" for mt in METHODS)
                + f" {'FlyHash - LSH':>17}"
            )
            for j, k in enumerate(ks):
                cells = " ".join(f"{res[mt][j]:>7.3f} ±{res['se'][mt][j]:.3f}" for mt in METHODS)
                diff = f"{res['FlyHash - LSH'][j]:+.3f} ±{res['FlyHash - LSH se'][j]:.3f}"
                print(f"    {k:>3} {cells} {diff:>17}")
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
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.4))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        r = report[name]
        for mt in METHODS:
            se = r.get("se", {}).get(mt)
            ax.errorbar(r["ks"], r[mt], yerr=se, marker="o", capsize=3, label=mt)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1)
        ax.set_xlabel("hash length k")
        ax.set_ylabel("mAP (2% true neighbours)")
        ax.set_title(f"{name} (n={r['n']}, d={r['d']}, m={r.get('m', '?')})")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(METHODS), fontsize="small")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = out_dir / "flyhash_quality.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

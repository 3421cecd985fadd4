"""Tour sections of the foundation: the installation, and the SIMD kernels
checked on real text against numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import _native, data, info


def system(out: Path, verbose: bool = True) -> dict[str, Any]:
    report = info()
    if verbose:
        for k, v in report.items():
            if isinstance(v, dict):  # errors: field -> what is wrong with its setting
                v = [f"{a}: {b}" for a, b in v.items()] or ["-"]
            print(f"  {k:<13} {', '.join(map(str, v)) if isinstance(v, list) else v}")
    return report


def kernels(out: Path, verbose: bool = True) -> dict[str, Any]:
    """Letter-bigram profiles of the system's license texts, compared with the
    dispatched dot product at every SIMD level and with numpy in float64."""
    from tqdm import tqdm

    names, profiles = data.license_bigram_profiles()
    n = len(names)
    worst = 0.0
    sims = np.zeros((n, n))
    for level in tqdm(_native.simd_levels(), desc="kernels", disable=not verbose, leave=False):
        for i in range(n):
            for j in range(i, n):
                got = _native.dot(profiles[i], profiles[j], level=level)
                want = float(profiles[i].astype(np.float64) @ profiles[j].astype(np.float64))
                worst = max(worst, abs(got - want))
                sims[i, j] = sims[j, i] = got
    np.fill_diagonal(sims, -1)
    i, j = map(int, np.unravel_index(np.argmax(sims), sims.shape))
    result: dict[str, Any] = {
        "texts": n,
        "dims": int(profiles.shape[1]),
        "levels": _native.simd_levels(),
        "max_abs_error_vs_float64": worst,
        "most_similar_pair": [names[i], names[j], round(float(sims[i, j]), 4)],
    }
    if verbose:
        print(f"  {n} license texts as {profiles.shape[1]}-dim letter-bigram profiles")
        print(f"  dot at levels {', '.join(result['levels'])}: max |error| vs float64 {worst:.2e}")
        print(f"  most similar pair: {names[i]} ~ {names[j]} (cosine {sims[i, j]:.4f})")
    return result

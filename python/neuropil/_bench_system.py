"""Foundation benchmark: the dispatched dot product against numpy's BLAS."""

from __future__ import annotations

import numpy as np

from . import _native
from ._timing import Row, median_seconds


def simd(quick: bool = False, verbose: bool = True) -> list[Row]:
    rows = []
    rng = np.random.default_rng(0)
    small = rng.standard_normal((2, 4096), dtype=np.float32)
    t_np = median_seconds(lambda: float(small[0] @ small[1]), min_time=0.02)
    t_np_call = median_seconds(lambda: _native.dot(small[0], small[1]), min_time=0.02)
    rows.append(
        Row("dot, n=4096 (in L1; call overhead)", "calls/s", 1 / t_np_call, {"numpy": 1 / t_np})
    )
    for level in _native.simd_levels():
        t = median_seconds(
            lambda lv=level: _native.dot(small[0], small[1], level=lv), min_time=0.02
        )
        rows.append(Row(f"dot, n=4096, level={level}", "calls/s", 1 / t, {"numpy": 1 / t_np}))
    # 2 x 64 MiB (2 x 16 MiB with --quick): larger than the last-level cache.
    n = (4 << 20) if quick else (16 << 20)
    a = rng.standard_normal(n, dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    gb = 2 * a.nbytes / 1e9
    t = median_seconds(lambda: _native.dot(a, b), repeat=5 if quick else 9)
    t_np = median_seconds(lambda: float(a @ b), repeat=5 if quick else 9)
    rows.append(
        Row(
            f"dot, n={n:,} (2 x {a.nbytes >> 20} MiB, threaded)",
            "GB/s",
            gb / t,
            {"numpy": gb / t_np},
            limit="memory read bandwidth",
        )
    )
    return rows

"""pytest-benchmark suite of the foundation kernels (run: pytest benches/python --benchmark-only).

Each group pairs neuropil with the baseline a user would pick instead, so the
saved JSON holds both figures of one run.
"""

from __future__ import annotations

import numpy as np
import pytest

from neuropil import _native

N = 16 << 20  # 2 x 64 MiB: larger than the last-level cache


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, N), dtype=np.float32)


@pytest.mark.benchmark(group="dot-64MiB")
def test_dot_neuropil(benchmark, vectors):
    benchmark(_native.dot, vectors[0], vectors[1])


@pytest.mark.benchmark(group="dot-64MiB")
def test_dot_numpy(benchmark, vectors):
    benchmark(np.dot, vectors[0], vectors[1])

"""pytest-benchmark suite of FlyHash (run: pytest benches/python --benchmark-only).

Each group pairs neuropil with the baseline a user would pick instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from neuropil.flyhash import BinaryIndex, FlyHash

D, RATIO, K_FRAC = 1536, 13.0, 0.05


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal((256, D), dtype=np.float32)


@pytest.fixture(scope="module")
def dense_w():
    rng = np.random.default_rng(1)
    return (rng.integers(0, 2, size=(int(D * RATIO), D), dtype=np.int8) * 2 - 1).astype(np.float32)


@pytest.mark.benchmark(group="flyhash-encode-1536x19968")
@pytest.mark.parametrize("projection", ["sign", "sparse", "seeded"])
def test_encode_neuropil(benchmark, x, projection):
    fh = FlyHash(D, RATIO, K_FRAC, seed=0, projection=projection)
    benchmark(fh.encode_indices, x)


@pytest.mark.benchmark(group="flyhash-encode-1536x19968")
def test_encode_numpy_float32(benchmark, x, dense_w):
    k = int(dense_w.shape[0] * K_FRAC)
    benchmark(lambda: np.argpartition(x @ dense_w.T, -k, axis=1)[:, -k:])


@pytest.fixture(scope="module")
def codes():
    rng = np.random.default_rng(2)
    return rng.integers(0, 256, size=(100_000, 128), dtype=np.uint8), rng.integers(
        0, 256, size=(200, 128), dtype=np.uint8
    )


@pytest.mark.benchmark(group="hamming-top10-100k-1024bit")
def test_hamming_neuropil(benchmark, codes):
    ix = BinaryIndex(1024)
    ix.add(codes[0])
    benchmark(ix.search, codes[1], 10)


@pytest.mark.benchmark(group="hamming-top10-100k-1024bit")
def test_hamming_faiss(benchmark, codes):
    faiss = pytest.importorskip("faiss")
    ix = faiss.IndexBinaryFlat(1024)
    ix.add(codes[0])
    benchmark(ix.search, codes[1], 10)

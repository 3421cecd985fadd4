"""pytest-benchmark suite of lazy sliding windows (run: pytest benches/python --benchmark-only).

One batch of 256 shuffled windows of 30 x 287 float32 (8.8 MB) from 380k frames
(0.44 GB, beyond the last-level cache): neuropil's iterator and gather against
numpy take and sliding_window_view + fancy index, in one group.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from neuropil.windows import SlidingWindows

N, D, W, B = 380_000, 287, 30, 256


@pytest.fixture(scope="module")
def windows():
    frames = np.empty((N, D), dtype=np.float32)
    rng = np.random.default_rng(0)
    for lo in range(0, N, 65536):
        rng.standard_normal(dtype=np.float32, out=frames[lo : lo + 65536])
    sw = SlidingWindows(frames, W)
    starts = sw._layout.epoch_starts(True, 0, 0).astype(np.int64)
    batches = itertools.cycle(range(len(starts) // B))
    return sw, frames, starts, batches


def _next(starts, batches):
    k = next(batches)
    return starts[k * B : (k + 1) * B]


@pytest.mark.benchmark(group="windows-b256-w30")
def test_windows_batches_iterator(benchmark, windows):
    sw = windows[0]
    state = {"it": iter(sw.batches(B, prefetch=0))}

    def one():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(sw.batches(B, prefetch=0))
            return next(state["it"])

    benchmark(one)


@pytest.mark.benchmark(group="windows-b256-w30")
def test_windows_take(benchmark, windows):
    sw, _, starts, batches = windows
    benchmark(lambda: sw.take(_next(starts, batches) - 0))


@pytest.mark.benchmark(group="windows-b256-w30")
def test_numpy_take(benchmark, windows):
    _, frames, starts, batches = windows
    ar = np.arange(W)
    out = np.empty((B * W, D), dtype=np.float32)
    benchmark(lambda: np.take(frames, (_next(starts, batches)[:, None] + ar).ravel(), 0, out=out))


@pytest.mark.benchmark(group="windows-b256-w30")
def test_numpy_sliding_window_view(benchmark, windows):
    _, frames, starts, batches = windows
    view = np.lib.stride_tricks.sliding_window_view(frames, W, axis=0)
    benchmark(lambda: np.ascontiguousarray(view[_next(starts, batches)].transpose(0, 2, 1)))

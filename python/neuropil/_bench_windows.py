"""``neuropil bench windows``: lazy window batches against what a user would write.

Frames 380k x 287 float32 (0.44 GB, far beyond the last-level cache), W = 30,
B = 256 (8.8 MB per batch). Baselines, in the same run: numpy
``sliding_window_view`` + fancy index, ``numpy.take`` of the window rows, torch
``unfold`` + ``index_select``; the limit is a plain contiguous copy of 8.8 MB.
Peak resident memory of a whole lazy epoch is measured in a subprocess. With a
CUDA device, the GPU gather is timed against torch advanced indexing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from . import _native
from ._timing import Row

W, B = 30, 256


def _frames(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 65536):
        rng.standard_normal(dtype=np.float32, out=out[lo : lo + 65536])
    return out


# Runs in a fresh interpreter: peak RSS (ru_maxrss) of one lazy epoch over
# frames allocated there, against the budget frames + 3 batches + 8 B/window.
_RSS_CHILD = r"""
import json, resource, sys
import numpy as np
from neuropil.windows import SlidingWindows
n, d, w, b, prefetch = (int(a) for a in sys.argv[1:6])
def status(key):
    # /proc/self/status: VmHWM is this process image's peak RSS (ru_maxrss would
    # carry the parent's peak across fork + exec), VmRSS the current one.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def peak():
    return status("VmHWM")
# Warm up first, so base holds the fixed overhead of the process: imports (numpy
# 2 imports numpy.random, and with it hashlib's libcrypto, on first use: ~4 MB),
# the rayon pool's threads (a batch over 1 MB runs in parallel) and the prefetch thread.
rng = np.random.default_rng(0)
rng.standard_normal(16, dtype=np.float32)
warm = SlidingWindows(np.zeros((w + 64, d), dtype=np.float32), w)
for batch in warm.batches(64, prefetch=prefetch):
    pass
del warm, batch
base = status("VmRSS")  # resident now: the warm-up's freed buffers are not counted
frames = np.empty((n, d), dtype=np.float32)
for lo in range(0, n, 65536):
    rng.standard_normal(dtype=np.float32, out=frames[lo:lo + 65536])
sw = SlidingWindows(frames, w)
it = sw.batches(b, seed=0, epoch=0, prefetch=prefetch)
count = 0
for batch in it:
    count += 1
plan = sw.memory_plan(batch_size=b, prefetch=prefetch)
print(json.dumps({"base": base, "peak": peak(), "frames": frames.nbytes, "windows": len(sw),
                  "batches": count, "batch_bytes": b * w * d * 4,
                  "eager": plan.eager_bytes, "lazy": plan.lazy_bytes}))
"""


def _rss(n: int, d: int, prefetch: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(n), str(d), str(W), str(B), str(prefetch)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def windows(quick: bool = False, verbose: bool = True) -> list[Row]:
    n, d = (40_000, 287) if quick else (380_000, 287)
    if verbose:
        print(f"  frames {n:,} x {d} float32 ({n * d * 4 / 1e9:.2f} GB), W={W}, B={B}")
    rows = _speed(n, d, 3 if quick else 7, quick)  # frees its frames on return
    rows.append(_rss_row(n, d))
    rows.extend(_cuda_rows(quick, verbose))
    return rows


def _speed(n: int, d: int, repeat: int, quick: bool) -> list[Row]:
    from .windows import SlidingWindows

    rows: list[Row] = []
    frames = _frames(n, d)
    sw = SlidingWindows(frames, W)
    starts = sw._layout.epoch_starts(True, 0, 0)
    nb = len(starts) // B
    k = [0]

    def next_starts() -> np.ndarray:
        i = k[0] % nb
        k[0] += 1
        return starts[i * B : (i + 1) * B]

    raw = sw._arrays[0].source()
    assert raw is not None  # (numpy frames)
    out_u8 = np.empty((B, W * d * 4), dtype=np.uint8)
    view = np.lib.stride_tricks.sliding_window_view(frames, W, axis=0)  # (n-W+1, d, W)
    ar = np.arange(W)
    out_take = np.empty((B * W, d), dtype=np.float32)

    def contiguous(s: np.ndarray) -> None:
        # The copy limit: the same bytes from one contiguous run of frames (the
        # batch's windows laid end to end), same kernel and threads: no gather.
        first = int(s[0]) % (n - B * W)
        _native.windows_gather(raw, first + W * np.arange(B, dtype=np.int64), 0, W, out_u8)

    iterator = [sw.batches(B, seed=1, prefetch=0)]  # the epoch order: once per epoch

    def from_iterator(_s: np.ndarray) -> None:
        try:
            next(iterator[0])
        except StopIteration:
            iterator[0] = sw.batches(B, seed=1, prefetch=0)
            next(iterator[0])

    cases = {
        "neuropil": lambda s: _native.windows_gather(raw, s, 0, W, out_u8),
        "iterator": from_iterator,
        "numpy take": lambda s: np.take(frames, (s[:, None] + ar).ravel(), axis=0, out=out_take),
        "numpy sliding_window_view": lambda s: np.ascontiguousarray(view[s].transpose(0, 2, 1)),
        "copy": contiguous,
    }
    try:
        import torch

        unf = torch.from_numpy(frames).unfold(0, W, 1)  # (n-W+1, d, W) view

        def torch_unfold(s: np.ndarray) -> None:
            unf.index_select(0, torch.from_numpy(s)).transpose(1, 2).contiguous()

        cases["torch unfold+index_select"] = torch_unfold
    except ImportError:
        pass
    # Round robin: every case times 20 consecutive batches of the shuffled order in
    # each round, so load from other processes hits all cases alike; medians.
    inner = 20
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn(next_starts())  # warm-up
    for _ in range(repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn(next_starts())
            samples[name].append((time.perf_counter() - t0) / inner)
    t = {name: float(np.median(v)) for name, v in samples.items()}
    iterator[0].close()
    t_native, t_iter, t_copy = t.pop("neuropil"), t.pop("iterator"), t.pop("copy")
    baselines = {name: 1 / v for name, v in t.items()}
    span = B * W * d
    limit = f"copy limit {1 / t_copy:,.0f} batches/s ({span * 4 / t_copy / 1e9:.1f} GB/s)"
    rows.append(
        Row(
            f"gather B={B} W={W} D={d} (Rust kernel)",
            "batches/s",
            1 / t_native,
            baselines,
            limit=limit,
        )
    )
    rows.append(
        Row(
            f"batches() iterator B={B}, prefetch=0", "batches/s", 1 / t_iter, baselines, limit=limit
        )
    )

    # Prefetch hiding a simulated training step (a sleep, as while a GPU trains).
    step = 1.5 * t_iter
    count = 30 if quick else 120

    def epoch_time(prefetch: int) -> float:
        it = sw.batches(B, seed=2, prefetch=prefetch)
        t0 = time.perf_counter()
        for j, _batch in enumerate(it):
            time.sleep(step)
            if j + 1 == count:
                break
        it.close()
        return (time.perf_counter() - t0) / count

    def step_alone() -> float:
        t0 = time.perf_counter()
        for _ in range(count):
            time.sleep(step)
        return (time.perf_counter() - t0) / count

    # Interleaved, so load from other processes hits both alike; medians.
    t_pf, t_nopf, t_step = [], [], []
    for _ in range(3):
        t_pf.append(epoch_time(2))
        t_nopf.append(epoch_time(0))
        t_step.append(step_alone())
    pf, nopf, alone = (float(np.median(x)) for x in (t_pf, t_nopf, t_step))
    hidden = (nopf - pf) / max(nopf - alone, 1e-9)
    rows.append(
        Row(
            f"sleep {step * 1e3:.2f} ms (training step) + batch, prefetch=2",
            "ms/batch",
            pf * 1e3,
            {"prefetch=0": nopf * 1e3, "step alone": alone * 1e3},
            limit=f"{min(max(hidden, 0.0), 1.0):.0%} of the batch assembly hidden",
            lower_is_better=True,
        )
    )
    return rows


def _rss_row(n: int, d: int) -> Row:
    """Peak resident memory of a whole lazy epoch, in a fresh process."""
    r = _rss(n, d, 2)
    extra = r["peak"] - r["base"]
    budget = r["frames"] + 3 * r["batch_bytes"] + 8 * r["windows"]
    slack = 1 << 20  # the prefetch thread's own stack and malloc arena
    verdict = "within" if extra <= budget else "within+1MB" if extra <= budget + slack else "OVER"
    return Row(
        f"peak RSS, one lazy epoch ({r['batches']} batches, prefetch=2)",
        "MB",
        extra / 1e6,
        {"eager (every window)": (r["eager"] + r["frames"]) / 1e6},
        limit=f"budget frames + 3 batches + 8 B/window = {budget / 1e6:,.1f} MB "
        f"({verdict}; "
        f"{(extra - budget) / 1e6:+.2f} MB)",
        lower_is_better=True,
    )


def _cuda_rows(quick: bool, verbose: bool) -> list[Row]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    from .windows import SlidingWindows

    n, d = (40_000, 288) if quick else (380_000, 288)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    frames = torch.randn((n, d), device=dev, generator=g)
    sw = SlidingWindows(frames, W)
    starts = torch.from_numpy(sw._layout.epoch_starts(True, 0, 0)[:B].copy()).to(dev)
    out = torch.empty((B, W, d), device=dev)
    arr = sw._arrays[0]
    idx = starts[:, None] + torch.arange(W, device=dev)

    def cuda_time(fn, iters: int = 200 if quick else 2000) -> float:
        for _ in range(10):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(5):
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e-3 / iters)
        return float(np.median(samples))

    from .windows import _cuda_gather

    t_np = cuda_time(lambda: _cuda_gather(arr, starts, out))
    t_adv = cuda_time(lambda: frames[idx])
    t_flat = cuda_time(lambda: frames.index_select(0, idx.view(-1)))
    # The whole iterator, wall time per batch (Python overhead included), against
    # what a user would write: build the (B, W) row index and index the frames.
    order = torch.from_numpy(sw._layout.epoch_starts(True, 0, 1)).to(dev)
    count = min(len(order) // B, 200 if quick else 1000)
    ar = torch.arange(W, device=dev)

    def wall(make_batches) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        make_batches()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / count

    def ours() -> None:
        for j, _b in enumerate(sw.batches(B, seed=0, epoch=1)):
            if j + 1 == count:
                break

    def theirs() -> None:
        for j in range(count):
            frames[order[j * B : (j + 1) * B, None] + ar]

    ours()
    theirs()
    t_it = float(np.median([wall(ours) for _ in range(3)]))
    t_user = float(np.median([wall(theirs) for _ in range(3)]))
    src = frames.view(-1)[: B * W * d]
    dst = torch.empty_like(src)
    t_copy = cuda_time(lambda: dst.copy_(src))
    nbytes = B * W * d * 4
    if verbose:
        print(f"  GPU: {torch.cuda.get_device_name(dev)}")
    return [
        Row(
            f"CUDA gather {B}x{W}x{d} float32 from GPU frames",
            "us",
            t_np * 1e6,
            {"torch advanced indexing": t_adv * 1e6, "torch index_select rows": t_flat * 1e6},
            limit=f"copy {nbytes / 1e6:.1f} MB: {t_copy * 1e6:.1f} us "
            f"({2 * nbytes / t_copy / 1e9:.0f} GB/s read+write); target <= 15 us",
            lower_is_better=True,
        ),
        Row(
            f"CUDA batches() iterator, {B}x{W}x{d}, wall time per batch",
            "us",
            t_it * 1e6,
            {"torch: index build + advanced indexing": t_user * 1e6},
            limit="includes Python overhead per batch",
            lower_is_better=True,
        ),
    ]

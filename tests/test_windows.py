"""Lazy sliding windows: index math, epoch order, gather, torch interop, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HAS_TORCH, assert_saves_take_normal_modes
from neuropil import ArgumentError, DTypeError, ShapeError, _native
from neuropil.windows import SlidingWindows, WindowMemoryError

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch")


def brute_windows(lengths, window, stride, ahead=0):
    """(episode, first frame) of every window, by brute force."""
    out, lo = [], 0
    for e, n in enumerate(lengths):
        s = lo
        while s + window + ahead <= lo + n:
            out.append((e, s))
            s += stride
        lo += n
    return out


def frames_for(n, d=3):
    # Row r holds r * 10 + column: every value names its frame.
    return (np.arange(n)[:, None] * 10 + np.arange(d)[None, :]).astype(np.float32)


@st.composite
def layouts(draw):
    lengths = draw(st.lists(st.integers(0, 30), min_size=1, max_size=8))
    window = draw(st.integers(1, 8))
    stride = draw(st.integers(1, 4))
    offset = draw(st.one_of(st.none(), st.integers(-(window - 1), 2)))
    return lengths, window, stride, offset


# ---------------------------------------------------------------- correctness


@settings(max_examples=150, deadline=None)
@given(layouts(), st.booleans())
def test_windows_match_brute_force_and_never_cross_episodes(layout, as_offsets):
    lengths, window, stride, offset = layout
    n = sum(lengths)
    ahead = max(0, offset or 0)
    want = brute_windows(lengths, window, stride, ahead)
    if n == 0:
        return
    f = frames_for(n)
    actions = np.arange(n, dtype=np.int64) * 7
    episodes = np.concatenate([[0], np.cumsum(lengths)]) if as_offsets else lengths
    kwargs = dict(episodes=episodes, targets={"a": actions, "w": f[:, :1]})
    kwargs["target_offset"] = {"a": offset, "w": None}
    if not want:
        with pytest.raises(ArgumentError, match="window must be at most the longest episode"):
            SlidingWindows(f, window, stride, **kwargs)
        return
    sw = SlidingWindows(f, window, stride, **kwargs)
    assert len(sw) == len(want)
    np.testing.assert_array_equal(sw.starts, [s for _, s in want])
    batch = sw.take(np.arange(len(sw)))
    # An array that reads both ways ([0, ..., 0, n]) is taken as offsets: the same
    # windows, numbered episodes differ only by empty ones.
    offsets = sw.episode_offsets
    nonempty = np.concatenate([[0], np.cumsum(lengths)])
    assert set(offsets.tolist()) == set(nonempty.tolist())
    for i, (_, s) in enumerate(want):
        np.testing.assert_array_equal(batch["frames"][i], f[s : s + window])
        np.testing.assert_array_equal(sw[i], f[s : s + window])
        e = sw.episode_of(i)
        # The window and its target stay inside episode e.
        last = s + window - 1 + (offset if offset is not None else 0)
        assert offsets[e] <= s and s + window <= offsets[e + 1]
        assert offsets[e] <= last < offsets[e + 1]
        if offset is None:
            np.testing.assert_array_equal(batch["a"][i], actions[s : s + window])
        else:
            assert batch["a"][i] == actions[last] == sw.target("a", i)
        np.testing.assert_array_equal(batch["w"][i], f[s : s + window, :1])


@settings(max_examples=60, deadline=None)
@given(
    n_windows=st.integers(1, 200),
    world=st.integers(1, 5),
    batch=st.integers(1, 40),
    seed=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 5),
    drop_last=st.booleans(),
)
def test_every_window_once_per_epoch_across_ranks(n_windows, world, batch, seed, epoch, drop_last):
    if drop_last and n_windows < world:
        return
    f = frames_for(n_windows + 3, 2)
    sw = SlidingWindows(f, 4)
    assert len(sw) == n_windows
    counts = np.zeros(n_windows, dtype=np.int64)
    lengths = set()
    first = f[:, 0] / 10
    for rank in range(world):
        it = sw.batches(
            batch,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            drop_last=drop_last,
            prefetch=rank % 3,
        )
        seen = [b["frames"][:, 0, 0].copy() / 10 for b in it]
        lengths.add(len(seen))
        assert len(seen) == len(it)
        for starts in seen:
            np.add.at(counts, starts.astype(np.int64), 1)
        assert first.size  # frames untouched
    assert len(lengths) == 1  # the same number of batches on every rank
    per_rank = n_windows // world if drop_last else -(-n_windows // world)
    if drop_last:
        # Every window at most once; the partial batch and the tail are dropped.
        assert counts.max() <= 1
        assert counts.sum() == world * (per_rank // batch) * batch
    else:
        # Every window at least once; padding repeats fewer than world windows.
        assert counts.min() >= 1
        assert counts.sum() == world * per_rank
        assert counts.sum() - n_windows < world


def test_same_seed_and_epoch_give_identical_batches_other_epochs_differ():
    f = np.random.default_rng(0).standard_normal((500, 8), dtype=np.float32)
    sw = SlidingWindows(
        f, 5, episodes=[100, 250, 150], targets={"y": np.arange(500)}, target_offset=0
    )

    def epoch(e, seed=3, prefetch=2, reuse=True):
        return [
            {k: v.copy() for k, v in b.items()}
            for b in sw.batches(32, seed=seed, epoch=e, prefetch=prefetch, reuse_buffers=reuse)
        ]

    a, b = epoch(1), epoch(1, prefetch=0, reuse=False)
    assert len(a) == len(b) == -(-len(sw) // 32)
    for x, y in zip(a, b, strict=False):
        assert x["frames"].tobytes() == y["frames"].tobytes()
        np.testing.assert_array_equal(x["y"], y["y"])
    assert not np.array_equal(epoch(2)[0]["y"], a[0]["y"])
    assert not np.array_equal(epoch(1, seed=4)[0]["y"], a[0]["y"])
    # The order is a permutation, pinned by the documented generator.
    order = sw.epoch_order(seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(len(sw)))
    np.testing.assert_array_equal(
        _native.windows_permutation(5, 0, 0), _native.windows_permutation(5, 0, 0)
    )
    assert _native.windows_permutation(10, 0, 0).tolist() == PINNED_PERMUTATION
    no_shuffle = [b["y"].copy() for b in sw.batches(64, shuffle=False)]
    np.testing.assert_array_equal(np.concatenate(no_shuffle), sw.starts + 4)


# The seeded generator (SplitMix64 + Fisher-Yates) gives this everywhere.
PINNED_PERMUTATION = _native.windows_permutation(10, 0, 0).tolist()


def test_pinned_permutation_is_stable_across_processes():
    from conftest import run_python

    r = run_python(
        "from neuropil import _native; print(_native.windows_permutation(10, 0, 0).tolist())"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(PINNED_PERMUTATION)
    r = run_python(
        "from neuropil import _native; print(_native.windows_permutation(10, 0, 0).tolist())",
        env={"NEUROPIL_KERNEL": "scalar", "NEUROPIL_NUM_THREADS": "1"},
    )
    assert r.stdout.strip() == str(PINNED_PERMUTATION)


def test_out_of_range_indices_raise_index_error_never_clamp():
    f = frames_for(50)
    sw = SlidingWindows(f, 10, targets={"y": np.arange(50)}, target_offset=0)
    n = len(sw)
    assert n == 41
    np.testing.assert_array_equal(sw[-1], f[40:50])
    for bad in (n, -n - 1, 10**12):
        with pytest.raises(IndexError, match="out of range"):
            sw[bad]
        with pytest.raises(IndexError):
            sw.take([0, bad])
    with pytest.raises(IndexError):
        sw.start(n)
    # The raw gather checks its starts too: a window past the end is an error.
    raw = f.view(np.uint8)
    out = np.empty((1, 10 * raw.shape[1]), dtype=np.uint8)
    _native.windows_gather(raw, np.array([40]), 0, 10, out)
    for start, shift in ((41, 0), (-1, 0), (40, 1)):
        with pytest.raises(IndexError):
            _native.windows_gather(raw, np.array([start]), shift, 10, out)
    with pytest.raises(ShapeError, match="out must have shape"):
        _native.windows_gather(raw, np.array([0, 1]), 0, 10, out)
    with pytest.raises(DTypeError, match="starts must be a numpy array of int64"):
        _native.windows_gather(raw, np.array([0.0]), 0, 10, out)
    with pytest.raises(ArgumentError, match="out must be a writeable array"):
        out.flags.writeable = False
        _native.windows_gather(raw, np.array([0]), 0, 10, out)
    with pytest.raises(DTypeError, match="indices must hold integers"):
        sw.take([0.5])


def test_bad_input_raises_clear_errors():
    f = frames_for(20)
    with pytest.raises(ArgumentError, match=r"window must be at most the longest episode \(10"):
        SlidingWindows(f, 11, episodes=[10, 10])
    with pytest.raises(ArgumentError, match="stride must be a positive integer; got 0"):
        SlidingWindows(f, 3, stride=0)
    with pytest.raises(ArgumentError, match="window must be a positive integer; got 0"):
        SlidingWindows(f, 0)
    with pytest.raises(ArgumentError, match="episodes must be lengths summing to 20"):
        SlidingWindows(f, 3, episodes=[10, 9])
    with pytest.raises(ArgumentError, match="episodes must be lengths summing to 20"):
        SlidingWindows(f, 3, episodes=[0, 12, 8, 21])
    with pytest.raises(
        ShapeError, match=r"targets\['y'\] must have shape \(20, \.\.\.\) .* got \(19,\)"
    ):
        SlidingWindows(f, 3, targets={"y": np.arange(19)})
    with pytest.raises(ShapeError, match=r"frames must have shape \(n, d\); got \(20,\)"):
        SlidingWindows(f[:, 0], 3)
    with pytest.raises(ShapeError, match=r"frames must have shape \(n, d\); got \(2, 10, 3\)"):
        SlidingWindows(f.reshape(2, 10, 3), 3)
    with pytest.raises(ShapeError, match="frames must not be empty"):
        SlidingWindows(f[:0], 3)
    with pytest.raises(DTypeError, match="frames must have a numeric dtype"):
        SlidingWindows(np.array([["a"]]), 1)
    with pytest.raises(
        ArgumentError, match=r"target_offset\['y'\] must be an integer >= -2; got -3"
    ):
        SlidingWindows(f, 3, targets={"y": np.arange(20)}, target_offset=-3)
    with pytest.raises(ArgumentError, match="target_offset names unknown targets"):
        SlidingWindows(f, 3, targets={"y": np.arange(20)}, target_offset={"z": 1})
    sw = SlidingWindows(f, 3)
    with pytest.raises(ArgumentError, match="batch_size must be a positive integer; got 0"):
        sw.batches(0)
    with pytest.raises(ArgumentError, match=r"rank must be in 0\.\.2"):
        sw.batches(4, rank=2, world_size=2)
    with pytest.raises(ArgumentError, match="world_size must be a positive integer"):
        sw.batches(4, world_size=0)
    with pytest.raises(ArgumentError, match="seed must be"):
        sw.batches(4, seed=-1)
    with pytest.raises(ArgumentError, match="window must be an integer"):
        SlidingWindows(f, 2.5)


def test_episodes_as_lengths_or_offsets_and_dtypes_kept():
    f = np.arange(40, dtype=np.float16).reshape(20, 2)
    a = SlidingWindows(f, 4, episodes=[5, 0, 15])
    b = SlidingWindows(f, 4, episodes=np.array([0, 5, 5, 20]))
    assert a.num_episodes == b.num_episodes == 3
    np.testing.assert_array_equal(a.starts, b.starts)
    np.testing.assert_array_equal(a.starts, [0, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    batch = a.take([2])
    assert batch["frames"].dtype == np.float16
    np.testing.assert_array_equal(batch["frames"][0], f[5:9])
    # A non-contiguous input is copied once, and still sliced right.
    g = np.asfortranarray(frames_for(30))
    np.testing.assert_array_equal(SlidingWindows(g, 5)[3], frames_for(30)[3:8])


def test_memmap_frames_are_read_in_place(tmp_path):
    f = np.random.default_rng(1).standard_normal((3000, 16), dtype=np.float32)
    path = tmp_path / "frames.f32"
    f.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=f.shape)
    sw = SlidingWindows(mm, 12, stride=3, episodes=[1000, 2000])
    assert sw.frames is mm
    batches = list(b["frames"].copy() for b in sw.batches(100, seed=5))
    want = [
        SlidingWindows(f, 12, stride=3, episodes=[1000, 2000]).take(idx)["frames"]
        for idx in np.array_split(sw.epoch_order(seed=5), range(100, len(sw), 100))
    ]
    for x, y in zip(batches, want, strict=False):
        np.testing.assert_array_equal(x, y)


def test_materialize_and_memory_plan(tmp_path):
    f = frames_for(60, 4)
    sw = SlidingWindows(f, 6, episodes=[30, 30], targets={"y": np.arange(60)}, target_offset=1)
    eager = sw.materialize()
    assert eager["frames"].shape == (len(sw), 6, 4) and eager["y"].shape == (len(sw),)
    np.testing.assert_array_equal(eager["frames"], sw.take(np.arange(len(sw)))["frames"])
    plan = sw.memory_plan(batch_size=8, prefetch=2, available=10**12)
    assert plan.mode == "eager"
    assert plan.eager_bytes == len(sw) * (6 * 16 + 8)
    assert plan.lazy_bytes == 60 * 16 + 60 * 8 + 3 * 8 * (6 * 16 + 8) + 4 * len(sw)
    small = sw.memory_plan(available=plan.frames_bytes + plan.eager_bytes // 2)
    assert small.mode == "lazy" and "lazy" in str(small)
    # The 13.1 GB case of the issue, planned without allocating it.
    # (A sparse file: nothing is read or allocated.)
    path = tmp_path / "sparse.f32"
    with open(path, "wb") as fh:
        fh.truncate(380_000 * 287 * 4)
    big = SlidingWindows(np.memmap(path, np.float32, "r", shape=(380_000, 287)), 30)
    p = big.memory_plan(available=8 * 2**30)
    assert p.mode == "lazy" and 13.0e9 < p.eager_bytes < 13.2e9
    assert p.lazy_bytes < 0.5e9
    with pytest.raises(WindowMemoryError, match="materialize would not fit"):
        big.materialize(available=8 * 2**30)


# ---------------------------------------------------------------- torch


@needs_torch
def test_torch_cpu_frames_batches_and_bfloat16():
    import torch

    f = torch.from_numpy(frames_for(200, 5))
    sw = SlidingWindows(f, 7, episodes=[120, 80], targets={"y": torch.arange(200)}, target_offset=0)
    b = next(iter(sw.batches(16, seed=9)))
    assert isinstance(b["frames"], torch.Tensor) and b["frames"].shape == (16, 7, 5)
    assert torch.equal(b["y"], (b["frames"][:, -1, 0] / 10).long())
    bf = SlidingWindows(f.to(torch.bfloat16), 7)
    got = bf.take([3, 4])["frames"]
    assert got.dtype == torch.bfloat16 and torch.equal(got[0], f.to(torch.bfloat16)[3:10])
    assert torch.equal(sw[2], f[2:9])


@needs_torch
def test_dataset_with_dataloader_and_distributed_sampler():
    import torch
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    f = frames_for(300, 4)
    sw = SlidingWindows(f, 5, episodes=[100, 200], targets={"y": np.arange(300)}, target_offset=0)
    ds = sw.as_dataset()
    assert len(ds) == len(sw)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(ds, batch_size=32, sampler=sampler, collate_fn=ds.collate)
        for batch in loader:
            assert batch["frames"].shape[1:] == (5, 4)
            assert torch.equal(batch["y"], (batch["frames"][:, -1, 0] / 10).long())
            seen.extend(batch["y"].tolist())
    assert sorted(set(seen)) == sorted((sw.starts + 4).tolist())
    # torch's default_collate works too (it stacks the samples).
    plain = next(iter(DataLoader(ds, batch_size=8)))
    assert plain["frames"].shape == (8, 5, 4)
    torch.testing.assert_close(plain["frames"][3], torch.from_numpy(f[3:8]))
    assert torch.equal(ds[0]["frames"], torch.from_numpy(f[0:5]))
    with pytest.raises(IndexError):
        ds.__getitems__([len(ds)])


@needs_torch
def test_device_cpu_is_a_no_op_and_torch_module_reexports():
    import neuropil.torch as nt

    sw = SlidingWindows(frames_for(40), 4)
    assert nt.WindowDataset is type(sw.as_dataset())
    b = next(iter(sw.batches(4, device="cpu")))
    assert isinstance(b["frames"], np.ndarray)


@pytest.mark.cuda
def test_cuda_frames_gathered_on_the_gpu():
    import torch

    f = frames_for(3000, 288)
    y = np.arange(3000)
    cpu = SlidingWindows(
        f, 30, episodes=[1000, 2000], targets={"y": y, "w": y}, target_offset={"y": 1, "w": None}
    )
    gpu = SlidingWindows(
        torch.from_numpy(f).cuda(),
        30,
        episodes=[1000, 2000],
        targets={"y": y, "w": y},
        target_offset={"y": 1, "w": None},
    )
    for a, b in zip(
        cpu.batches(256, seed=2, epoch=1), gpu.batches(256, seed=2, epoch=1), strict=False
    ):
        assert b["frames"].is_cuda
        np.testing.assert_array_equal(a["frames"], b["frames"].cpu().numpy())
        np.testing.assert_array_equal(a["y"], b["y"].cpu().numpy())
        np.testing.assert_array_equal(a["w"], b["w"].cpu().numpy())
    with pytest.raises(IndexError):
        gpu.take([len(gpu)])
    moved = next(
        iter(SlidingWindows(torch.from_numpy(f), 30).batches(8, device="cuda", pin_memory=True))
    )
    assert moved["frames"].is_cuda and moved["frames"].shape == (8, 30, 288)


# ---------------------------------------------------------------- bench


def test_quick_bench_prints_every_figure():
    from neuropil._bench_windows import windows

    rows = windows(quick=True, verbose=False)
    cases = " ".join(r.case for r in rows)
    assert "gather" in cases and "prefetch=2" in cases and "peak RSS" in cases
    gather = rows[0]
    assert {"numpy take", "numpy sliding_window_view"} <= set(gather.baselines)
    assert "copy limit" in gather.limit
    rss = next(r for r in rows if "peak RSS" in r.case)
    assert "within" in rss.limit


@needs_torch
def test_gpu_gather_code_path_runs_on_cpu_tensors():
    # The CUDA path is plain torch (index_select on a strided window view), so its
    # logic is checked here on CPU tensors; the GPU itself is tested under `cuda`.
    import torch

    from neuropil.windows import _cuda_gather

    f = frames_for(500, 6)
    y = np.arange(500) * 3
    sw = SlidingWindows(
        torch.from_numpy(f),
        9,
        stride=2,
        episodes=[200, 300],
        targets={"y": torch.from_numpy(y), "w": torch.from_numpy(y)},
        target_offset={"y": 2, "w": None},
    )
    idx = np.array([0, 5, len(sw) - 1, 100])
    want = sw.take(idx)
    starts = torch.from_numpy(sw._layout.starts(idx))
    for a in sw._arrays:
        out = torch.empty((len(idx), *a.item_shape()), dtype=a.dtype)
        _cuda_gather(a, starts, out)
        assert torch.equal(out, want[a.name]), a.name


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip_memmapped(tmp_path):
    f = np.random.default_rng(3).standard_normal((400, 7), dtype=np.float32)
    y = np.arange(400, dtype=np.int32)
    sw = SlidingWindows(f, 6, stride=2, episodes=[150, 250],
                        targets={"y": y, "w": f[:, :2].astype(np.float16)},
                        target_offset={"y": 1, "w": None})  # fmt: skip
    path = tmp_path / "w.safetensors"
    sw.save(path)
    for mmap in (True, False):
        back = SlidingWindows.load(path, mmap=mmap)
        assert isinstance(back.frames, np.memmap) == mmap
        assert (back.window, back.stride, len(back)) == (6, 2, len(sw))
        assert back.target_offset == {"y": 1, "w": None}
        np.testing.assert_array_equal(back.episode_offsets, sw.episode_offsets)
        for a, b in zip(sw.batches(64, seed=1), back.batches(64, seed=1), strict=True):
            for k in a:
                assert a[k].dtype == b[k].dtype
                np.testing.assert_array_equal(a[k], b[k])


def test_load_rejects_malformed_files_and_failed_save_keeps_old_file(tmp_path, monkeypatch):
    import json
    import struct

    from neuropil import FormatError
    from neuropil import _windows_store as store

    sw = SlidingWindows(frames_for(50), 5, targets={"y": np.arange(50)}, target_offset=0)
    path = tmp_path / "w.safetensors"
    sw.save(path)
    good = path.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])

    def write(h=None, body=None, raw=None):
        bad = tmp_path / "bad.safetensors"
        if raw is None:
            hb = json.dumps(h).encode()
            raw = struct.pack("<Q", len(hb)) + hb + (good[8 + n :] if body is None else body)
        bad.write_bytes(raw)
        return bad

    def edit(fn):
        h = json.loads(json.dumps(header))
        fn(h)
        return write(h)

    cases = {
        "truncated": write(raw=good[:-10]),
        "tiny": write(raw=good[:5]),
        "header length": write(raw=struct.pack("<Q", 10**9) + good[8:]),
        "not JSON": write(raw=struct.pack("<Q", 4) + b"{{{{" + good[8 + n :]),
        "version": edit(lambda h: h["__metadata__"].update(version="2")),
        "format": edit(lambda h: h["__metadata__"].update(format="other")),
        "window": edit(lambda h: h["__metadata__"].update(window="0")),
        "too long window": edit(lambda h: h["__metadata__"].update(window="51")),
        "targets": edit(lambda h: h["__metadata__"].update(targets='["z"]')),
        "offset": edit(lambda h: h["__metadata__"].update(target_offset='{"y": "a"}')),
        "dtype": edit(lambda h: h["frames"].update(dtype="F99")),
        "offsets": edit(lambda h: h["frames"].update(data_offsets=[0, 12])),
        "shape": edit(lambda h: h["frames"].update(shape=[50, -3])),
        "missing": edit(lambda h: h.pop("episodes")),
        "episodes": edit(lambda h: h["episodes"].update(dtype="F64")),
    }
    for what, bad in cases.items():
        with pytest.raises(FormatError):
            SlidingWindows.load(bad)
        assert what  # every case raised
    # A save that fails midway leaves the old file and no temporary file behind.
    monkeypatch.setattr(store, "_write_tensors", lambda f, arrays: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        SlidingWindows(frames_for(80), 3).save(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "w.safetensors"]


@pytest.mark.slow
def test_tour_section_on_minilm_embeddings(tmp_path, monkeypatch, minilm):
    from neuropil import _tour_windows

    monkeypatch.setattr(_tour_windows, "PER_TEXT", 20)
    r = _tour_windows.windows(tmp_path, verbose=False, model=minilm)
    assert r["windows_crossing_a_boundary"] == 0
    assert 0 < r["windows"] < r["windows_if_boundaries_ignored"]
    # Real text is locally coherent: each window's next sentence is closer to it.
    assert r["cos(window mean, next sentence)"] > r["cos(window mean, another window's next)"]


def test_prefetch_thread_stops_when_iterator_is_dropped_or_closed():
    import gc
    import threading
    import time

    sw = SlidingWindows(frames_for(2000, 8), 10)

    def prefetchers():
        return [t for t in threading.enumerate() if t.name == "neuropil-windows-prefetch"]

    # By identity: an earlier test's dropped iterator may still be stopping
    # (within a 50 ms poll), and its thread leaving mid-test is no failure.
    before = set(prefetchers())
    for j, _b in enumerate(sw.batches(16, prefetch=2)):
        if j == 3:
            break  # the iterator is dropped mid-epoch
    with sw.batches(16, prefetch=3) as it:
        next(it)
    gc.collect()
    deadline = time.monotonic() + 5
    while not set(prefetchers()) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(prefetchers()) <= before
    # An error in the background thread reaches the consumer.
    it = sw.batches(16, prefetch=2)
    it._make = lambda k: 1 / 0
    with pytest.raises(ZeroDivisionError):
        next(it)


# ---------------------------------------------------------------- persistence: audit fixes


def _header(path):
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n, raw


def _write_in_order(path, meta, tensors):
    """A safetensors file with ``tensors`` [(name, array, dtype)] in the order given
    and no alignment: the layout files had before tensors were aligned."""
    import json
    import struct

    header, offset = {"__metadata__": meta}, 0
    for name, arr, dtype in tensors:
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}  # fmt: skip
        offset += arr.nbytes
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    body = b"".join(np.ascontiguousarray(a).tobytes() for _, a, _ in tensors)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + body)


def test_saved_tensors_are_aligned_and_load_memmapped_by_default(tmp_path):
    # 51 x 3 float32 frames are 612 bytes: int64 episodes written after them were
    # misaligned, and the default mmap=True load raised TypeError.
    f = np.random.default_rng(0).random((51, 3)).astype(np.float32)
    y = np.arange(51, dtype=np.int8)
    z = np.arange(51, dtype=np.float64)
    sw = SlidingWindows(f, window=4, targets={"y": y, "z": z}, target_offset=0)
    path = tmp_path / "w.safetensors"
    sw.save(path)
    header, start, _ = _header(path)
    assert start % 8 == 0
    itemsize = {"F32": 4, "I64": 8, "I8": 1, "F64": 8}
    for name, e in header.items():
        if name != "__metadata__":
            assert (start + e["data_offsets"][0]) % itemsize[e["dtype"]] == 0, name
    back = SlidingWindows.load(path)  # mmap=True
    assert isinstance(back.frames, np.memmap) and len(back) == len(sw) == 48
    for k, v in sw.take(np.arange(len(sw))).items():
        np.testing.assert_array_equal(back.take(np.arange(len(back)))[k], v)
    # Still a plain safetensors file.
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    st_arrays = safetensors_numpy.load_file(str(path))
    np.testing.assert_array_equal(st_arrays["frames"], f)
    np.testing.assert_array_equal(st_arrays["episodes"], [0, 51])
    np.testing.assert_array_equal(st_arrays["target.y"], y)


def test_load_copies_misaligned_tensors_of_older_files(tmp_path):
    f = np.random.default_rng(1).random((51, 3)).astype(np.float32)
    y = np.arange(51, dtype=np.int64)
    sw = SlidingWindows(f, window=4, episodes=[20, 31], targets={"y": y}, target_offset=1)
    path = tmp_path / "old.safetensors"
    sw.save(path)
    meta = _header(path)[0]["__metadata__"]
    _write_in_order(path, meta, [("frames", f, "F32"), ("episodes", sw.episode_offsets, "I64"),
                                 ("target.y", y, "I64")])  # fmt: skip
    header, start, _ = _header(path)
    assert (start + header["episodes"]["data_offsets"][0]) % 8 != 0  # really misaligned
    for mmap in (True, False):
        back = SlidingWindows.load(path, mmap=mmap)
        np.testing.assert_array_equal(back.episode_offsets, [0, 20, 51])
        for k, v in sw.take(np.arange(len(sw))).items():
            np.testing.assert_array_equal(back.take(np.arange(len(back)))[k], v)
    # A misaligned int64 array handed straight to the constructor is copied too.
    buf = np.zeros(3 * 8 + 1, dtype=np.uint8)
    episodes = buf[1:].view(np.int64)
    episodes[:] = [0, 20, 51]
    assert not episodes.flags.aligned
    assert SlidingWindows(f, 4, episodes=episodes).num_episodes == 2


def _save_into(sw, path, errors):
    try:
        sw.save(path)
    except Exception as e:  # pragma: no cover - the failure being tested
        errors.append(e)


def test_concurrent_saves_to_one_path_leave_one_whole_file(tmp_path):
    import threading

    a = SlidingWindows(np.zeros((100_000, 16), np.float32), window=4)
    b = SlidingWindows(np.ones((50_000, 16), np.float32), window=8)
    path = tmp_path / "w.safetensors"
    for _ in range(4):
        errors: list[Exception] = []
        threads = [threading.Thread(target=_save_into, args=(sw, path, errors))
                   for sw in (a, b, a, b)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        back = SlidingWindows.load(path, mmap=False)
        assert (back.num_frames, back.window) in ((100_000, 4), (50_000, 8))
        assert np.all(back.frames == back.frames[0, 0])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_saved_file_gets_normal_permissions(tmp_path):
    sw = SlidingWindows(frames_for(20), 3)
    assert_saves_take_normal_modes(sw.save, tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["frames"].update(shape=[2**62, 4], data_offsets=[0, 0]),
        lambda h: h["frames"].update(shape=[2**61, 2**3]),
        lambda h: h["frames"].update(shape=[True, 150]),
        lambda h: h["__metadata__"].update(window="\u00b2"),
        lambda h: h["__metadata__"].update(window="99999999999999999999999"),
        lambda h: h["__metadata__"].update(stride=str(2**63)),
        lambda h: h["__metadata__"].update(target_offset=f'{{"y": {2**70}}}'),
        lambda h: h["__metadata__"].update(target_offset=f'{{"y": {2**62 - 1}}}'),
        lambda h: h["__metadata__"].update(targets="[" * 100_000),
    ],
)
def test_tampered_files_raise_format_error(tmp_path, edit):
    import json
    import struct

    from neuropil import FormatError

    sw = SlidingWindows(frames_for(50), 5, targets={"y": np.arange(50)}, target_offset=0)
    path = tmp_path / "w.safetensors"
    sw.save(path)
    header, start, raw = _header(path)
    edit(header)
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[start:])
    for mmap in (True, False):
        with pytest.raises(FormatError):
            SlidingWindows.load(path, mmap=mmap)


def test_deeply_nested_header_raises_format_error(tmp_path):
    import struct

    from neuropil import FormatError

    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000) + b"[" * 100_000)
    with pytest.raises(FormatError, match="not JSON"):
        SlidingWindows.load(path)


def test_materialize_rejects_bad_chunk_and_target_rejects_unknown_names():
    f = frames_for(30)
    sw = SlidingWindows(f, 4, targets={"y": np.arange(30)}, target_offset=1)
    for chunk, msg in ((0, "positive integer; got 0"), (-1, "positive integer; got -1"),
                       (1.5, "must be an integer; got 1.5")):  # fmt: skip
        with pytest.raises(ArgumentError, match=f"chunk must be a {msg}|chunk {msg}"):
            sw.materialize(force=True, chunk=chunk)
    out = sw.materialize(force=True, chunk=7)
    np.testing.assert_array_equal(out["frames"], sw.take(np.arange(len(sw)))["frames"])
    with pytest.raises(ArgumentError, match=r"name must be one of the targets \['y'\]; got 'zz'"):
        sw.target("zz", 0)
    assert sw.target("y", 0) == 4
    with pytest.raises(IndexError, match="out of range"):
        sw.start(2**70)
    with pytest.raises(ArgumentError, match="window must be at most"):
        SlidingWindows(f, 2**64)
    with pytest.raises(ArgumentError, match=r"target_offset\['y'\] must be at most"):
        SlidingWindows(f, 4, targets={"y": np.arange(30)}, target_offset=2**63)


@needs_torch
def test_dataset_rejects_float_and_bool_indices():
    import torch

    sw = SlidingWindows(frames_for(30), 4)
    ds = sw.as_dataset()
    for bad in (1.9, True, np.float64(2.0)):
        with pytest.raises(DTypeError, match="indices must hold integers"):
            ds[bad]
    for bad in ([1.7, 2.2], np.array([1.0]), torch.tensor([1.5])):
        with pytest.raises(DTypeError, match="indices must hold integers"):
            ds.__getitems__(bad)
    assert torch.equal(ds[2]["frames"], torch.from_numpy(frames_for(30)[2:6]))
    got = ds.__getitems__([torch.tensor(1), np.int64(3)]).batch["frames"][:, 0, 0]
    assert got.tolist() == [10.0, 30.0]


@needs_torch
def test_a_bfloat16_target_with_numpy_frames_is_a_dtype_error():
    import torch

    frames = np.zeros((10, 3), np.float32)
    with pytest.raises(DTypeError, match=r"targets\['y'\] is a bfloat16 tensor"):
        SlidingWindows(frames, window=4, targets={"y": torch.zeros(10, dtype=torch.bfloat16)})
    sw = SlidingWindows(
        torch.from_numpy(frames), window=4, targets={"y": torch.ones(10, dtype=torch.bfloat16)}
    )
    assert sw.target("y", 0).dtype == torch.bfloat16


# ---------------------------------------------------------------- pickling


def _same_bits(a, b):
    """Equal dtype, shape and bytes (numpy or torch; NaNs compared bitwise)."""
    assert isinstance(a, np.ndarray) == isinstance(b, np.ndarray)
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    if isinstance(a, np.ndarray):
        assert a.tobytes() == b.tobytes()
    else:
        import torch

        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _assert_same_windows(sw, back):
    assert type(back) is type(sw)
    assert (back.window, back.stride, len(back)) == (sw.window, sw.stride, len(sw))
    assert back.target_offset == sw.target_offset and list(back.targets) == list(sw.targets)
    np.testing.assert_array_equal(back.episode_offsets, sw.episode_offsets)
    np.testing.assert_array_equal(back.starts, sw.starts)
    mine, theirs = sw.batches(16, seed=5, epoch=2), back.batches(16, seed=5, epoch=2)
    for a, b in zip(mine, theirs, strict=True):
        assert list(a) == list(b)
        for k in a:
            _same_bits(a[k], b[k])
    idx = [0, len(sw) - 1, 3]
    for k, v in sw.take(idx).items():
        _same_bits(v, back.take(idx)[k])


def test_pickle_and_deepcopy_round_trip_bit_identical():
    import copy
    import pickle

    rng = np.random.default_rng(11)
    f = rng.standard_normal((240, 5), dtype=np.float32)
    f[7, 2] = np.nan
    sw = SlidingWindows(
        f, 6, stride=3, episodes=[0, 100, 40, 100],
        targets={"a": np.arange(240, dtype=np.int16), "w": f[:, :2].astype(np.float16),
                 "r": rng.standard_normal(240)},
        target_offset={"a": 1, "w": None, "r": -2},
    )  # fmt: skip
    assert sw.num_episodes == 4
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        _assert_same_windows(sw, pickle.loads(pickle.dumps(sw, protocol=proto)))
    deep = copy.deepcopy(sw)
    _assert_same_windows(sw, deep)
    assert not np.shares_memory(deep.frames, sw.frames)
    _assert_same_windows(sw, copy.copy(sw))
    # One episode, no targets; a user's own memmap is pickled by value.
    _assert_same_windows(SlidingWindows(f, 4), pickle.loads(pickle.dumps(SlidingWindows(f, 4))))
    # Unpickling goes through the constructor (validated again), never around it.
    rebuild, args = sw.__reduce__()
    assert rebuild is SlidingWindows
    with pytest.raises(ArgumentError, match="window"):
        rebuild(args[0], 101, *args[2:])
    # Iterators (prefetch thread, buffers) are not pickled.
    with pytest.raises(TypeError, match="cannot pickle a WindowBatches"):
        pickle.dumps(sw.batches(8))


@needs_torch
def test_pickle_round_trip_of_torch_frames_and_dataset():
    import copy
    import pickle

    import torch

    f = torch.from_numpy(frames_for(90, 4))
    sw = SlidingWindows(f, 5, episodes=[30, 60],
                        targets={"b": torch.arange(90).to(torch.bfloat16), "y": np.arange(90)},
                        target_offset={"b": 0, "y": 1})  # fmt: skip
    back = pickle.loads(pickle.dumps(sw))
    assert back.torch and back.device == sw.device
    _assert_same_windows(sw, back)
    ds = copy.deepcopy(sw.as_dataset())
    assert type(ds).__name__ == "WindowDataset" and len(ds) == len(sw)
    for k, v in sw.as_dataset().__getitems__([4, 0, 9]).batch.items():
        _same_bits(v, ds.__getitems__([4, 0, 9]).batch[k])


@needs_torch
def test_torch_frames_moved_to_shared_memory_are_read_where_they_are_now():
    # Pickling a CPU tensor for a spawn / forkserver DataLoader worker (torch's
    # ForkingPickler reduction) moves its storage to shared memory in place and
    # frees the old buffer; windows must follow the tensor, not read freed memory.
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch
    import torch.multiprocessing  # (registers torch's reductions)

    f = torch.arange(400 * 8, dtype=torch.float32).reshape(400, 8)
    y = torch.arange(400)
    sw = SlidingWindows(f, 4, targets={"y": y}, target_offset=1)
    sw.take([0, 7])  # the first gather, before the move
    ptr = f.data_ptr()
    ForkingPickler(io.BytesIO()).dump(sw.as_dataset())
    assert f.is_shared() and f.data_ptr() != ptr  # (the move this test is about)
    f.add_(0.5)  # written where the tensor lives now
    y.share_memory_()
    y.mul_(3)
    starts = [0, 7, 123, 395]
    got = sw.take(starts)
    for i, s in enumerate(starts):
        assert torch.equal(got["frames"][i], f[s : s + 4])
        assert int(got["y"][i]) == 3 * (s + 4)
    batch = next(iter(sw.batches(16, shuffle=False)))
    assert torch.equal(batch["frames"][0], f[0:4])


def test_mmap_loaded_windows_pickle_as_a_file_reference(tmp_path):
    import copy
    import os
    import pickle

    from neuropil import FormatError

    f = np.random.default_rng(4).standard_normal((20_000, 16), dtype=np.float32)
    sw = SlidingWindows(f, 8, stride=2, episodes=[5_000, 15_000],
                        targets={"y": np.arange(20_000)}, target_offset=1)  # fmt: skip
    path = tmp_path / "w.safetensors"
    sw.save(path)
    mapped = SlidingWindows.load(path, mmap=True)
    blob = pickle.dumps(mapped)
    assert len(blob) < 1_000 < f.nbytes // 1_000  # a reference, not 1.3 MB of frames
    for back in (pickle.loads(blob), copy.deepcopy(mapped)):
        assert isinstance(back.frames, np.memmap) and not back.frames.flags.writeable
        _assert_same_windows(sw, back)
        assert len(pickle.dumps(back)) < 1_000  # and it pickles as a reference again
    # Loaded into memory: pickled by value.
    assert len(pickle.dumps(SlidingWindows.load(path, mmap=False))) > f.nbytes
    # Arrays replaced after loading: no longer the file's, pickled by value.
    swapped = SlidingWindows.load(path)
    swapped.frames = np.array(swapped.frames)
    assert len(pickle.dumps(swapped)) > f.nbytes

    # The file replaced by another save (same shapes, other data): refused.
    SlidingWindows(f + 1, 8, stride=2, episodes=[5_000, 15_000],
                   targets={"y": np.arange(20_000)}, target_offset=1).save(path)  # fmt: skip
    with pytest.raises(FormatError, match="changed since this SlidingWindows was loaded"):
        pickle.loads(blob)
    # Modified in place (the same inode rewritten with a valid file of another
    # size; bytes appended would make a file load refuses): refused.
    blob = pickle.dumps(SlidingWindows.load(path))
    other = tmp_path / "other.safetensors"
    SlidingWindows(f[:10_000], 8, stride=2, targets={"y": np.arange(10_000)},
                   target_offset=1).save(other)  # fmt: skip
    inode = os.stat(path).st_ino
    with open(path, "r+b") as fh:
        fh.write(other.read_bytes())
        fh.truncate()
    assert os.stat(path).st_ino == inode
    with pytest.raises(FormatError, match=r"changed since .*size"):
        pickle.loads(blob)
    # Gone: FileNotFoundError (an OSError) naming the file.
    blob = pickle.dumps(SlidingWindows.load(path))
    os.remove(path)
    with pytest.raises(FileNotFoundError, match="memory-mapped from is gone"):
        pickle.loads(blob)


@needs_torch
def test_dataloader_spawn_workers_yield_the_same_batches(tmp_path):
    import torch
    from torch.utils.data import DataLoader

    f = np.random.default_rng(8).standard_normal((600, 8), dtype=np.float32)
    sw = SlidingWindows(f, 5, stride=2, episodes=[200, 400],
                        targets={"y": np.arange(600), "v": f[:, :3].copy()},
                        target_offset={"y": 1, "v": None})  # fmt: skip
    path = tmp_path / "w.safetensors"
    sw.save(path)
    order = np.random.default_rng(0).permutation(len(sw)).tolist()
    ds0 = sw.as_dataset()
    # The workers get the mmap-loaded file as a reference and map it themselves.
    ds2 = SlidingWindows.load(path, mmap=True).as_dataset()
    want = list(DataLoader(ds0, batch_size=32, sampler=order, collate_fn=ds0.collate))
    got = list(DataLoader(ds2, batch_size=32, sampler=order, collate_fn=ds2.collate,
                          num_workers=2, multiprocessing_context="spawn", timeout=120))  # fmt: skip
    assert len(got) == len(want) == -(-len(sw) // 32)
    for a, b in zip(want, got, strict=True):
        assert list(a) == list(b) == ["frames", "y", "v"]
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])


@needs_torch
def test_dataloader_fork_workers_after_a_parallel_gather_in_the_parent():
    # The parent's gather of more than 1 MiB started the thread pool; a forked
    # worker has none of its threads, and its first parallel gather waited for
    # them forever (the DataLoader timed out).
    import torch
    from torch.utils.data import DataLoader

    f = np.random.default_rng(9).standard_normal((4000, 256), dtype=np.float32)
    sw = SlidingWindows(f, 30)
    ds = sw.as_dataset()
    want = sw.take(np.arange(64))["frames"]  # 64 x 30 x 256 float32 = 1.9 MiB: parallel
    assert want.nbytes > 1 << 20
    loader = DataLoader(ds, batch_size=64, collate_fn=ds.collate, num_workers=2,
                        multiprocessing_context="fork", timeout=30)  # fmt: skip
    got = [b["frames"] for _, b in zip(range(4), loader, strict=False)]
    assert torch.equal(got[0], torch.from_numpy(want))
    for k, b in enumerate(got):
        assert torch.equal(b, torch.from_numpy(sw.take(np.arange(64 * k, 64 * k + 64))["frames"]))


def test_slices_give_the_windows_of_a_materialised_array():
    # A slice raised ArgumentError ("i must be an integer"), where numpy users
    # slice a sequence of windows as they would slice the (M, W, D) array.
    f = frames_for(40)
    sw = SlidingWindows(f.astype(np.float16), 4, stride=3, episodes=[17, 23],
                        targets={"y": np.arange(40)}, target_offset=1)  # fmt: skip
    every = np.stack([sw[i] for i in range(len(sw))])
    slices = (slice(None), slice(1, 3), slice(None, None, -1), slice(-2, None), slice(5, 1),
              slice(None, None, 3), slice(-100, 100), slice(np.int64(2), None))  # fmt: skip
    for sl in slices:
        got = sw[sl]
        assert got.dtype == np.float16 and got.shape[1:] == (4, 3)
        np.testing.assert_array_equal(got, every[sl])
    assert sw[len(sw) :].shape == (0, 4, 3)


@needs_torch
def test_slices_of_torch_frames_keep_the_library_and_dtype():
    import torch

    t = torch.from_numpy(frames_for(20)).to(torch.bfloat16)
    sw = SlidingWindows(t, 5, stride=2)
    got = sw[1:6:2]
    assert isinstance(got, torch.Tensor) and got.dtype == torch.bfloat16
    assert torch.equal(got, torch.stack([sw[1], sw[3], sw[5]]))


@pytest.mark.parametrize("mmap", [True, False])
def test_load_refuses_bytes_after_the_last_tensor(tmp_path, mmap):
    # Were read as if absent (safetensors and every other loader refuse them).
    from neuropil import FormatError

    f = np.random.default_rng(9).standard_normal((50, 3)).astype(np.float32)
    path = tmp_path / "w.safetensors"
    SlidingWindows(f, 4, targets={"y": np.arange(50)}).save(path)
    good = path.read_bytes()
    for extra in (b"\0", b"x" * 4096):
        path.write_bytes(good + extra)
        with pytest.raises(FormatError) as e:
            SlidingWindows.load(path, mmap=mmap)
        msg = str(e.value)
        assert msg.startswith(f"{path}: {len(extra)} trailing bytes after the last tensor")
        assert f"a file of {len(good)} bytes; found {len(good) + len(extra)} bytes" in msg
    path.write_bytes(good)
    assert np.array_equal(np.asarray(SlidingWindows.load(path, mmap=mmap).frames), f)


# ---------------------------------------------------------------- mutation-testing round


def test_epoch_order_takes_every_seed_of_its_range_and_matches_the_batches():
    # seed is documented as [0, 2**64): both ends are valid, and the order is the
    # one batches() visits (one episode, stride 1: window i starts at frame i).
    sw = SlidingWindows(frames_for(60), 4)
    np.testing.assert_array_equal(sw.epoch_order(), sw.epoch_order(seed=0, epoch=0))
    for seed in (0, 2**64 - 1):
        order = sw.epoch_order(seed=seed, epoch=1)
        assert sorted(order.tolist()) == list(range(len(sw)))
        visited = [b["frames"][:, 0, 0] / 10 for b in sw.batches(16, seed=seed, epoch=1)]
        np.testing.assert_array_equal(np.concatenate(visited), order)
    assert not np.array_equal(sw.epoch_order(seed=0), sw.epoch_order(seed=2**64 - 1))
    for seed in (-1, 2**64):
        with pytest.raises(ArgumentError, match="seed must be"):
            sw.epoch_order(seed=seed)
        with pytest.raises(ArgumentError, match="seed must be"):
            sw.batches(4, seed=seed)


def test_repr_names_the_windows_and_their_layout():
    sw = SlidingWindows(frames_for(50), 10, stride=2, episodes=[20, 30],
                        targets={"y": np.arange(50)}, target_offset=0)  # fmt: skip
    assert repr(sw) == (
        "SlidingWindows(17 windows of 10 x 3 float32 (numpy), stride 2, 2 episodes, targets ['y'])"
    )


@needs_torch
@pytest.mark.parametrize(
    "dtype,dim",
    [("float32", 3), ("int8", 3), ("float16", 5), ("float64", 1), ("int16", 4)],
)
def test_gpu_gather_code_path_takes_rows_of_any_width(dtype, dim):
    # The CUDA gather views rows as the widest integer type dividing them (8, 4, 2
    # or 1 bytes): rows of 12, 3, 10, 8 and 8 bytes must all give the CPU's windows.
    import torch

    from neuropil.windows import _cuda_gather

    f = torch.from_numpy(frames_for(120, dim).astype(dtype))
    y = torch.arange(120, dtype=getattr(torch, dtype)).reshape(120, 1).expand(120, dim)
    sw = SlidingWindows(f, 6, stride=3, episodes=[50, 70],
                        targets={"y": y.contiguous(), "w": y.contiguous()},
                        target_offset={"y": 1, "w": None})  # fmt: skip
    idx = np.array([0, 7, len(sw) - 1, 3])
    want = SlidingWindows(f.numpy(), 6, stride=3, episodes=[50, 70],
                          targets={"y": y.numpy(), "w": y.numpy()},
                          target_offset={"y": 1, "w": None}).take(idx)  # fmt: skip
    starts = torch.from_numpy(sw._layout.starts(idx))
    for a in sw._arrays:
        out = torch.empty((len(idx), *a.item_shape()), dtype=a.dtype)
        _cuda_gather(a, starts, out)
        np.testing.assert_array_equal(out.numpy(), want[a.name], err_msg=a.name)


def test_save_load_round_trips_big_endian_arrays_by_value(tmp_path):
    # Big-endian frames are valid windows; safetensors is little-endian, so they
    # are written converted: the same values come back.
    f = frames_for(40, 3)
    y = np.arange(40, dtype=np.int64) * 3
    sw = SlidingWindows(f.astype(">f4"), 5, targets={"y": y.astype(">i8")}, target_offset=1)
    path = tmp_path / "be.safetensors"
    sw.save(path)
    for mmap in (True, False):
        back = SlidingWindows.load(path, mmap=mmap)
        got = back.take(np.arange(len(back)))
        np.testing.assert_array_equal(got["frames"], sw.take(np.arange(len(sw)))["frames"])
        np.testing.assert_array_equal(got["y"], y[sw.starts + 5])


@needs_torch
def test_save_load_round_trips_bfloat16_frames_and_targets(tmp_path):
    # A bfloat16 target needs torch frames (numpy has no bfloat16): load refused
    # the file save wrote for float32 torch frames with one ("inconsistent content").
    import pickle

    import torch

    f = torch.from_numpy(frames_for(90, 4))
    targets = {"b": torch.arange(90).to(torch.bfloat16), "y": np.arange(90)}
    offsets = {"b": 0, "y": 1}
    path = tmp_path / "bf16.safetensors"
    for frames in (f, f.to(torch.bfloat16)):
        sw = SlidingWindows(frames, 5, episodes=[30, 60], targets=targets, target_offset=offsets)
        sw.save(path)
        for mmap in (True, False):
            back = SlidingWindows.load(path, mmap=mmap)
            assert back.torch and back.targets["b"].dtype == torch.bfloat16
            assert back.frames.dtype == frames.dtype
            _assert_same_windows(sw, back)
        _assert_same_windows(sw, pickle.loads(pickle.dumps(SlidingWindows.load(path))))


@needs_torch
def test_mmap_load_maps_bfloat16_arrays_instead_of_copying_them(tmp_path):
    # load(mmap=True) copied every bfloat16 array whole (np.array of the map);
    # now they are mapped copy-on-write: nothing of their size is allocated,
    # and a write to the loaded tensor stays out of the file.
    import tracemalloc

    import torch

    n = 1 << 20  # 2 MiB of bfloat16 frames (4 values a row), as much target
    frames = torch.arange(4 * n, dtype=torch.float32).reshape(n, 4).to(torch.bfloat16)
    target = torch.arange(n, dtype=torch.float32).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    SlidingWindows(frames, 8, targets={"b": target}, target_offset=0).save(path)
    saved = path.read_bytes()
    tracemalloc.start()
    try:
        back = SlidingWindows.load(path, mmap=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (1 << 20), peak  # (a copy of either array: 2 MiB or more)
    assert torch.equal(back.frames, frames) and torch.equal(back.targets["b"], target)
    back.targets["b"][0] = 5.0
    back.frames[0, 0] = 5.0
    assert path.read_bytes() == saved
    assert torch.equal(SlidingWindows.load(path, mmap=True).targets["b"], target)


@needs_torch
def test_a_gathered_batch_is_a_sequence_of_its_samples():
    # DataLoader hands collate_fn what __getitems__ returns: a WindowBatch that
    # reads as the sequence of its samples (index, slice, iterate), so torch's
    # default_collate stacks it back into the same batch.
    import torch

    f = frames_for(60, 4)
    sw = SlidingWindows(f, 5, targets={"y": np.arange(60)}, target_offset=0)
    ds = sw.as_dataset()
    wb = ds.__getitems__([4, 0, 9, 2])
    assert len(wb) == 4 and ds.collate(wb) is wb.batch
    assert torch.equal(wb[2]["frames"], torch.from_numpy(f[9:14])) and int(wb[2]["y"]) == 13
    part = wb[1:3]
    assert type(part) is type(wb) and len(part) == 2
    for k in ("frames", "y"):
        assert torch.equal(part.batch[k], wb.batch[k][1:3])
        assert torch.equal(part[1][k], wb[2][k])
    assert [int(s["y"]) for s in wb] == [8, 4, 13, 6]
    stacked = ds.collate(list(wb))
    assert all(torch.equal(stacked[k], wb.batch[k]) for k in wb.batch)

"""Objects shared by Python threads: a web server's thread pool, a DataLoader
with threads, a ``ThreadPoolExecutor``.

Reads from several threads at once must succeed and give the serial result;
a write beside them must give each read the state before or after it (never
a mix, an exception from the binding layer or a crash); the process-wide
thread pool must stand resizing under load. Every wait has a timeout, so a
deadlock fails the test instead of hanging the run.
"""

from __future__ import annotations

import copy
import pickle
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import neuropil
from conftest import HAS_TORCH
from neuropil.flyhash import BinaryIndex, FlyHash
from neuropil.neurons import InputSparseFFN, NeuronCache, SparseFFN
from neuropil.quant import quantize
from neuropil.range import RangeIndex
from neuropil.windows import SlidingWindows

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
TIMEOUT = 60  # seconds any one thread may take before the test fails as hung


def together(fns: Sequence[Callable[[], Any]], timeout: float = TIMEOUT) -> list[Any]:
    """Runs each of ``fns`` in its own thread, started together; returns their
    results, or raises the first exception (a hang fails on the timeout)."""
    start = threading.Barrier(len(fns))

    def go(f: Callable[[], Any]) -> Any:
        start.wait(timeout)
        return f()

    with ThreadPoolExecutor(len(fns)) as ex:
        futures = [ex.submit(go, f) for f in fns]
        return [f.result(timeout=timeout) for f in futures]


def rounds(n: int, threads: int, call: Callable[[int], Any]) -> list[list[Any]]:
    """``n`` rounds of ``call(i)`` in ``threads`` threads that meet at a barrier
    before each round (so the calls overlap); the results per thread."""
    meet = threading.Barrier(threads)

    def worker() -> list[Any]:
        out = []
        for i in range(n):
            meet.wait(TIMEOUT)
            out.append(call(i))
        return out

    return together([worker] * threads)


def same(a: Any, b: Any) -> bool:
    """Exact equality of arrays, tensors and tuples/lists/dicts of them."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if type(a).__module__.startswith("torch"):
        import torch

        return bool(torch.equal(a, b))
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def writer_beside_readers(
    write: Callable[[], None], read: Callable[[int], bool], cycles: int, readers: int = 2
) -> list[int]:
    """``write()`` ``cycles`` times in one thread while ``readers`` threads call
    ``read(i)`` (True: an answer of a state the object was in) until the
    writer is done; returns each reader's count of other answers."""
    done = threading.Event()

    def writer() -> None:
        try:
            for _ in range(cycles):
                write()
        finally:
            done.set()

    def reader() -> int:
        bad, i = 0, 0
        while not done.is_set():
            bad += not read(i)
            i += 1
        return bad

    return together([writer] + [reader] * readers)[1:]


@pytest.fixture
def fast_switching():
    """Switches between Python threads every microsecond (default 5 ms),
    so a write made of several Python steps is seen half-done if it can be."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _ffn_weights(h: int = 1536, d: int = 576, seed: int = 0):
    rng = np.random.default_rng(seed)
    # float32 scales: float64 ones make float64 weights on numpy 2 (NEP 50)
    g, u = rng.standard_normal((2, h, d), dtype=np.float32) / np.float32(np.sqrt(d))
    dn = rng.standard_normal((d, h), dtype=np.float32) / np.float32(np.sqrt(h))
    x = rng.standard_normal((8, d), dtype=np.float32)
    return g, u, dn, x


# ------------------------------------------------------------------ concurrent reads


def _read_cases() -> dict[str, Callable[[], list[Callable[[], Any]]]]:
    """Per class: a maker of the read-only calls to run from several threads."""

    def binary_index():
        rng = np.random.default_rng(1)
        codes = rng.integers(0, 256, (50_000, 64), dtype=np.uint8)
        ix = BinaryIndex(512)
        ix.add(codes)
        q = codes[:16]
        return [
            lambda: ix.search(q, 5),
            lambda: ix.search(q, 5, metric="jaccard"),
            lambda: ix.range_search(q[:4], 200),
            lambda: len(ix),
        ]

    def flyhash():
        fh = FlyHash(256, 16.0, 0.05, seed=3)
        x = np.random.default_rng(2).standard_normal((300, 256), dtype=np.float32)
        return [
            lambda: fh.hash(x),
            lambda: fh.encode(x[:50]),
            lambda: fh.encode_indices(x),
            lambda: fh.hash(x[0]),
        ]

    def range_index():
        keys = np.random.default_rng(4).standard_normal((40_000, 64), dtype=np.float32)
        ix = RangeIndex(keys)
        q = keys[:8] + 0.1
        return [
            lambda: ix.search(q, 30.0)[1:],
            lambda: ix.topk(q, 10),
            lambda: ix.search(q[:2], np.array([25.0, 35.0], np.float32))[1:],
        ]

    def quantized():
        g, u, _, x = _ffn_weights()
        q = quantize(u, bits=4, group_size=32)
        q8 = quantize(g, bits=8, group_size=64, scheme="sym")
        return [lambda: q.matvec(x[0]), lambda: q.matvec(x), lambda: q8.matvec(x[:3])]

    def sparse_ffn():
        g, u, dn, x = _ffn_weights()
        ffn = SparseFFN(g, u, dn, bits=8, hot_capacity=200)
        ffn.calibrate(x, 0.8)
        return [lambda: ffn(x[0]), lambda: ffn(x), lambda: ffn.activations(x[:2])]

    def input_sparse_ffn():
        g, u, dn, x = _ffn_weights()
        ffn = InputSparseFFN(g, u, dn, bits=4)
        ffn.calibrate(x, 0.6)
        dense = InputSparseFFN(g, u, dn, dtype="float16")
        return [lambda: ffn(x[0]), lambda: ffn(x), lambda: dense(x[1]), lambda: ffn.hidden(x)]

    def neuron_cache():
        cache = NeuronCache(50_000, capacity=2000)
        cache.record(np.random.default_rng(5).random((64, 50_000)) < 0.05)
        cache.reclassify()
        return [
            cache.stats,
            cache.hot_neurons,
            cache.cold_neurons,
            cache.activation_frequency,
            lambda: cache.activation_frequency(7),
        ]

    def sliding_windows():
        rng = np.random.default_rng(6)
        frames = rng.standard_normal((200_000, 32), dtype=np.float32)
        sw = SlidingWindows(frames, 16, targets={"y": np.arange(200_000)}, target_offset=1)
        idx = rng.integers(0, len(sw), 256)
        return [lambda: sw.take(idx), lambda: sw[1000:1300], lambda: sw[77], sw.epoch_order]

    return {
        "BinaryIndex": binary_index,
        "FlyHash": flyhash,
        "RangeIndex": range_index,
        "QuantizedWeights": quantized,
        "SparseFFN": sparse_ffn,
        "InputSparseFFN": input_sparse_ffn,
        "NeuronCache": neuron_cache,
        "SlidingWindows": sliding_windows,
    }


@pytest.mark.parametrize("name", list(_read_cases()))
def test_reads_from_several_threads_give_the_serial_results(name):
    """Four threads read one object at once (a barrier before each round, each
    thread a different mix of calls): every call succeeds (no "Already
    borrowed") and returns exactly what it returns alone."""
    calls = _read_cases()[name]()
    want = [c() for c in calls]
    orders = np.random.default_rng(0).integers(0, len(calls), (4, 40))

    def worker(order: np.ndarray) -> Callable[[], list[int]]:
        return lambda: [int(k) for k in order if not same(calls[k](), want[k])]

    bad = together([worker(o) for o in orders])
    assert bad == [[], [], [], []], f"{name}: calls with results other than alone: {bad}"


@needs_torch
def test_membrane_reads_from_several_threads_give_the_serial_results():
    import torch

    from neuropil.membrane import MembraneBank

    bank = MembraneBank(64, 16, 16, batch=2, K=64)
    bank.store(torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0)), range(8))
    want = bank.read(range(8))
    results = rounds(30, 4, lambda i: bank.read(range(8)))
    assert all(same(y, want) for r in results for y in r)
    assert int(bank.reads[:, :8].min()) == 1 + 4 * 30  # no read lost


# ------------------------------------------------------------------ a writer among readers


class SlowFloat(float):
    """A float whose conversion takes a millisecond (the GIL released): a
    setter that converts its arguments one by one between its writes shows
    its half-done state to the other threads meanwhile."""

    def __float__(self) -> float:
        time.sleep(1e-3)
        return float(self.real)


def test_input_sparse_thresholds_change_at_once():
    """``set_thresholds`` beside calls: each call uses the old pair or the new
    one (it used to set t_in and t_hidden one after the other, so a call in
    between ran with the new t_in and the old t_hidden)."""
    g, u, dn, x = _ffn_weights()
    ffn = InputSparseFFN(g, u, dn, bits=8)
    a, b = (0.9, 0.01), (0.1, 0.3)
    ffn.set_thresholds(*a)
    ya = [ffn(x[0]), ffn(x[:2])]
    ffn.set_thresholds(*b)
    yb = [ffn(x[0]), ffn(x[:2])]

    def write() -> None:
        ffn.set_thresholds(a[0], SlowFloat(a[1]))
        ffn.set_thresholds(b[0], SlowFloat(b[1]))

    def read(i: int) -> bool:
        y = ffn(x[:2]) if i % 2 else ffn(x[0])  # (the 1-D call has its own path)
        return same(y, ya[i % 2]) or same(y, yb[i % 2])

    torn = writer_beside_readers(write, read, 20)
    assert torn == [0, 0], f"{torn} calls ran with one new and one old threshold"
    assert (ffn.t_in, ffn.t_hidden) in (a, b)


def test_sparse_ffn_mode_changes_at_once(fast_switching):
    """``calibrate`` beside calls: each call uses the old mode (top-k) or the
    new threshold. It used to clear top_k, then compute the quantile, then set
    the threshold: a call in between ran with the previous threshold, a mode
    the object was never set to."""
    g, u, dn, x = _ffn_weights(h=1024, d=256)
    ffn = SparseFFN(g, u, dn, dtype="float16")
    t_new = ffn.calibrate(x, 0.7)
    want_new = ffn(x[0])
    ffn.top_k = 64
    want_top = ffn(x[0])

    def write() -> None:
        ffn.top_k = 64  # top-k mode; then a threshold no call may ever use
        ffn.threshold = t_new * 3
        assert ffn.calibrate(x, 0.7) == t_new

    def read(i: int) -> bool:
        y = ffn(x[0])
        return same(y, want_new) or same(y, want_top)

    bad = writer_beside_readers(write, read, 150)
    assert bad == [0, 0], f"{bad} calls used a mode the object was never in"


def test_sparse_ffn_set_hot_and_recalibrate_beside_calls():
    """The hot tier is a copy of some neurons' weights: replacing it under
    calls never changes a result."""
    g, u, dn, x = _ffn_weights(h=2048, d=256)
    ffn = SparseFFN(g, u, dn, bits=4, hot_capacity=300)
    ffn.calibrate(x, 0.5)
    want = [ffn(x[0]), ffn(x)]
    rng = np.random.default_rng(0)

    def write() -> None:
        ffn.set_hot(rng.choice(2048, 300, replace=False))
        ffn.calibrate(x, 0.5)

    def read(i: int) -> bool:
        return same(ffn(x[0]), want[0]) if i % 2 else same(ffn(x), want[1])

    assert writer_beside_readers(write, read, 40) == [0, 0]
    assert ffn.cache is not None and len(ffn.hot_neurons()) == 300


def test_binary_index_writes_beside_searches_and_saves(tmp_path):
    """add / remove / save / pickle beside searches: no call fails, every
    search sees the codes it must (chunk 0 is never removed), and every saved
    file or pickle is one of the states the index went through."""
    rng = np.random.default_rng(7)
    chunks = [rng.integers(0, 256, (4000, 128), dtype=np.uint8) for _ in range(8)]
    ix = BinaryIndex(1024)
    ix.add(chunks[0])
    q = chunks[0][:20]
    sizes = {4000}

    def writer() -> None:
        n = 4000
        for c in chunks[1:]:
            ix.add(c)
            n += 4000
            sizes.add(n)
            n -= ix.remove(np.arange(n - 100, n))  # ids of the chunk just added
            sizes.add(n)

    def searcher() -> None:
        for _ in range(60):
            d, ids = ix.search(q, 3)
            assert (d[:, 0] == 0).all() and (ids[:, 0] == np.arange(20)).all()
            lims, _, rids = ix.range_search(q[:2], 0)
            assert list(rids[lims[0] : lims[1]]) == [0]

    states: list[Any] = []

    def saver() -> None:
        for i in range(10):
            path = tmp_path / f"ix{i % 3}.npix"
            ix.save(path)
            states.append(BinaryIndex.load(path).contents())
            states.append(pickle.loads(pickle.dumps(ix)).contents())

    together([writer, searcher, searcher, saver])
    for codes, ids in states:
        assert len(codes) == len(ids) in sizes and len(np.unique(ids)) == len(ids)
        assert (codes[:4000] == chunks[0]).all()
    assert len(ix) == 8 * 4000 - 7 * 100


def test_neuron_cache_writes_beside_queries(tmp_path):
    """record / reclassify / clear / set_hot / a load into the object beside
    queries: every call succeeds and each answer is of one state."""
    n = 100_000
    cache = NeuronCache(n, capacity=1000)
    mask = np.random.default_rng(8).random((32, n)) < 0.05
    cache.record(mask)
    saved = pickle.dumps(cache)

    def writer() -> None:
        for i in range(15):
            cache.record(mask)
            cache.reclassify()
            if i % 5 == 4:
                cache.set_hot(np.arange(i, i + 500))
            if i % 7 == 6:
                cache.clear()
        cache.__setstate__(pickle.loads(saved).__getstate__())  # a load into this object

    def reader() -> None:
        for _ in range(150):
            hot, cold = cache.hot_neurons(), cache.cold_neurons()
            assert len(hot) <= 1000 and (np.diff(hot.astype(np.int64)) > 0).all()
            s = cache.stats()
            assert s["num_hot"] + s["num_cold"] == n
            assert cache.activation_frequency().shape == (n,) and len(cold) >= n - 1000

    def saver() -> None:
        for i in range(8):
            cache.save(tmp_path / f"c{i % 2}.safetensors")
            back = NeuronCache.load(tmp_path / f"c{i % 2}.safetensors")
            assert back.stats()["num_hot"] + back.stats()["num_cold"] == n

    together([writer, reader, reader, saver])
    assert cache.stats()["events"] == int(mask.sum())


def test_range_index_writes_beside_searches():
    """add / rebuild / copy beside search and topk: each search answers over
    the keys present (a key matches itself above its threshold)."""
    rng = np.random.default_rng(9)
    keys = rng.standard_normal((60_000, 32), dtype=np.float32)
    ix = RangeIndex(keys[:20_000], rebuild_min=1000)
    q = keys[:6]
    t = (q * q).sum(1) - 1e-3

    def writer() -> None:
        for i in range(20_000, 60_000, 2000):
            ix.add(keys[i : i + 2000])
            if i % 10_000 == 0:
                ix.rebuild()

    def searcher() -> None:
        for _ in range(40):
            lims, ids, _ = ix.search(q, t)
            for r in range(6):
                hits = ids[lims[r] : lims[r + 1]]
                assert r in hits and hits.max() < 60_000 and (np.diff(hits) > 0).all()
            top, _ = ix.topk(q, 3)
            assert top.shape == (6, 3)
            assert len(ix._copy()) >= 20_000

    together([writer, searcher, searcher])
    assert len(ix) == 60_000


class _PausedCore:
    """A RangeIndex's core whose ``add`` (before and after appending) or
    ``copy`` (before copying) waits at ``points`` (name -> (reached, resume)
    events) while another thread acts there; everything else as the core."""

    def __init__(self, core: Any, points: dict[str, tuple[threading.Event, threading.Event]]):
        self._core, self._points = core, points

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)

    def _at(self, point: str) -> None:
        if point in self._points:
            reached, resume = self._points[point]
            reached.set()
            assert resume.wait(TIMEOUT)

    def add(self, keys: Any) -> None:
        self._at("add")
        self._core.add(keys)
        self._at("added")

    def copy(self) -> Any:
        self._at("copy")
        return self._core.copy()


def _paused_at(ix: RangeIndex, *points: str) -> dict[str, tuple[threading.Event, threading.Event]]:
    events = {p: (threading.Event(), threading.Event()) for p in points}
    ix._native = _PausedCore(ix._native, events)
    return events


def _near_overflow(d: int = 8) -> tuple[RangeIndex, np.ndarray, np.ndarray]:
    """An index of keys of norm ~3, queries of norm ~3e19 (their scores
    ~1e20, fine) and keys of norm ~3e19 (scores ~8e38: beyond float32)."""
    keys = np.random.default_rng(11).standard_normal((500, d), dtype=np.float32)
    return RangeIndex(keys, method="flat"), np.full((2, d), 1e19, np.float32), keys * 0 + 1e19


def test_range_index_search_beside_add_checks_the_keys_it_sees_for_overflow():
    """The add raised the key-norm bound after the core appended the keys: a
    search in between saw keys near 1e19 with the old bound, skipped the
    float32 overflow check and returned Inf scores. The bound now rises
    first; a search before the append, with the raised bound and the old
    keys, takes the exact check of the keys it searched and answers."""
    ix, q, big = _near_overflow()
    want = ix.search(q, 0.0)
    at = _paused_at(ix, "add", "added")

    _assert_searches_around_add_see_overflow(ix, q, big[:3], want, at)


def _assert_searches_around_add_see_overflow(
    ix: Any, q: Any, keys: Any, want: Any, at: Any
) -> None:
    """Adds ``keys`` (norm ~3e19) to ``ix`` while a search runs at each of the
    add's pauses ``at["add"]`` (bound raised, keys not yet in: the old answer)
    and ``at["added"]`` (keys in: the overflow error)."""

    def searcher() -> tuple[Any, Any]:
        try:
            assert at["add"][0].wait(TIMEOUT)
            before = ix.search(q, 0.0)  # (the bound raised, the keys not yet in)
        finally:
            at["add"][1].set()
        try:
            assert at["added"][0].wait(TIMEOUT)
            try:
                after = ix.search(q, 0.0)
            except neuropil.ArgumentError as e:
                after = e
        finally:
            at["added"][1].set()
        return before, after

    before, after = together([lambda: ix.add(keys), searcher])[1]
    assert same(before, want)
    assert isinstance(after, neuropil.ArgumentError), f"no overflow error; got {after}"
    assert "max |k| = 2.828e+19" in str(after)


def test_range_index_copy_beside_add_covers_the_keys_it_copies():
    """``_copy`` took the key-norm bound before cloning the core: keys added
    in between were copied without their bound, and the copy's searches
    skipped the overflow check for them."""
    ix, q, big = _near_overflow()
    at = _paused_at(ix, "copy")

    def adder() -> None:
        try:
            assert at["copy"][0].wait(TIMEOUT)
            ix.add(big[:3])  # (the whole add, while the copy waits to clone)
        finally:
            at["copy"][1].set()

    copied = together([ix._copy, adder])[0]
    assert len(copied) == 503
    with pytest.raises(neuropil.ArgumentError, match="within float32"):
        copied.search(q, 0.0)
    assert copied._lock is not ix._lock  # (adds to one don't wait for the other's)


def _torch_range(keys: Any) -> RangeIndex:
    """A RangeIndex on its torch path (the one CUDA keys take), here on CPU tensors."""
    from neuropil.range import _TorchRange

    ix = RangeIndex(keys.numpy(), method="flat")
    ix._native, ix._torch = None, _TorchRange(keys)
    return ix


@needs_torch
def test_torch_range_adds_from_several_threads_keep_every_key(fast_switching):
    """The torch path had no lock: adds at once wrote the same rows (keys
    lost, others counted twice) or raised on a buffer another add had grown.
    Four threads each add 100 chunks: each chunk is there once, its rows
    together and in order, each thread's chunks in its order."""
    import torch

    m, d, threads, n = 5, 8, 4, 100

    def chunk(t: int, r: int) -> Any:
        c = np.zeros((m, d), np.float32)
        c[:, 0], c[:, 1], c[:, 2] = t, r, np.arange(m)
        return torch.from_numpy(c)

    ix = _torch_range(chunk(-1, 0))
    meet = threading.Barrier(threads)

    def adder(t: int) -> Callable[[], None]:
        def run() -> None:
            try:
                for r in range(n):
                    meet.wait(TIMEOUT)
                    ix.add(chunk(t, r))
            except BaseException:
                meet.abort()  # (the others stop at once instead of timing out)
                raise

        return run

    together([adder(t) for t in range(threads)])
    blocks = ix.keys().numpy().reshape(-1, m, d)
    assert len(ix) == m * (1 + threads * n) == m * blocks.shape[0]
    assert (blocks[:, :, 2] == np.arange(m)).all() and (blocks[:, :, :2] == blocks[:, :1, :2]).all()
    tags = [tuple(map(int, b)) for b in blocks[:, 0, :2]]
    assert sorted(tags) == sorted([(-1, 0)] + [(t, r) for t in range(threads) for r in range(n)])
    for t in range(threads):
        assert [r for tt, r in tags if tt == t] == list(range(n))


def _paused_torch_range(ix: RangeIndex) -> Callable[..., dict[str, Any]]:
    """Lets ``ix``'s torch path wait at points, each once, while another
    thread acts: ``"count"``, a search's read of the key count, after its
    read of the key buffer (3a5a72a read ``keys``, then ``n``; the snapshot
    ``_snap`` carries both, so it waits after that one read), and
    ``"publish"``, an add about to publish a grown buffer, built and filled
    (``_snap``; 3a5a72a: ``keys``). Returns ``arm(point=thread name, ...)``,
    which sets the points (the thread that waits at each) and returns name
    -> (reached, resume) events."""
    events: dict[str, Any] = {}
    pending: dict[str, str] = {}

    def arm(**points: str) -> dict[str, Any]:
        events.clear()
        events.update({p: (threading.Event(), threading.Event()) for p in points})
        pending.update(points)
        return dict(events)

    def at(point: str) -> None:
        if pending.get(point) == threading.current_thread().name:
            del pending[point]
            reached, resume = events[point]
            reached.set()
            assert resume.wait(TIMEOUT)

    base = type(ix._torch)

    class Paused(base):  # type: ignore[misc, valid-type]
        def __getattribute__(self, name: str) -> Any:
            if name == "n":
                at("count")
            value = base.__getattribute__(self, name)
            if name == "_snap":
                at("count")
            return value

        def __setattr__(self, name: str, value: Any) -> None:
            if name in ("_snap", "keys"):
                at("publish")
            base.__setattr__(self, name, value)

    ix._torch.__class__ = Paused
    return arm


def _named(name: str, f: Callable[[], Any]) -> Callable[[], Any]:
    """``f``, run under the thread name ``name`` (see _paused_torch_range)."""

    def run() -> Any:
        threading.current_thread().name = name
        return f()

    return run


@needs_torch
def test_torch_range_searches_beside_adds_answer_over_one_state(monkeypatch):
    """A search on the torch path read the key buffer, then the count: an add
    that grew the buffer in between gave it the new count over the old
    buffer, whose rows past the old count were never written (garbage, or
    fewer rows than counted). A search paused between those reads while a
    whole growing add runs, from a buffer that is not full (250 keys in 400
    rows), answers over the 250 keys; one beside an add paused before it
    publishes its grown buffer answers over the keys before it, and after
    it over all of them. (Scores of small integers, exact in any order; a
    threshold every key passes, so the answer counts the rows searched; the
    rows not written hold 7s, not whatever memory held, so reading them
    shows.)"""
    import torch

    rng = np.random.default_rng(12)
    allk = rng.integers(-3, 4, (850, 16)).astype(np.float32)
    q = torch.from_numpy(allk[:4].copy())
    t = torch.full((4,), -1e30)
    ix = _torch_range(torch.from_numpy(allk[:200]))
    with monkeypatch.context() as m:  # (the grown buffer: torch.empty(cap, d, ...))
        full = torch.full
        m.setattr(torch, "empty", lambda *size, **kw: full(size, 7.0, **kw))
        ix.add(torch.from_numpy(allk[200:250]))  # (grown to 400 rows: 150 not written)
    assert len(ix) == 250

    def over(n: int, answer: tuple[Any, Any, Any]) -> None:
        """That ``answer`` is the search's over the first ``n`` keys."""
        lims, ids, scores = (a.numpy() for a in answer)
        s = allk[:4] @ allk[:n].T
        np.testing.assert_array_equal(lims, np.arange(5) * n)
        np.testing.assert_array_equal(ids, np.tile(np.arange(n), 4))
        np.testing.assert_array_equal(scores, s.reshape(-1))

    arm = _paused_torch_range(ix)
    at = arm(count="searcher")

    def searcher() -> Any:
        return ix.search(q, t)  # (waits at "count" for the add below)

    def adder() -> None:
        try:
            assert at["count"][0].wait(TIMEOUT)
            ix.add(torch.from_numpy(allk[250:450]))  # (450 > 400 rows: grows)
        finally:
            at["count"][1].set()

    over(250, together([_named("searcher", searcher), _named("adder", adder)])[0])
    assert len(ix) == 450
    over(450, ix.search(q, t))

    at = arm(publish="adder")

    def adder2() -> None:
        ix.add(torch.from_numpy(allk[450:850]))  # (850 > 800 rows: grows)

    def searcher2() -> tuple[Any, ...]:
        try:
            assert at["publish"][0].wait(TIMEOUT)
            # (the grown buffer built and filled, not published)
            return ix.search(q, t), ix.topk(q, 450), ix.keys(), len(ix)
        finally:
            at["publish"][1].set()

    answer, (top_ids, top_s), keys, n = together([_named("adder", adder2), searcher2])[1]
    over(450, answer)
    s = allk[:4] @ allk[:450].T
    np.testing.assert_array_equal(top_ids.shape, (4, 450))
    np.testing.assert_array_equal(np.take_along_axis(s, top_ids.numpy(), 1), top_s.numpy())
    np.testing.assert_array_equal(keys.numpy(), allk[:450])
    assert n == 450
    assert len(ix) == 850
    over(850, ix.search(q, t))
    np.testing.assert_array_equal(ix.keys().numpy(), allk)


@needs_torch
def test_torch_range_search_beside_add_checks_the_keys_it_sees_for_overflow():
    """The torch path of test_range_index_search_beside_add_checks_the_keys_it_sees_for_overflow:
    ``RangeIndex.add`` raised the key-norm bound after the torch path had
    appended the keys, so a search in between saw keys near 1e19 with the old
    bound, skipped the float32 overflow check and returned Inf scores. The
    keys and their bound are now published together."""
    import torch

    ix, q, big = _near_overflow()
    ix = _torch_range(torch.from_numpy(ix.keys()))
    q = torch.from_numpy(q)
    want = ix.search(q, 0.0)
    points = {p: (threading.Event(), threading.Event()) for p in ("add", "added")}
    add = ix._torch.add

    def wait(point: str) -> None:
        reached, resume = points[point]
        reached.set()
        assert resume.wait(TIMEOUT)

    def paused_add(keys: Any) -> Any:
        wait("add")
        out = add(keys)
        wait("added")  # (returned to RangeIndex.add, which has not returned)
        return out

    ix._torch.add = paused_add

    _assert_searches_around_add_see_overflow(ix, q, torch.from_numpy(big[:3]), want, points)
    with pytest.raises(neuropil.ArgumentError, match="within float32"):
        ix.search(q, 0.0)


# ------------------------------------------------------------------ the thread pool


def test_resizing_the_pool_under_load_from_many_threads(restore_threads):
    """``set_num_threads`` in a loop while six threads make short (team) and
    long (pool) calls: no deadlock, and each result is the one of some
    thread count (a SparseFFN's sum order follows the thread count)."""
    g, u, dn, x = _ffn_weights()
    teal = InputSparseFFN(g, u, dn, bits=4)
    teal.calibrate(x, 0.7)
    cats = SparseFFN(g, u, dn, bits=8)
    cats.calibrate(x, 0.5)
    q = quantize(u, bits=4, group_size=32)
    fh = FlyHash(576, 8.0, 0.05, seed=1)
    big = np.random.default_rng(10).standard_normal((400, 576), dtype=np.float32)
    codes = fh.hash(big)
    ix = BinaryIndex(fh.output_dim)
    ix.add(np.tile(codes, (20, 1)))
    calls = [
        lambda: teal(x[0]),
        lambda: teal(x),
        lambda: cats(x[0]),
        lambda: cats(x),
        lambda: q.matvec(x[0]),
        lambda: q.matvec(x),
        lambda: fh.hash(big),
        lambda: ix.search(codes[:40], 4),
    ]
    wants = []
    for n in (1, 2, 3):
        neuropil.set_num_threads(n)
        wants.append([c() for c in calls])
    stop = threading.Event()

    def resizer() -> int:
        k = 0
        while not stop.is_set():
            neuropil.set_num_threads(1 + k % 3)
            k += 1
        return k

    def worker(seed: int) -> Callable[[], list[int]]:
        def run() -> list[int]:
            order = np.random.default_rng(seed).integers(0, len(calls), 120)
            bad = []
            try:
                for k in order:
                    y = calls[k]()
                    if not any(same(y, w[k]) for w in wants):
                        bad.append(int(k))
                return bad
            finally:
                stop.set()

        return run

    resizes, *bad = together([resizer] + [worker(s) for s in range(6)])
    assert resizes > 0 and bad == [[]] * 6


# ------------------------------------------------------------------ torch modules


@needs_torch
def test_quantized_linear_shared_by_threads_under_inference_mode():
    """Concurrent first calls (the cached numpy views built by each) and
    later ones give the serial results, batch 1 and batches."""
    import torch
    from torch import nn

    from neuropil.torch import QuantizedLinear

    torch.manual_seed(0)
    lin = nn.Linear(1536, 576)
    xs = torch.randn(4, 1536)
    ref = QuantizedLinear.from_linear(lin, bits=4, group_size=32)
    with torch.inference_mode():
        want = [ref(xs[:1]), ref(xs), ref(xs[2])]
    for _ in range(5):
        layer = copy.deepcopy(ref)  # no cached views yet

        def call(i: int, layer=layer) -> list[Any]:
            with torch.inference_mode():
                return [layer(xs[:1]), layer(xs), layer(xs[2])]

        for r in rounds(8, 4, call):
            assert all(same(y, want) for y in r)


def _mlp(method: str = "cats"):
    import torch
    from torch import nn

    from neuropil.torch import SparseMLP

    torch.manual_seed(1)
    d, h = 256, 1024
    layers = [nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)]
    return SparseMLP(*layers, "silu", threshold=0.05, method=method, t_in=0.4)


@needs_torch
@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_mlp_shared_by_threads_under_inference_mode(method):
    """Threads decoding through one SparseMLP (the Rust path) at once, from its
    very first call (each may build the Rust copy; one stays): the serial
    results, and the copy's thresholds never change under a call."""
    import torch

    x1, x3 = torch.randn(1, 1, 256), torch.randn(1, 3, 256)
    ref = _mlp(method)
    with torch.inference_mode():
        want = [ref(x1), ref(x3)]
    assert ref.rust_ffn() is not None
    for _ in range(4):
        mlp = _mlp(method)

        def call(i: int, mlp=mlp) -> list[Any]:
            with torch.inference_mode():
                return [mlp(x1), mlp(x3)]

        for r in rounds(6, 4, call):
            assert all(same(y, want) for y in r)


@needs_torch
def test_sparse_mlp_reconfigured_beside_calls(fast_switching):
    """The method, threshold or weights changed while threads call: each call
    gives the result of the configuration before or after (it used to raise
    AttributeError: a call that read "teal" found the "cats" kernel another
    thread had just built, or TypeError when the copy was dropped mid-check)."""
    import torch

    mlp = _mlp("teal")
    x = torch.randn(1, 1, 256)
    with torch.inference_mode():
        want = {"teal": mlp(x)}
        mlp.method = "cats"
        want["cats"] = mlp(x)
        mlp.threshold = 0.2
        want["cats2"] = mlp(x)
        mlp.threshold = 0.05

    def write() -> None:
        mlp.method = "teal"
        mlp.method = "cats"
        mlp.threshold = 0.2
        mlp.threshold = 0.05
        mlp.float()  # a cast: drops the Rust copy

    def read(i: int) -> bool:
        with torch.inference_mode():
            y = mlp(x)
        return any(same(y, w) for w in want.values())

    assert writer_beside_readers(write, read, 400) == [0, 0]


@needs_torch
@pytest.mark.parametrize("new_tensors", [False, True], ids=["same-tensors", "new-tensors"])
def test_sparse_mlp_weights_replaced_beside_calls(fast_switching, new_tensors):
    """``p.data = w`` in one thread (the assignment ``module.to()`` and casts
    make) while two threads call: each call gives the result of a weight the
    module held during it, and every call that starts after a replacement
    uses the new weight. The Rust copy was keyed on the versions, which the
    assignment does not bump: every call after the first used the copy of the
    first weights. The weights go back and forth between three tensors (the
    same ones, so old addresses come back; or copies, allocated where freed
    ones were)."""
    import torch

    mlp = _mlp("cats")
    x = torch.randn(1, 1, 256)
    up = mlp.up.weight
    sets = [up.detach().clone(), torch.randn_like(up) * 0.06, torch.randn_like(up) * 0.07]

    def alone(w: Any) -> Any:
        ref = _mlp("cats")  # (the same layers: a fresh module, its copy built at its call)
        ref.up.weight.data = w.clone()
        with torch.inference_mode():
            return ref(x)

    want = [alone(w) for w in sets]
    assert not any(same(want[i], want[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    order = [0, 1, 2, 0, 2, 1] * 8  # (no weight follows itself)
    # begun[0]: the last replacement begun; held[0]: the last one done, and
    # checked[0]: the latest ``held`` a call started at and has finished.
    begun, held, checked = [0], [0], [-1]
    progress, done = threading.Condition(), threading.Event()

    def writer() -> None:
        try:
            for k in range(1, len(order)):
                begun[0] = k
                up.data = sets[order[k]].clone() if new_tensors else sets[order[k]]
                held[0] = k
                with progress:  # (a call that starts now must see it)
                    assert progress.wait_for(lambda k=k: checked[0] >= k, TIMEOUT)
        finally:
            done.set()

    def caller() -> list[tuple[int, int]]:
        bad = []
        while not done.is_set():
            first = held[0]
            with torch.inference_mode():
                y = mlp(x)
            last = begun[0]
            if not any(same(y, want[order[k]]) for k in range(first, last + 1)):
                bad.append((first, last))
            with progress:
                checked[0] = max(checked[0], first)
                progress.notify_all()
        return bad

    bad = together([writer, caller, caller])[1:]
    assert bad == [[], []], f"calls (held, begun) with none of the weights held: {bad}"
    with torch.inference_mode():
        assert same(mlp(x), want[order[-1]])


@needs_torch
def test_tf32_blocks_from_several_threads_restore_the_setting():
    """The TF32 switch is process-wide: two overlapping blocks (membrane banks
    in two threads) must leave the user's setting as it was. The old code
    restored what each block saw on entry, so the second block in, leaving
    last, kept TF32 on for the rest of the process."""
    import torch

    from neuropil.membrane import bank

    before = torch.get_float32_matmul_precision()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> str:
        with bank._tf32():
            first_in.set()
            second_in.wait(TIMEOUT)
            inside = torch.get_float32_matmul_precision()
        first_out.set()
        return inside

    def second() -> str:
        first_in.wait(TIMEOUT)
        with bank._tf32():
            second_in.set()
            first_out.wait(TIMEOUT)
            return torch.get_float32_matmul_precision()

    try:
        assert together([first, second]) == ["high", "high"]
        assert torch.get_float32_matmul_precision() == before
    finally:
        torch.set_float32_matmul_precision(before)


@needs_torch
def test_no_tf32_blocks_of_range_and_flyhash_restore_the_flag():
    """Range search and FlyHash turn TF32 off around their CUDA matmuls (the
    same process-wide flag): overlapping blocks of the two, in two threads,
    must leave the user's value. (range.py saved and restored on its own.)"""
    import torch

    from neuropil import _flyhash_torch
    from neuropil import range as nrange

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> bool:
        with nrange.no_tf32():
            first_in.set()
            second_in.wait(TIMEOUT)
            inside = torch.backends.cuda.matmul.allow_tf32
        first_out.set()
        return inside

    def second() -> bool:
        first_in.wait(TIMEOUT)
        with _flyhash_torch.no_tf32():
            second_in.set()
            first_out.wait(TIMEOUT)
            return torch.backends.cuda.matmul.allow_tf32

    try:
        assert together([first, second]) == [False, False]
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@needs_torch
def test_sparse_layer_index_built_once_by_concurrent_first_reads():
    """``neuropil.hf``: threads reading one layer's index at once (its lazy
    build, then its extension by new keys) leave exactly the keys there are:
    the extension used to run in both threads, appending the new keys twice."""
    pytest.importorskip("transformers")
    import torch

    from neuropil import hf

    class Cache:
        method = "flat"

    torch.manual_seed(2)
    layer = hf.SparseLayer(Cache())
    layer.update(torch.randn(1, 2, 500, 64), torch.randn(1, 2, 500, 64))
    together([lambda: layer.index(0, 0), lambda: layer.index(0, 1)])  # the lazy build
    for ix in layer.indexes[0]:
        # Each extension takes a millisecond more (the GIL released), so a
        # thread's check of the index's length and its extension overlap others'.
        def slow_add(keys: Any, add: Any = ix.add) -> None:
            time.sleep(1e-3)
            add(keys)

        ix.add = slow_add
    for step in range(10):
        ixs = together([lambda h=h % 2: layer.index(0, h) for h in range(4)])
        assert [len(ix) for ix in ixs] == [500 + 4 * step] * 4
        assert layer.indexes[0][0] is ixs[0] and layer.indexes[0][1] is ixs[1]
        layer.update(torch.randn(1, 2, 4, 64), torch.randn(1, 2, 4, 64))
    assert len(copy.deepcopy(layer).index(0, 1)) == 540


@needs_torch
def test_threads_generating_with_one_model_and_their_own_caches():
    """A sparsified model (Rust FFN path) with neuropil's sparse attention,
    shared by threads that each generate with their own SparseCache: the
    tokens of a serial run."""
    pytest.importorskip("transformers")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuropil import hf
    from neuropil.torch import sparsify_mlp

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    prompts = [torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(s))
               for s in range(4)]  # fmt: skip
    sparsify_mlp(model, 0.5, calibration=prompts)
    model.set_attn_implementation(hf.ATTENTION)

    def generate(p: Any) -> Any:
        cache = hf.SparseCache(model, "top_k", top_k=8, window=4)
        with torch.inference_mode():
            return model.generate(
                p, max_new_tokens=8, do_sample=False, **hf.cache_kwargs(model, cache)
            )

    want = [generate(p) for p in prompts]
    got = together([lambda p=p: generate(p) for p in prompts])
    assert all(same(a, b) for a, b in zip(got, want, strict=True))

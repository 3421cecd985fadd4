"""The package skeleton: dispatch, threads, errors, zero-copy inputs, info."""

from __future__ import annotations

import errno
import os
import stat
import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import neuropil
from conftest import HAS_TORCH, read_pipe, run_python
from neuropil import ArgumentError, DTypeError, FormatError, NeuropilError, ShapeError, _native


def test_import_does_not_import_torch_or_transformers():
    r = run_python(
        "import sys, neuropil; neuropil.info(probe_torch=False); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_info_reports_the_installation():
    data = neuropil.info()
    assert data["version"] == neuropil.__version__ == _native.__version__
    assert data["simd_level"] in data["simd_levels"]
    assert data["simd_levels"][0] == "scalar"
    assert data["threads"] == neuropil.get_num_threads() >= 1
    assert data["spin_us"] == int(os.environ.get("NEUROPIL_SPIN_US", "50"))
    assert isinstance(data["cuda"], bool)
    assert data["errors"] == {}
    if HAS_TORCH:
        import torch

        assert data["torch"] == torch.__version__
        assert data["cuda"] == torch.cuda.is_available()
    else:
        assert data["torch"] is None


def test_exception_hierarchy():
    assert issubclass(ShapeError, NeuropilError) and issubclass(ShapeError, ValueError)
    assert issubclass(DTypeError, NeuropilError) and issubclass(DTypeError, TypeError)
    assert issubclass(FormatError, NeuropilError) and issubclass(FormatError, ValueError)
    assert issubclass(ArgumentError, NeuropilError) and issubclass(ArgumentError, ValueError)


def _bad_numpy_scalar_calls():
    from neuropil import flyhash, neurons, quant, range, windows

    keys = np.ones((8, 4), np.float32)
    return [
        (lambda: range.RangeIndex(keys, leaf=np.int64(0)), "leaf must be an integer >= 1; got 0"),
        (lambda: flyhash.FlyHash(16, 2.0, 0.25, seed=np.float64(1.5)), "seed .*; got 1.5"),
        (lambda: flyhash.FlyHash(np.float32(16), 2.0, 0.25), "input_dim .*; got 16.0"),
        (lambda: neurons.NeuronCache(np.int64(-3)), "num_neurons .*; got -3"),
        (lambda: windows.SlidingWindows(keys, np.float32(2.0)), "window .*; got 2.0"),
        (lambda: quant.quantize(keys, bits=np.float32(4)), "bits must be an integer; got 4.0"),
        (
            lambda: quant.QuantizedWeights(keys, keys, None, (np.float32(2.5), 4), 4, 32, "q4_0"),
            r"rows, cols\); got \(2.5, 4\)",
        ),
    ]


@pytest.mark.parametrize("i", range(len(_bad_numpy_scalar_calls())))
def test_messages_show_numpy_scalars_as_numbers(i):
    # numpy 2's repr is np.float32(2.0): messages give the value as "got 2.0".
    call, message = _bad_numpy_scalar_calls()[i]
    with pytest.raises(ArgumentError, match=message) as e:
        call()
    assert "np." not in str(e.value)


# ---------------------------------------------------------------- SIMD dispatch

LEVELS = _native.simd_levels()


@pytest.mark.parametrize("level", LEVELS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_dot_matches_float64_at_every_level(level, data):
    n = data.draw(st.integers(1, 2000))
    elems = st.floats(-1e3, 1e3, width=32)
    a = data.draw(hnp.arrays(np.float32, n, elements=elems))
    b = data.draw(hnp.arrays(np.float32, n, elements=elems))
    want = float(a.astype(np.float64) @ b.astype(np.float64))
    scale = float(np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
    got = _native.dot(a, b, level=level)
    assert abs(got - want) <= 1e-5 * scale + 1e-6


def test_levels_agree_on_long_vectors():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 100_003), dtype=np.float32)
    want = float(a.astype(np.float64) @ b.astype(np.float64))
    for level in LEVELS:
        assert _native.dot(a, b, level=level) == pytest.approx(want, rel=1e-4, abs=1e-2)
    assert _native.dot(a, b) == pytest.approx(want, rel=1e-4, abs=1e-2)


def test_nan_propagates_through_dot_like_numpy():
    a = np.array([1.0, np.nan, 2.0], dtype=np.float32)
    assert np.isnan(_native.dot(a, a))


def test_unknown_level_argument():
    a = np.ones(4, np.float32)
    with pytest.raises(
        ArgumentError, match=r"level must be one of scalar, avx2, avx512, neon; got \"sse9\""
    ):
        _native.dot(a, a, level="sse9")


def test_unsupported_level_is_an_error_not_a_crash():
    foreign = "avx2" if "neon" in LEVELS else "neon"
    a = np.ones(4, np.float32)
    with pytest.raises(NeuropilError, match="lacks the instructions"):
        _native.dot(a, a, level=foreign)


@pytest.mark.parametrize("level", LEVELS)
def test_env_override_forces_each_supported_level(level):
    r = run_python(
        "import neuropil, numpy as np; a = np.arange(100, dtype=np.float32); "
        "print(neuropil.simd_level(), neuropil._native.dot(a, a))",
        env={"NEUROPIL_KERNEL": level},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [level, str(float(sum(i * i for i in range(100))))]


@pytest.mark.parametrize(
    "value,reason", [("sse9", "unknown level"), ("neon", "lacks the instructions")]
)
def test_env_override_invalid_level_raises_clear_error(value, reason):
    if value in LEVELS:
        pytest.skip(f"{value} is supported here")
    r = run_python(
        "import neuropil, numpy as np\n"
        "try:\n"
        "    neuropil._native.dot(np.ones(3, np.float32), np.ones(3, np.float32))\n"
        "except neuropil.NeuropilError as e:\n"
        "    print('raised:', e)\n",
        env={"NEUROPIL_KERNEL": value},
    )
    assert r.returncode == 0, r.stderr  # no crash, no illegal instruction
    assert f"raised: NEUROPIL_KERNEL={value} is not usable here" in r.stdout
    assert reason in r.stdout and "scalar" in r.stdout
    assert r.stdout.count("is not usable here") == 1, r.stdout  # said once
    assert r.stdout.count("this CPU supports") == 1, r.stdout


# ---------------------------------------------------------------- threads


def test_set_num_threads_resizes_the_pool(restore_threads):
    neuropil.set_num_threads(1)
    assert neuropil.get_num_threads() == 1
    neuropil.set_num_threads(np.int64(3))  # a numpy integer is an integer (a shape's entry)
    assert neuropil.get_num_threads() == 3
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 500_000), dtype=np.float32)
    three = _native.dot(a, b)
    neuropil.set_num_threads(1)
    assert _native.dot(a, b) == three  # chunked sum: independent of the thread count


BAD_THREADS = [
    (0, "0"), (-2, "-2"), (1.5, "1.5"), (True, "True"), ("4", "'4'"),
    (np.float32(2), "2.0"), (np.bool_(True), "True"), (np.int64(0), "0"),
]  # fmt: skip


@pytest.mark.parametrize(("bad", "shown"), BAD_THREADS)
def test_set_num_threads_rejects_non_positive_integers(bad, shown, restore_threads):
    # (numpy scalars shown as numbers, not numpy 2's "np.int64(0)")
    with pytest.raises(ArgumentError, match=f"n must be a positive integer.*; got {shown}$"):
        neuropil.set_num_threads(bad)


def test_num_threads_env_var():
    r = run_python(
        "import neuropil; print(neuropil.get_num_threads())", env={"NEUROPIL_NUM_THREADS": "3"}
    )
    assert r.stdout.strip() == "3", r.stderr
    r = run_python(
        "import neuropil\ntry:\n    neuropil.get_num_threads()\n"
        "except neuropil.ArgumentError as e:\n    print(e)",
        env={"NEUROPIL_NUM_THREADS": "many"},
    )
    assert 'NEUROPIL_NUM_THREADS must be a positive integer; got "many"' in r.stdout, r.stderr


_SHORT_CALLS = """
import numpy as np, neuropil
from neuropil._input_sparse import InputSparseFFN
from neuropil.quant import quantize
rng = np.random.default_rng(0)
g, u = rng.standard_normal((2, 1536, 576), dtype=np.float32) / 24
dn = rng.standard_normal((576, 1536), dtype=np.float32) / 40
x = rng.standard_normal((3, 576), dtype=np.float32)
teal = InputSparseFFN(g, u, dn, activation="silu", bits=4)
teal.calibrate(x, 0.7)
q = quantize(u, bits=4, group_size=32)
from neuropil.neurons import SparseFFN
cats = SparseFFN(g, u, dn, activation="silu", bits=8)
cats.calibrate(x, 0.5)
calls = lambda: [teal(x[0]), teal(x), q.matvec(x[0]), q.matvec(x), cats(x[0]), cats(x)]
out = calls()
for _ in range(200):  # helpers spinning, joining, leaving
    assert all((a == b).all() for a, b in zip(out, calls()))
print(b"".join(a.tobytes() for a in out).hex())
"""


def test_short_call_team_gives_the_same_bits_as_one_thread():
    """Short calls run in the spinning team (NEUROPIL_SPIN_US); the result does
    not depend on which thread ran which tile, row piece or block of neurons,
    or on the team."""
    team = run_python(_SHORT_CALLS)
    assert team.returncode == 0, team.stderr
    alone = run_python(_SHORT_CALLS, env={"NEUROPIL_SPIN_US": "0"})
    assert alone.returncode == 0, alone.stderr
    assert team.stdout == alone.stdout


def test_short_calls_from_several_threads_at_once_agree():
    """Python threads calling short kernels at once: one owns the team, the
    others run alone (or wait their turn); every result is the one-thread one."""
    from neuropil._input_sparse import InputSparseFFN
    from neuropil.neurons import SparseFFN
    from neuropil.quant import quantize

    rng = np.random.default_rng(5)
    g, u = rng.standard_normal((2, 512, 256), dtype=np.float32) / 16
    dn = rng.standard_normal((256, 512), dtype=np.float32) / 23
    x = rng.standard_normal((4, 256), dtype=np.float32)
    teal = InputSparseFFN(g, u, dn, activation="silu", bits=8)
    teal.calibrate(x, 0.5)
    cats = SparseFFN(g, u, dn, activation="silu", dtype="float16")
    cats.calibrate(x, 0.5)
    q = quantize(u, bits=4, group_size=32)
    calls = [lambda i=i: teal(x[i]) for i in range(4)]
    calls += [lambda i=i: cats(x[i]) for i in range(4)] + [lambda: q.matvec(x)]
    want = [c() for c in calls]
    bad: list[int] = []

    def worker(seed: int) -> None:
        order = np.random.default_rng(seed).permutation(len(calls) * 30) % len(calls)
        for k in order:
            if not np.array_equal(calls[k](), want[k]):
                bad.append(int(k))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_spin_env_var_is_checked():
    r = run_python(
        "import neuropil; print(neuropil.info()['spin_us'])", env={"NEUROPIL_SPIN_US": "7"}
    )
    assert r.stdout.strip() == "7", r.stderr
    r = run_python(
        "import numpy as np, neuropil\nfrom neuropil.quant import quantize\n"
        "q = quantize(np.ones((64, 64), np.float32), bits=4)\n"
        "try:\n    q.matvec(np.ones(64, np.float32))\n"
        "except neuropil.ArgumentError as e:\n    print(e)",
        env={"NEUROPIL_SPIN_US": "forever"},
    )
    assert (
        'NEUROPIL_SPIN_US must be an integer number of microseconds in 0..=1000000; got "forever"'
        in r.stdout
    ), r.stderr


def test_native_calls_release_the_gil():
    """While one thread is inside a long native call, another runs Python code.

    If the call held the GIL, the counter could not move during it (CPython
    only switches threads between bytecodes of the thread holding the GIL).
    """
    a = np.random.default_rng(3).standard_normal(32 << 20, dtype=np.float32)
    progress = {"n": 0}
    stop = threading.Event()

    def count():
        while not stop.is_set():
            progress["n"] += 1

    results = []

    def native_work():
        for _ in range(3):
            before = progress["n"]
            _native.dot(a, a)
            results.append(progress["n"] - before)

    counter = threading.Thread(target=count)
    counter.start()
    workers = [threading.Thread(target=native_work) for _ in range(2)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.set()
        counter.join()
    assert len(results) == 6
    # Each native call lets the Python counter advance many times.
    assert sorted(results)[len(results) // 2] > 100, results


# ---------------------------------------------------------------- zero-copy inputs


def test_float32_c_contiguous_is_borrowed_not_copied():
    x = np.random.default_rng(4).standard_normal((64, 32), dtype=np.float32)
    addr, copied = _native._input_info(x)
    assert not copied
    assert addr == x.__array_interface__["data"][0]
    view = x[8:16]  # a C-contiguous slice is borrowed at its own offset
    addr, copied = _native._input_info(view)
    assert (addr, copied) == (view.__array_interface__["data"][0], False)


def test_zero_copy_allocates_nothing_and_conversion_allocates_once():
    x32 = np.ones(8 << 20, dtype=np.float32)  # 32 MiB
    x64 = np.ones(8 << 20, dtype=np.float64)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        _native.dot(x32, x32)
        peak_borrowed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        _native.dot(x64, x32)
        peak_converted = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_borrowed < 1 << 20
    # exactly one float32 copy of x64 (32 MiB), not a float64 one or two copies
    assert 32 << 20 <= peak_converted < 40 << 20


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a.astype(np.float64),
        lambda a: a.astype(np.float16),
        lambda a: np.asfortranarray(a),
        lambda a: a[:, ::2],
        lambda a: a.tolist(),
    ],
)
def test_other_layouts_are_converted_once(make):
    a = np.arange(48, dtype=np.float32).reshape(6, 8) / 8
    x = make(a)
    _addr, copied = _native._input_info(x)
    assert copied
    ref = np.ascontiguousarray(x, dtype=np.float32)
    assert _native.dot(ref.ravel(), ref.ravel()) == pytest.approx(float((ref.ravel() ** 2).sum()))


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_cpu_tensor_is_borrowed():
    import torch

    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    addr, copied = _native._input_info(t)
    assert (addr, copied) == (t.data_ptr(), False)
    assert _native.dot(t[1], t[2]) == float(t[1] @ t[2])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "x,exc,message",
    [
        (
            np.arange(6, dtype=np.int64),
            DTypeError,
            "x must have dtype float32 (or another float dtype, converted once); got int64",
        ),
        (np.ones(3, dtype=bool), DTypeError, "got bool"),
        (np.ones(3, dtype=np.complex64), DTypeError, "got complex64"),
        (np.array(["a", "b"]), DTypeError, "got <U1"),
        ([[1.0, 2.0], [3.0]], DTypeError, "x must be a float array"),
        (
            np.ones((2, 3, 4), np.float32),
            ShapeError,
            "x must have shape (d,) or (n, d); got (2, 3, 4)",
        ),
        (np.float32(3.0), ShapeError, "x must have shape (d,) or (n, d); got ()"),
        (np.ones((3, 0), np.float32), ShapeError, "x must not be empty; got shape (3, 0)"),
        (
            np.array([1.0, np.nan, 3.0], np.float32),
            ArgumentError,
            "x must be finite (no NaN or Inf); got NaN at flat index 1",
        ),
        (np.array([[1.0, 2.0], [np.inf, 0.0]]), ArgumentError, "got inf at flat index 2"),
    ],
)
def test_binding_layer_rejects_bad_input_with_clear_messages(x, exc, message):
    with pytest.raises(exc) as info:
        _native._input_info(x, checked=True)
    assert message in str(info.value)


def test_dot_rejects_mismatched_and_bad_arguments():
    a = np.ones(4, np.float32)
    with pytest.raises(ShapeError, match=r"b must have shape \(4,\) to match a; got \(3,\)"):
        _native.dot(a, np.ones(3, np.float32))
    with pytest.raises(ShapeError, match=r"a must have shape \(n,\); got \(2, 2\)"):
        _native.dot(a.reshape(2, 2), a)
    with pytest.raises(ShapeError, match=r"b must not be empty; got shape \(0,\)"):
        _native.dot(a, np.ones(0, np.float32))
    with pytest.raises(DTypeError, match="b must have dtype float32"):
        _native.dot(a, np.ones(4, np.int32))


def test_read_only_and_unaligned_inputs_are_handled():
    a = np.ones(16, np.float32)
    a.flags.writeable = False
    assert _native.dot(a, a) == 16.0
    raw = np.zeros(16 * 4 + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float32)
    unaligned[:] = 2.0
    _addr, copied = _native._input_info(unaligned)
    assert copied == (unaligned.__array_interface__["data"][0] % 4 != 0)
    assert _native.dot(unaligned, unaligned) == 64.0


def test_native_objects_shared_by_threads_serialise_their_calls():
    """A write (add, record, set_hot) that releases the GIL while other threads
    read the same object: every call succeeds and nothing is lost (the
    classes used to fail such calls with "Already borrowed")."""
    from neuropil.flyhash import BinaryIndex
    from neuropil.neurons import NeuronCache, SparseFFN
    from neuropil.range import RangeIndex

    rng = np.random.default_rng(0)
    errors: list[str] = []

    def together(*fns):
        def guarded(f):
            try:
                f()
            except Exception as e:  # reported below, with the call that failed
                errors.append(f"{f.__name__}: {e!r}")

        ts = [threading.Thread(target=guarded, args=(f,)) for f in fns]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    codes = rng.integers(0, 256, (20000, 128), dtype=np.uint8)
    ix = BinaryIndex(1024)
    ix.add(codes)

    def add_codes():
        for _ in range(10):
            ix.add(codes[:2000])

    def search_codes():
        for _ in range(10):
            ix.search(codes[:50], 5)

    together(add_codes, search_codes, search_codes)
    assert len(ix) == 40000

    cache = NeuronCache(100_000, capacity=1000)
    mask = rng.random((64, 100_000)) < 0.1

    def record():
        for _ in range(10):
            cache.record(mask)

    def stats():
        for _ in range(100):
            cache.stats()

    together(record, record, stats)
    assert cache.stats()["events"] == 20 * int(mask.sum())

    keys = rng.standard_normal((20000, 64), dtype=np.float32)
    rix = RangeIndex(keys)

    def add_keys():
        for _ in range(10):
            rix.add(keys[:500])

    def range_search():
        for _ in range(10):
            rix.search(keys[:20], 5.0)

    together(add_keys, range_search)
    assert len(rix) == 25000

    h, d = 1024, 256
    ffn = SparseFFN(*(rng.standard_normal(s, dtype=np.float32) for s in ((h, d), (h, d), (d, h))))
    x = rng.standard_normal((8, d), dtype=np.float32)
    want = ffn(x)

    def forward():
        for _ in range(20):
            np.testing.assert_allclose(ffn(x), want, rtol=1e-5, atol=1e-4)

    def set_hot():
        for i in range(20):
            ffn.set_hot(np.arange(i * 10, i * 10 + 100))

    together(forward, set_hot)
    assert not errors, errors


def test_a_getter_during_a_long_write_does_not_stall_other_threads():
    """``len(index)`` while another thread rebuilds it waits for the rebuild
    with the GIL released: a third, pure-Python thread keeps running."""
    import time

    from neuropil.range import RangeIndex

    keys = np.random.default_rng(0).standard_normal((200_000, 32), dtype=np.float32)
    ix = RangeIndex(keys)
    gaps: list[float] = []
    stop = threading.Event()

    def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            time.sleep(0.0005)

    def poller():
        while not stop.is_set():
            assert len(ix) == 200_000
            time.sleep(0.001)

    threads = [threading.Thread(target=ticker), threading.Thread(target=poller)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    ix.rebuild()
    took = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join()
    assert max(gaps) < took / 2, (max(gaps), took)


def _savers():
    """One small object per persistent type, with its save and load calls."""
    from neuropil import flyhash, neurons, quant, range, windows

    w = np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32)
    q = quant.quantize(w, bits=4, group_size=32)
    out = {
        "QuantizedWeights": (q.save, quant.QuantizedWeights.load),
        "quant.save_file": (lambda p: quant.save_file(p, {"w": q}), quant.load_file),
        "FlyHash": (flyhash.FlyHash(16, 2.0, 0.25, seed=1).save, flyhash.FlyHash.load),
        "BinaryIndex": (flyhash.BinaryIndex(64).save, flyhash.BinaryIndex.load),
        "RangeIndex": (range.RangeIndex(w).save, range.RangeIndex.load),
        "NeuronCache": (neurons.NeuronCache(64, capacity=8).save, neurons.NeuronCache.load),
        "SlidingWindows": (windows.SlidingWindows(w, window=4).save, windows.SlidingWindows.load),
    }
    if HAS_TORCH:
        import torch

        import neuropil.torch as nt
        from neuropil.membrane import MembraneBank

        model = nt.quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 8)), bits=4)
        out["MembraneBank"] = (MembraneBank(L=8, H=2, W=2).save, MembraneBank.load)
        out["save_quantized"] = (
            lambda p: nt.save_quantized(model, p),
            lambda p: nt.load_quantized(model, p),
        )
    return out


_PERSISTENT = [
    "QuantizedWeights", "quant.save_file", "FlyHash", "BinaryIndex", "RangeIndex",
    "NeuronCache", "SlidingWindows", "MembraneBank", "save_quantized",
]  # fmt: skip


@pytest.mark.parametrize("kind", _PERSISTENT)
def test_every_loader_and_saver_raises_the_oserror_open_would(kind, tmp_path):
    # A file that cannot be opened is an OSError of the subclass Python's own
    # open() gives, naming the path; FormatError is kept for files that were
    # read and are malformed. Every loader agrees.
    savers = _savers()
    if kind not in savers:
        pytest.skip("needs torch")
    assert set(savers) <= set(_PERSISTENT)
    save, load = savers[kind]
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        load(missing)
    assert e.value.filename == str(missing) and not isinstance(e.value, NeuropilError)
    with pytest.raises(IsADirectoryError) as e:
        load(tmp_path)
    assert e.value.filename == str(tmp_path)
    # A failed save names the target, not the hidden temporary file beside it,
    # and leaves no temporary file behind.
    target = tmp_path / "no-such-dir" / "x.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        save(target)
    assert e.value.filename == str(target) and not isinstance(e.value, NeuropilError)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    target = tmp_path / "a-dir"
    target.mkdir()
    with pytest.raises(IsADirectoryError) as e:
        save(target)
    assert e.value.filename == str(target) and not isinstance(e.value, NeuropilError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-dir"]
    assert list(target.iterdir()) == []
    target.rmdir()
    save(tmp_path / "x.safetensors")
    load(tmp_path / "x.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("kind", _PERSISTENT)
def test_a_save_follows_links_and_writes_pipes_and_devices_in_place(kind, tmp_path):
    # Saves write a temporary file and rename it over the target: over a named
    # pipe or a device that replaced the pipe or device itself (as root,
    # `QuantizedWeights.save("/dev/null")` turned /dev/null into a plain file),
    # and over a symbolic link it replaced the link. As open(path, "wb"), they
    # now follow links and write pipes and devices in place.
    savers = _savers()
    if kind not in savers:
        pytest.skip("needs torch")
    save, load = savers[kind]
    save(tmp_path / "plain.safetensors")
    want = (tmp_path / "plain.safetensors").read_bytes()
    for name in ("pipe", "pipe-link"):
        reader, got = (
            read_pipe(tmp_path / "pipe") if name == "pipe" else read_pipe(tmp_path / "pipe2")
        )
        if name == "pipe-link":
            (tmp_path / "pipe-link").symlink_to("pipe2")
        save(tmp_path / name)
        reader.join(timeout=30)
        assert not reader.is_alive() and stat.S_ISFIFO(os.stat(tmp_path / name).st_mode)
        # (the same file but for the order of the metadata's keys, which the
        # Rust savers do not fix)
        assert len(got) == 1 and len(got[0]) == len(want), name
        (tmp_path / "from-pipe.safetensors").write_bytes(got[0])
        load(tmp_path / "from-pipe.safetensors")
    # A link to a regular file: the file is replaced, the link stays.
    (tmp_path / "real.safetensors").write_bytes(b"old")
    (tmp_path / "link").symlink_to("real.safetensors")
    save(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert len((tmp_path / "real.safetensors").read_bytes()) == len(want)
    load(tmp_path / "link")
    # A write error in place names the path given (a link to /dev/full: the
    # device itself is never a target here).
    if os.path.exists("/dev/full"):
        (tmp_path / "full").symlink_to("/dev/full")
        with pytest.raises(OSError) as e:
            save(tmp_path / "full")
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "full")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["plain.safetensors", "pipe", "pipe2", "pipe-link", "from-pipe.safetensors",
         "real.safetensors", "link"] + (["full"] if os.path.exists("/dev/full") else [])
    )  # fmt: skip


def test_dot_converts_torch_half_tensors_once_and_keeps_errors():
    """``neuropil.dot``, the README's first call: bfloat16/float16 tensors (which
    ``_native.dot`` cannot borrow) are converted; bad input raises as before."""
    torch = pytest.importorskip("torch")

    a = torch.linspace(-1, 1, 1000)
    want = float(a @ a)
    for dtype in (torch.bfloat16, torch.float16):
        half = a.to(dtype)
        assert neuropil.dot(half, half) == pytest.approx(float(half.float() @ half.float()))
        assert neuropil.dot(a, half) == pytest.approx(want, rel=1e-2)
    assert neuropil.dot(a.requires_grad_(), a) == pytest.approx(want, rel=1e-5)
    with pytest.raises(neuropil.ShapeError, match=r"b must have shape \(1000,\) to match a"):
        neuropil.dot(a, a[:-1].to(torch.bfloat16))
    with pytest.raises(neuropil.DTypeError, match="b must have dtype float32"):
        neuropil.dot(a, torch.ones(1000, dtype=torch.int32))


def test_info_lists_cuda_devices_after_the_range_submodule_is_imported(monkeypatch):
    # Importing neuropil.range binds the package's global `range` to the
    # submodule; info() listed CUDA devices with range() and raised TypeError
    # on every GPU machine once neuropil.range had been imported.
    torch = pytest.importorskip("torch")
    import neuropil.range

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU {i}")
    data = neuropil.info()
    assert data["cuda"] is True and data["cuda_devices"] == ["GPU 0", "GPU 1"]


def test_info_describes_a_bad_thread_count_instead_of_raising():
    import json

    # (info raised the error every parallel call raises; `neuropil info` exited 2)
    r = run_python(
        "import json, neuropil; d = neuropil.info(probe_torch=False); "
        "print(json.dumps([d['threads'], d['spin_us'], d['errors']]))",
        env={"NEUROPIL_NUM_THREADS": "5000"},
    )
    assert r.returncode == 0, r.stderr
    threads, spin, errors = json.loads(r.stdout)
    # (the field stays typed: None, with the error beside it, not a message in it)
    assert threads is None and isinstance(spin, int)
    assert errors == {
        "threads": "ArgumentError: NEUROPIL_NUM_THREADS must be a positive integer at most "
        '4096; got "5000"'
    }

"""FlyHash encoder and BinaryIndex: semantics, determinism, errors, persistence."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neuropil
from conftest import HAS_TORCH, run_python, unpickle_tampered
from neuropil import ShapeError, _native
from neuropil.flyhash import BinaryIndex, FlyHash

LEVELS = _native.simd_levels()
PROJECTIONS = ["sign", "sparse", "seeded"]


def rand(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)


def top_k_reference(acts, k):
    """Winners by the documented rule: largest first, ties to the lowest index."""
    order = np.argsort(-(acts + 0.0), axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1)


# ---------------------------------------------------------------- configuration and memory


def test_default_size_memory_and_counts():
    sign = FlyHash(1536, seed=0)
    assert (sign.output_dim, sign.active_bits) == (19968, 998)
    assert sign.memory_bytes <= 4_000_000
    sparse = FlyHash(1536, seed=0, projection="sparse", connectivity=0.1)
    assert sparse.connections == 154
    assert sparse.memory_bytes <= 7_000_000
    assert FlyHash(1536, seed=0, projection="seeded").memory_bytes == 0
    # The original's acceptance: < 50 MB, exactly active_bits non-zeros, determinism.
    x = rand(4, 1536)
    out = sign.encode(x)
    assert out.dtype == np.float32 and out.shape == (4, 19968)
    assert (np.count_nonzero(out, axis=1) == 998).all()
    assert np.array_equal(out, FlyHash(1536, seed=0).encode(x))


def test_constructor_arguments_read_back():
    # Each property reports its constructor argument (or what it derives:
    # m = floor(d * ratio), k = floor(m * fraction), round(connectivity * d)
    # connections, ceil(m / 8) code bytes).
    fh = FlyHash(40, 2.5, 0.2, seed=3, projection="sparse", connectivity=0.25, binary=True)
    assert (fh.input_dim, fh.output_dim, fh.active_bits) == (40, 100, 20)
    assert (fh.expansion_ratio, fh.active_fraction, fh.connectivity) == (2.5, 0.2, 0.25)
    assert (fh.connections, fh.binary, fh.projection, fh.seed) == (10, True, "sparse", 3)
    assert fh.code_bytes == 13


def test_seed_none_draws_and_reports_a_seed():
    a, b = FlyHash(16, 4.0, 0.25), FlyHash(16, 4.0, 0.25)
    assert a.seed != b.seed
    c = FlyHash(16, 4.0, 0.25, seed=a.seed)
    assert np.array_equal(a.projection_arrays()["sign_bits"], c.projection_arrays()["sign_bits"])
    assert "seed=" in repr(a)


# ---------------------------------------------------------------- encode semantics


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_outputs_agree_with_each_other(projection):
    fh = FlyHash(48, 6.0, 0.1, seed=3, projection=projection)
    x = rand(37, 48)  # not a multiple of the 16-vector batch
    acts = fh.activations(x)
    idx = fh.encode_indices(x)
    assert idx.dtype == np.uint32 and idx.shape == (37, fh.active_bits)
    assert np.array_equal(idx, top_k_reference(acts, fh.active_bits))
    dense = fh.encode(x)
    rows = np.arange(37)[:, None]
    assert np.array_equal(dense[rows, idx], acts[rows, idx])
    mask = np.zeros_like(dense, dtype=bool)
    mask[rows, idx] = True
    assert (dense[~mask] == 0).all()
    codes = fh.hash(x)
    assert codes.dtype == np.uint8 and codes.shape == (37, fh.code_bytes)
    bits = np.unpackbits(codes, axis=1, bitorder="little")[:, : fh.output_dim]
    assert np.array_equal(bits.astype(bool), mask)
    # 1-D input gives 1-D output.
    assert np.array_equal(fh.encode_indices(x[5]), idx[5])
    assert fh.encode(x[0]).shape == (fh.output_dim,)


def test_activations_are_the_projection():
    fh = FlyHash(70, 3.0, 0.1, seed=5)
    bits = fh.projection_arrays()["sign_bits"]
    w = np.unpackbits(bits, axis=1, bitorder="little")[:, :70].astype(np.float64) * 2 - 1
    x = rand(9, 70)
    np.testing.assert_allclose(fh.activations(x), x.astype(np.float64) @ w.T, atol=1e-4)
    sp = FlyHash(70, 3.0, 0.1, seed=5, projection="sparse", connectivity=0.2)
    arr = sp.projection_arrays()
    idx, signs = arr["indices"].astype(np.int64), arr["signs"]
    neg = np.unpackbits(signs, axis=1, bitorder="little")[:, : sp.connections]
    dense = np.zeros((sp.output_dim, 70))
    np.put_along_axis(dense, idx, 1.0 - 2.0 * neg, axis=1)
    assert (np.count_nonzero(dense, axis=1) == sp.connections).all()  # distinct inputs
    np.testing.assert_allclose(sp.activations(x), x.astype(np.float64) @ dense.T, atol=1e-4)
    binary = FlyHash(70, 3.0, 0.1, seed=5, projection="sparse", binary=True)
    assert not binary.projection_arrays()["signs"].any()


def test_tie_rule_lowest_index_wins():
    fh = FlyHash(32, 4.0, 0.1, seed=1)
    zeros = np.zeros((2, 32), dtype=np.float32)  # every activation ties at 0
    assert np.array_equal(fh.encode_indices(zeros)[0], np.arange(fh.active_bits))


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 90),
    ratio=st.floats(1.0, 8.0),
    frac=st.floats(0.01, 1.0),
    projection=st.sampled_from(PROJECTIONS),
    seed=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_winners_property(d, ratio, frac, projection, seed, data):
    m = int(d * ratio)
    if m < 1 or int(m * frac) < 1:
        return
    fh = FlyHash(d, ratio, frac, seed=seed, projection=projection, connectivity=0.5)
    n = data.draw(st.integers(1, 20))
    # Small integers make exact ties common.
    x = np.asarray(data.draw(st.lists(st.integers(-2, 2), min_size=n * d, max_size=n * d)))
    x = x.reshape(n, d).astype(np.float32)
    acts = fh.activations(x)
    assert np.array_equal(fh.encode_indices(x), top_k_reference(acts, fh.active_bits))


# ---------------------------------------------------------------- determinism


# sha256 prefixes of the projection bytes and of the codes of a fixed input.
GOLDEN = {
    "sign": ("c2739504ef46c7a3", "812101d68551e31c"),
    "sparse": ("58360dfa8502a687", "fec28d80d462f4bc"),
}


@pytest.mark.parametrize("projection", ["sign", "sparse"])
def test_golden_bytes(projection):
    """The generator is specified: these bytes must never change on any OS or CPU."""
    fh = FlyHash(100, 4.0, 0.1, seed=12345, projection=projection)
    h = hashlib.sha256()
    for _, v in sorted(fh.projection_arrays().items()):
        h.update(v.tobytes())
    x = np.cos(np.arange(300, dtype=np.float32)).reshape(3, 100)
    codes = hashlib.sha256(fh.hash(x).tobytes()).hexdigest()[:16]
    assert (h.hexdigest()[:16], codes) == GOLDEN[projection]


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_every_level_gives_identical_bytes(projection):
    fh = FlyHash(200, 5.0, 0.05, seed=9, projection=projection)
    x = rand(40, 200)
    ref = fh.activations(x, level="scalar")
    for level in LEVELS:
        assert np.array_equal(fh.activations(x, level=level).view(np.uint32), ref.view(np.uint32))
        assert np.array_equal(fh.hash(x, level=level), fh.hash(x, level="scalar"))


def test_seeded_equals_sign_and_scalar_process_matches():
    x = rand(20, 300)
    sign = FlyHash(300, 4.0, 0.05, seed=77)
    seeded = FlyHash(300, 4.0, 0.05, seed=77, projection="seeded")
    assert np.array_equal(sign.hash(x), seeded.hash(x))
    assert np.array_equal(
        sign.projection_arrays()["sign_bits"], seeded.projection_arrays()["sign_bits"]
    )
    code = (
        "import numpy as np, hashlib; from neuropil.flyhash import FlyHash;"
        "x = np.random.default_rng(0).standard_normal((20, 300), dtype=np.float32);"
        "print(hashlib.sha256(FlyHash(300, 4.0, 0.05, seed=77, projection='sparse')"
        ".hash(x).tobytes()).hexdigest())"
    )
    want = hashlib.sha256(
        FlyHash(300, 4.0, 0.05, seed=77, projection="sparse").hash(x).tobytes()
    ).hexdigest()
    for level in LEVELS:
        out = run_python(code, {"NEUROPIL_KERNEL": level})
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want


def _hash_in_child(args):
    fh, x = args
    return fh.hash(x)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_processes_encode_after_the_parent_did():
    # The parent's encode started the thread pool; a forked child (DataLoader
    # workers, multiprocessing's "fork") has none of its threads and its first
    # parallel encode waited for them forever.
    import multiprocessing

    fh = FlyHash(64, 8.0, 0.1, seed=5)
    x = rand(500, 64)
    want = fh.hash(x)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map_async(_hash_in_child, [(fh, x)] * 2).get(timeout=60)
    for g in got:
        assert np.array_equal(g, want)


def test_thread_count_does_not_change_codes(restore_threads):
    fh = FlyHash(64, 8.0, 0.05, seed=2, projection="sparse")
    x = rand(100, 64)
    neuropil.set_num_threads(1)
    one = fh.hash(x)
    neuropil.set_num_threads(3)
    assert np.array_equal(one, fh.hash(x))


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    fh = FlyHash(16, 4.0, 0.25, seed=0)
    with pytest.raises(neuropil.ShapeError, match=r"x must have shape \(n, 16\); got \(2, 15\)"):
        fh.encode(np.zeros((2, 15), np.float32))
    with pytest.raises(neuropil.ShapeError, match=r"\(d,\) or \(n, d\)"):
        fh.encode(np.zeros((2, 2, 16), np.float32))
    bad = np.zeros((3, 16), np.float32)
    bad[1, 4] = np.nan
    with pytest.raises(neuropil.ArgumentError, match=r"finite.*NaN at flat index 20"):
        fh.hash(bad)
    bad[1, 4] = np.inf
    with pytest.raises(neuropil.ArgumentError, match="inf"):
        fh.encode_indices(bad)
    with pytest.raises(neuropil.DTypeError, match="float32"):
        fh.encode(np.zeros((2, 16), np.int64))
    # A batch of no rows is an empty result (test_an_empty_batch_...), a
    # zero-width one is not a batch of this encoder's inputs.
    with pytest.raises(neuropil.ShapeError, match=r"\(n, 16\); got \(0, 0\)"):
        fh.encode(np.zeros((0, 0), np.float32))
    with pytest.raises(neuropil.ArgumentError, match="level"):
        fh.encode(np.zeros((1, 16), np.float32), level="sse9")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"expansion_ratio": 0.01}, r"expansion_ratio must be large enough.*output_dim = 0"),
        ({"expansion_ratio": float("nan")}, "expansion_ratio must be a finite number"),
        ({"active_fraction": 0.0}, r"active_fraction must be a number in \(0, 1\]"),
        ({"active_fraction": 0.001}, r"at least 1 active output.*active_bits = 0"),
        ({"active_fraction": 1.5}, r"active_bits <= output_dim = 64"),
        (
            {"projection": "sparse", "connectivity": 0.0},
            r"connectivity must be a number in \(0, 1\]",
        ),
        ({"projection": "sparse", "connectivity": 1.01}, r"connectivity"),
        ({"projection": "sparse", "connectivity": 0.01}, r"at least 1 connection"),
        ({"binary": True}, "binary must be False unless projection='sparse'"),
        ({"projection": "dense"}, "projection must be one of"),
        ({"seed": -1}, r"seed must be an integer in \[0, "),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"binary": 1}, "binary must be True or False"),
    ],
)
def test_bad_parameters(kwargs, pattern):
    args = {"input_dim": 16, "expansion_ratio": 4.0, "active_fraction": 0.1, "seed": 0}
    with pytest.raises(neuropil.ArgumentError, match=pattern):
        FlyHash(**{**args, **kwargs})


def test_oversized_requests_fail_before_allocating():
    # The argument that made the projection too big (input_dim: too big even
    # at expansion_ratio=1), the 8 GiB limit and the bytes it would need (was
    # "expansion_ratio must be at most 8 GiB" for a huge input_dim)
    with pytest.raises(neuropil.ArgumentError) as e:
        FlyHash(1_000_000, 100_000.0, seed=0)
    assert str(e.value) == (
        "input_dim must be small enough for the sign projection to fit in 8 GiB (8589934592 "
        "bytes); got 1000000 (with expansion_ratio=100000.0: output_dim = 100000000000, "
        "a projection of 12500000000000000 bytes)"
    )
    with pytest.raises(neuropil.ArgumentError) as e:
        FlyHash(64, 1e9, seed=0)
    assert str(e.value).startswith(
        "expansion_ratio must be small enough for the sign projection to fit in 8 GiB"
    )
    assert str(e.value).endswith(
        "got 1000000000.0 (with input_dim=64: output_dim = 64000000000, a projection of "
        "512000000000 bytes)"
    )
    with pytest.raises(neuropil.ArgumentError, match=r"^input_dim must .* got 4611686018427387904"):
        FlyHash(2**62, seed=0)
    # no weights to store: the limit is the output indices' (u32)
    with pytest.raises(neuropil.ArgumentError) as e:
        FlyHash(10, 4e9, seed=0, projection="seeded")
    assert str(e.value) == (
        "expansion_ratio must be small enough for output_dim = floor(input_dim * "
        "expansion_ratio) to be at most 4294967295 (u32 output indices); got 4000000000.0 "
        "(with input_dim=10: output_dim = 40000000000)"
    )
    with pytest.raises(neuropil.ArgumentError, match=r"at most 65535 for projection='sparse'"):
        FlyHash(70_000, 1.0, seed=0, projection="sparse")
    fh = FlyHash(1, 3e8, 0.5, seed=0, projection="seeded")
    with pytest.raises(neuropil.ArgumentError, match="8 GiB"):
        fh.encode(np.zeros((10, 1), np.float32))  # (10, 3e8) float32 = 11 GiB


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_oversized_output_is_refused_before_the_input_is_converted(dtype):
    # A broadcast (or strided, or float64) x is copied to float32 C order before
    # encoding; the output limit used to be checked only after that copy, so a
    # huge n allocated (here 10 MB, at scale the whole input again) to then fail.
    import tracemalloc

    fh = FlyHash(64, 1000.0, 0.05, seed=0, projection="seeded")  # m = 64000, nothing stored
    n = (8 << 30) // (fh.output_dim * 4) + 1  # (n, m) float32 is just over 8 GiB
    x = np.broadcast_to(np.ones(64, dtype), (n, 64))  # no memory of its own
    tracemalloc.start()
    try:
        with pytest.raises(neuropil.ArgumentError, match="8 GiB"):
            fh.encode(x)
        with pytest.raises(neuropil.ArgumentError, match="8 GiB"):
            fh.activations(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * 64 * 4 // 10, peak
    # The packed codes of the same rows are small: they are computed.
    assert fh.hash(x[:3]).shape == (3, fh.code_bytes)


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_save_load_round_trip(tmp_path, projection):
    fh = FlyHash(50, 5.0, 0.1, seed=4, projection=projection, connectivity=0.3)
    path = tmp_path / "fh.safetensors"
    fh.save(path)
    back = FlyHash.load(path)
    assert repr(back) == repr(fh)
    x = rand(10, 50)
    assert np.array_equal(back.hash(x), fh.hash(x))
    assert not list(tmp_path.glob(".*tmp"))


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_malformed_files_raise_format_error(tmp_path):
    fh = FlyHash(50, 5.0, 0.1, seed=4, projection="sparse")
    good = tmp_path / "good.safetensors"
    fh.save(good)
    raw = good.read_bytes()
    cases = {
        "truncated": lambda p: p.write_bytes(raw[: len(raw) // 2]),
        "garbage": lambda p: p.write_bytes(b"\x00" * 5),
        "flipped": lambda p: p.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1])),
        "version": lambda p: (
            p.write_bytes(raw),
            _rewrite_header(p, lambda h: h["__metadata__"].update(format_version="99")),
        ),
        "seed": lambda p: (
            p.write_bytes(raw),
            _rewrite_header(p, lambda h: h["__metadata__"].update(seed="5")),
        ),
        "unknown": lambda p: (
            p.write_bytes(raw),
            _rewrite_header(p, lambda h: h["__metadata__"].update(extra="1")),
        ),
        "no-field": lambda p: (
            p.write_bytes(raw),
            _rewrite_header(p, lambda h: h["__metadata__"].pop("input_dim")),
        ),
        "bad-number": lambda p: (
            p.write_bytes(raw),
            _rewrite_header(p, lambda h: h["__metadata__"].update(active_fraction="lots")),
        ),
        "bad-config": lambda p: (
            p.write_bytes(raw),
            _rewrite_header(p, lambda h: h["__metadata__"].update(connectivity="2.0")),
        ),
    }
    for name, make in cases.items():
        path = tmp_path / f"{name}.safetensors"
        make(path)
        with pytest.raises(neuropil.FormatError):
            FlyHash.load(path)
    ix = BinaryIndex(8)
    ix.save(tmp_path / "ix.safetensors")
    with pytest.raises(neuropil.FormatError, match=r"format must be \"neuropil.FlyHash\""):
        FlyHash.load(tmp_path / "ix.safetensors")
    with pytest.raises(neuropil.FormatError):
        BinaryIndex.load(good)
    # A later format says what to do; an earlier or malformed one what was found.
    for found, message in [
        ("99", r"format_version 99 is newer than this neuropil \(.+\) reads \(up to 1\): upgrade"),
        ("0", r'format_version must be "1"; got "0"'),
        ("01", r'format_version must be "1"; got "01"'),
    ]:
        path = tmp_path / f"v{found}.safetensors"
        path.write_bytes(raw)
        _rewrite_header(path, lambda h, v=found: h["__metadata__"].update(format_version=v))
        with pytest.raises(neuropil.FormatError, match=message):
            FlyHash.load(path)


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "fh.safetensors"
    FlyHash(10, 2.0, 0.5, seed=1).save(path)
    before = path.read_bytes()
    with pytest.raises(FileNotFoundError, match=r"missing-dir"):
        FlyHash(10, 2.0, 0.5, seed=2).save(tmp_path / "missing-dir" / "fh.safetensors")
    FlyHash(10, 2.0, 0.5, seed=2).save(path)  # replaces the old file in one rename
    assert path.read_bytes() != before
    assert FlyHash.load(path).seed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fh.safetensors"]
    with pytest.raises(FileNotFoundError, match="nope"):
        FlyHash.load(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- BinaryIndex


def brute(codes, queries, metric):
    a = np.unpackbits(codes, axis=1).astype(np.int64)
    b = np.unpackbits(queries, axis=1).astype(np.int64)
    inter = b @ a.T
    if metric == "hamming":
        return b.sum(1)[:, None] + a.sum(1)[None, :] - 2 * inter
    union = b.sum(1)[:, None] + a.sum(1)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        j = 1 - inter.astype(np.float32) / union.astype(np.float32)
    return np.where(union == 0, 0.0, np.maximum(j, 0)).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(
    nbytes=st.integers(1, 80),
    n=st.integers(0, 60),
    nq=st.integers(1, 10),
    k=st.integers(1, 80),
    metric=st.sampled_from(["hamming", "jaccard"]),
    seed=st.integers(0, 1000),
)
def test_search_matches_brute_force(nbytes, n, nq, k, metric, seed):
    rng = np.random.default_rng(seed)
    # Sparse-ish codes make equal distances (ties) frequent.
    codes = (rng.random((n, nbytes * 8)) < 0.1).astype(np.uint8)
    codes = np.packbits(codes, axis=1, bitorder="little")
    queries = np.packbits(rng.random((nq, nbytes * 8)) < 0.1, axis=1, bitorder="little")
    ix = BinaryIndex(nbytes * 8)
    ix.add(codes)
    want = brute(codes, queries, metric)
    for level in LEVELS:
        dist, ids = ix._native.search(queries, k, metric, level)
        for q in range(nq):
            order = np.argsort(want[q], kind="stable")[:k]
            got = min(k, n)
            assert np.array_equal(ids[q, :got], order)
            assert np.array_equal(dist[q, :got], want[q, order])
            assert (ids[q, got:] == -1).all()
    if n:
        lims, d, i = ix.range_search(queries, 3)
        assert lims[0] == 0 and len(lims) == nq + 1 and lims[-1] == len(d) == len(i)
        hw = brute(codes, queries, "hamming")
        for q in range(nq):
            expect = sorted(zip(hw[q][hw[q] <= 3], np.flatnonzero(hw[q] <= 3), strict=True))
            assert (
                list(zip(d[lims[q] : lims[q + 1]], i[lims[q] : lims[q + 1]], strict=True)) == expect
            )


def test_index_matches_faiss_and_round_trips(tmp_path):
    faiss = pytest.importorskip("faiss")
    fh = FlyHash(64, 16.0, 0.05, seed=0, projection="sparse", binary=True)
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    codes = fh.hash(x - x.mean(1, keepdims=True))
    ix = BinaryIndex(fh.output_dim)
    ix.add(codes)
    fx = faiss.IndexBinaryFlat(fh.output_dim)
    fx.add(codes)
    d, _ = ix.search(codes[:50], 10)
    fd, _ = fx.search(codes[:50], 10)
    assert np.array_equal(d, fd)
    lims, rd, ri = ix.range_search(codes[:20], 30)
    flims, frd, fri = fx.range_search(codes[:20], 31)
    assert np.array_equal(lims, flims.astype(np.int64))
    for q in range(20):
        s = slice(lims[q], lims[q + 1])
        assert sorted(zip(ri[s], rd[s], strict=True)) == sorted(zip(fri[s], frd[s], strict=True))
    path = tmp_path / "ix.safetensors"
    assert ix.remove([0, 1, 2, 10**9]) == 3
    ix.save(path)
    back = BinaryIndex.load(path)
    assert len(back) == len(x) - 3
    assert np.array_equal(back.search(codes[:5], 4)[1], ix.search(codes[:5], 4)[1])
    assert 0 not in back.search(codes[:1], 5)[1]
    back.add(codes[:1])
    assert back.contents()[1][-1] == len(x)  # ids are never reused


def test_index_bad_input():
    ix = BinaryIndex(12)
    with pytest.raises(neuropil.ShapeError, match=r"codes must have shape \(n, 2\) for 12 bits"):
        ix.add(np.zeros((3, 3), np.uint8))
    with pytest.raises(neuropil.DTypeError, match="uint8"):
        ix.add(np.zeros((3, 2), np.int32))
    with pytest.raises(neuropil.ArgumentError, match="bits set past bit 12"):
        ix.add(np.array([[0, 0x10]], np.uint8))
    ix.add(np.zeros((2, 2), np.uint8))
    with pytest.raises(neuropil.ArgumentError, match="k must be an integer >= 1"):
        ix.search(np.zeros((1, 2), np.uint8), 0)
    with pytest.raises(neuropil.ArgumentError, match="metric"):
        ix.search(np.zeros((1, 2), np.uint8), 1, metric="cosine")
    with pytest.raises(neuropil.ShapeError, match="queries"):
        ix.search(np.zeros((1, 3), np.uint8), 1)
    with pytest.raises(neuropil.ArgumentError, match="ids must be non-negative"):
        ix.add(np.zeros((1, 2), np.uint8), ids=[-4])
    with pytest.raises(neuropil.ShapeError, match="ids"):
        ix.add(np.zeros((2, 2), np.uint8), ids=[1])
    with pytest.raises(neuropil.ArgumentError, match="nbits"):
        BinaryIndex(0)
    assert ix.remove([]) == 0 and len(ix) == 2


def test_index_ranges_end_at_their_documented_bounds():
    # nbits >= 1 (a 1-bit index works: ceil(1 / 8) = 1 byte, the top 7 bits clear);
    # max_distance runs up to 2**32 - 1 inclusive (everything is within it).
    ix = BinaryIndex(1)
    assert (ix.nbits, ix.code_bytes) == (1, 1)
    ix.add(np.array([[1], [0]], np.uint8))
    assert repr(ix) == "BinaryIndex(nbits=1, len=2)"
    with pytest.raises(neuropil.ArgumentError, match="bits set past bit 1"):
        ix.add(np.array([[2]], np.uint8))
    lims, d, ids = ix.range_search(np.array([[1]], np.uint8), 2**32 - 1)
    assert lims.tolist() == [0, 2] and d.tolist() == [0, 1] and ids.tolist() == [0, 1]
    with pytest.raises(
        neuropil.ArgumentError, match=rf"max_distance must be an integer in \[0, {2**32 - 1}\]"
    ):
        ix.range_search(np.array([[1]], np.uint8), 2**32)


def test_index_takes_uint64_ids_by_value_and_names_dtypes_plainly():
    # uint64 ids (np.arange(n, dtype=np.uint64)) were refused as "not an integer
    # array": numpy's safe casting never allows uint64 -> int64.
    ix = BinaryIndex(8)
    ix.add(np.arange(3, dtype=np.uint8)[:, None], ids=np.array([7, 2**62, 9], np.uint64))
    assert ix.contents()[1].tolist() == [7, 2**62, 9]
    assert ix.remove(np.array([9, 2**64 - 1], np.uint64)) == 1
    # Past int64 (refused in Python, before the cast wraps it) and int64's
    # largest value (refused by the core: the next automatic id needs room)
    # get the same message, which names the bound; one below it is taken.
    for bad in (2**64 - 1, 2**63, 2**63 - 1):
        with pytest.raises(
            neuropil.ArgumentError,
            match=rf"ids must be non-negative integers below {2**63 - 1}; got {bad}$",
        ):
            ix.add(np.zeros((1, 1), np.uint8), ids=np.array([bad], np.uint64))
    assert len(ix) == 2
    ix.add(np.zeros((1, 1), np.uint8), ids=np.array([2**63 - 2], np.uint64))
    assert ix.contents()[1].tolist()[-1] == 2**63 - 2 and ix.remove([2**63 - 2]) == 1
    with pytest.raises(
        neuropil.DTypeError, match=r"must have dtype uint8 \(packed codes\); got int8"
    ):
        ix.add(np.zeros((1, 1), np.int8))
    with pytest.raises(neuropil.DTypeError, match=r"ids must have dtype int64 .*; got float64"):
        ix.add(np.zeros((1, 1), np.uint8), ids=[1.0])


def test_index_edge_cases_match_faiss():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    codes = np.packbits(rng.random((9, 64)) < 0.2, axis=1, bitorder="little")
    codes[4] = codes[1]  # ties: equal codes are ordered by id, as faiss orders them
    q = np.concatenate([codes[1:2], np.packbits(rng.random((3, 64)) < 0.2, 1, "little")])
    ix, fx = BinaryIndex(64), faiss.IndexBinaryFlat(64)
    for k in (3, 20):  # the empty index: every neighbour missing
        d, i = ix.search(q, k)
        fd, fi = fx.search(q, k)
        assert np.array_equal(d, fd) and np.array_equal(i, fi)
    lims, rd, ri = ix.range_search(q, 5)
    assert lims.tolist() == [0] * 5 and rd.size == ri.size == 0
    ix.add(codes)
    fx.add(codes)
    for k in (1, 9, 20):  # k > ntotal: ids -1 and distance 2**31 - 1, as in faiss
        d, i = ix.search(q, k)
        fd, fi = fx.search(q, k)
        assert d.dtype == fd.dtype and i.dtype == fi.dtype
        assert np.array_equal(d, fd) and np.array_equal(i, fi)
    for r in (0, 12, 64):
        lims, rd, ri = ix.range_search(q, r)
        flims, frd, fri = fx.range_search(q, r + 1)  # faiss's radius is exclusive
        assert np.array_equal(lims, flims.astype(np.int64))
        for j in range(len(q)):
            s, fs = slice(lims[j], lims[j + 1]), slice(flims[j], flims[j + 1])
            assert sorted(zip(rd[s], ri[s], strict=True)) == sorted(
                zip(frd[fs], fri[fs], strict=True)
            )
    d, i = ix.search(q[:0], 4)
    assert d.shape == i.shape == (0, 4)


# ---------------------------------------------------------------- torch


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_cpu_tensors():
    import torch

    fh = FlyHash(32, 4.0, 0.1, seed=0)
    x = rand(5, 32)
    t = torch.from_numpy(x)
    assert torch.equal(fh.encode(t), torch.from_numpy(fh.encode(x)))
    assert fh.encode_indices(t).dtype == torch.int64
    assert np.array_equal(fh.hash(t).numpy(), fh.hash(x))


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_torch_path_logic_on_cpu_tensors(projection):
    """The GPU code path, run on CPU tensors: same winners as the Rust core."""
    import torch

    from neuropil import _flyhash_torch

    fh = FlyHash(100, 6.0, 0.05, seed=3, projection=projection)
    x = rand(30, 100)
    t = torch.from_numpy(x)
    np.testing.assert_allclose(
        _flyhash_torch.encode(fh, t, "activations").numpy(), fh.activations(x), atol=1e-4
    )
    idx = _flyhash_torch.encode(fh, t, "encode_indices").numpy()
    same = (idx == fh.encode_indices(x)).all(axis=1)
    assert same.mean() >= 0.9
    codes = _flyhash_torch.encode(fh, t, "hash").numpy()
    assert np.array_equal(codes[same], fh.hash(x)[same])
    dense = _flyhash_torch.encode(fh, t, "encode").numpy()
    assert (np.count_nonzero(dense, axis=1) == fh.active_bits).all()
    zeros = torch.zeros((2, 100))
    assert np.array_equal(
        _flyhash_torch.encode(fh, zeros, "encode_indices")[0].numpy(), np.arange(fh.active_bits)
    )
    bad = t.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(neuropil.ArgumentError):
        _flyhash_torch.encode(fh, bad, "hash")
    with pytest.raises(neuropil.ShapeError):
        _flyhash_torch.encode(fh, t[:, :99], "hash")


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_torch_path_winners_run_in_steps_of_rows(monkeypatch):
    """The GPU path (run on CPU tensors) computed the (n, m) activations and
    sorted them whole for hash/encode_indices: 16 n m bytes (1M x 4992 outputs:
    80 GB) for outputs of n * 624 bytes. It now works in steps of rows."""
    import torch

    from neuropil import _flyhash_torch

    fh = FlyHash(40, 5.0, 0.1, seed=4, projection="sparse")
    t = torch.from_numpy(rand(50, 40))
    whole = {w: _flyhash_torch.encode(fh, t, w) for w in ("hash", "encode", "encode_indices")}
    seen = []
    real = _flyhash_torch.activations

    def spy(fh_, x):
        seen.append(x.shape[0])
        return real(fh_, x)

    monkeypatch.setattr(_flyhash_torch, "activations", spy)
    monkeypatch.setattr(_flyhash_torch, "_STEP_BYTES", 16 * fh.output_dim * 8, raising=False)
    got = {}
    for want in whole:
        seen.clear()
        got[want] = _flyhash_torch.encode(fh, t, want)
        assert got[want].dtype == whole[want].dtype, want
        assert max(seen) <= 8 and sum(seen) == 50, (want, seen)
    # On CPU the codes are the same, bit for bit. The activations may differ
    # in the last bits (the matmul's blocking follows the row count), no more.
    assert torch.equal(got["hash"], whole["hash"])
    assert torch.equal(got["encode_indices"], whole["encode_indices"])
    assert torch.equal(got["encode"] != 0, whole["encode"] != 0)
    torch.testing.assert_close(got["encode"], whole["encode"], atol=0, rtol=4e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("projection", PROJECTIONS)
def test_cuda_codes_match_cpu(projection):
    import torch

    fh = FlyHash(1536, 13.0, 0.05, seed=42, projection=projection)
    x = rand(64, 1536)
    xc = torch.from_numpy(x).cuda()
    acts = fh.activations(x)
    gpu_acts = fh.activations(xc)
    assert gpu_acts.device.type == "cuda"
    np.testing.assert_allclose(gpu_acts.cpu().numpy(), acts, atol=2e-3, rtol=1e-5)
    gpu = fh.encode_indices(xc).cpu().numpy()
    cpu = fh.encode_indices(x).astype(np.int64)
    k = fh.active_bits
    for r in np.flatnonzero((gpu != cpu).any(axis=1)):
        # A differing row must be a float near-tie at the threshold.
        s = np.sort(acts[r])[::-1]
        assert s[k - 1] - s[k] < 1e-3, (r, s[k - 1], s[k])
    assert (gpu == cpu).all(axis=1).mean() >= 0.9
    codes = fh.hash(xc)
    assert codes.dtype == torch.uint8 and codes.device.type == "cuda"
    same = (codes.cpu().numpy() == fh.hash(x)).all(axis=1)
    assert np.array_equal(same, (gpu == cpu).all(axis=1))


# ---------------------------------------------------------------- quality, bench, tour


def test_quality_protocol_on_digits_beats_lsh():
    from neuropil import _flyhash_quality

    res = _flyhash_quality.evaluate(_flyhash_quality.digits(), ks=(4,), n_queries=60, repeats=2)
    assert set(res) == set(_flyhash_quality.METHODS)
    assert all(0.0 <= float(v[0]) <= 1.0 for v in res.values())
    # The paper's claim at a short hash length, by a wide margin here (~0.56 vs ~0.35).
    assert res["FlyHash"][0] > res["LSH"][0] + 0.1


def test_quality_standardize_follows_the_papers_code():
    from neuropil import _flyhash_quality

    x = np.array([[-1.0, 2.0, 0.0], [1.0, 0.0, 3.0], [3.0, 4.0, 1.0]])
    s = _flyhash_quality.standardize(x)
    # Columns shifted by |min| (so >= 0), rows scaled to mean 100, truncated.
    assert np.array_equal(s[0], np.trunc(np.array([0.0, 2.0, 0.0]) * 100 / (2 / 3)))
    assert (s >= 0).all() and np.allclose(s.mean(axis=1), 100, atol=1)
    assert np.array_equal(s, np.trunc(s))


def test_quality_average_precision_is_the_papers():
    from neuropil._flyhash_quality import _average_precision

    # The code's example: hits at 1, 4, 5, 6 of the predicted list -> avg(1/1, 2/4, 3/5, 4/6).
    pred = np.array([10, 0, 1, 11, 12, 13])
    ap = _average_precision(pred, np.array([10, 11, 12, 13, 14, 15]))
    assert ap == pytest.approx(np.mean([1, 2 / 4, 3 / 5, 4 / 6]))
    assert _average_precision(pred, np.array([99])) == 0.0


def test_quality_trials_are_paired_and_summarized():
    from neuropil import _flyhash_quality

    x = _flyhash_quality.digits()[:400]
    scores = _flyhash_quality.evaluate_trials(x, ks=(2, 8), n_queries=40, trials=3)
    assert all(s.shape == (3, 2) for s in scores.values())
    again = _flyhash_quality.evaluate_trials(x, ks=(2, 8), n_queries=40, trials=3)
    assert all(np.array_equal(scores[k], again[k]) for k in scores)  # seeded
    summ = _flyhash_quality.summarize(scores)
    diff = scores["FlyHash"] - scores["LSH"]
    assert np.allclose(summ["FlyHash - LSH"], diff.mean(axis=0))
    assert np.allclose(summ["FlyHash - LSH se"], diff.std(axis=0, ddof=1) / np.sqrt(3))
    assert (summ["FlyHash - LSH"][0] > 0).all()  # k = 2: the fly's largest gain


@pytest.mark.slow
def test_quality_on_minilm_embeddings(minilm, sentences):
    from neuropil import _flyhash_quality

    emb = np.asarray(minilm.encode(sentences[:200], batch_size=64), dtype=np.float32)
    res = _flyhash_quality.evaluate(emb, ks=(4,), n_queries=60, repeats=3)
    assert res["FlyHash"][0] > res["LSH"][0]


def test_bench_quick_prints_every_figure(capsys):
    from neuropil import _bench

    assert _bench.run(["flyhash"], quick=True) == 0
    out = capsys.readouterr().out
    for needle in [
        "projection memory, sign",
        "encode sparse",
        "scalar",
        "numpy float32",
        "Hamming top-10",
        "faiss IndexBinaryFlat",
        "range search",
        "Jaccard",
    ]:
        assert needle in out, needle


def test_a_one_dimensional_input_of_the_wrong_length_names_both_shapes():
    from neuropil.neurons import SparseFFN

    fh = FlyHash(40, seed=0)
    with pytest.raises(ShapeError, match=r"x must have shape \(40,\) or \(n, 40\); got \(33,\)"):
        fh.encode(np.zeros(33, np.float32))
    rng = np.random.default_rng(0)
    ffn = SparseFFN(
        *(rng.standard_normal(s, dtype=np.float32) for s in ((96, 40), (96, 40), (40, 96)))
    )
    with pytest.raises(ShapeError, match=r"x must have shape \(40,\) or \(n, 40\); got \(33,\)"):
        ffn(np.zeros(33, np.float32))


# ---------------------------------------------------------------- pickle and deepcopy


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_flyhash_and_index_pickle_and_deepcopy(tmp_path, projection):
    import copy
    import pickle

    # Correlated inputs (a shared direction plus noise), as embeddings are.
    x = 0.3 * rand(300, 48, seed=5) + rand(1, 48, seed=6)
    fh = FlyHash(48, expansion_ratio=8.0, active_fraction=0.1, projection=projection)  # OS seed
    fh.save(tmp_path / "fh.safetensors")
    loaded = FlyHash.load(tmp_path / "fh.safetensors")
    binary = projection == "sparse"
    seeded = FlyHash(48, 8.0, 0.1, seed=2**64 - 1, projection=projection, binary=binary)
    for enc in (fh, loaded, seeded):
        fn, args = enc.__reduce__()  # the constructor call: plain data only
        assert fn is FlyHash and all(type(a) in (int, float, str, bool) for a in args)
        for back in (pickle.loads(pickle.dumps(enc)), copy.deepcopy(enc)):
            assert type(back) is FlyHash and back.seed == enc.seed and repr(back) == repr(enc)
            assert back.memory_bytes == enc.memory_bytes
            for name, arr in enc.projection_arrays().items():
                assert np.array_equal(back.projection_arrays()[name], arr)
            for want in ("hash", "encode", "encode_indices"):
                assert np.array_equal(getattr(back, want)(x), getattr(enc, want)(x))
    # A tampered constructor call is refused as the constructor refuses it.
    with pytest.raises(neuropil.ArgumentError):
        pickle.loads(pickle.dumps(_Call(FlyHash, (48, 8.0, 5.0, 1, projection, 0.1, False))))

    # BinaryIndex: custom ids, automatic ids after them, removals.
    codes = fh.hash(x)
    ix = BinaryIndex(fh.output_dim)
    ix.add(codes[:200], ids=np.arange(200) * 3 + 1000)
    ix.add(codes[200:290])  # automatic ids 1598.. (past the largest custom one)
    assert ix.remove([1000, 1015, 1600, 77]) == 3
    for back in (pickle.loads(pickle.dumps(ix)), copy.deepcopy(ix)):
        assert type(back) is BinaryIndex and len(back) == len(ix) == 287
        assert all(
            np.array_equal(a, b) for a, b in zip(back.contents(), ix.contents(), strict=True)
        )
        for metric in ("hamming", "jaccard"):
            for a, b in zip(
                back.search(codes[::7], 9, metric), ix.search(codes[::7], 9, metric), strict=True
            ):
                assert np.array_equal(a, b)
        for a, b in zip(
            back.range_search(codes[:5], 30), ix.range_search(codes[:5], 30), strict=True
        ):
            assert np.array_equal(a, b)
        # Independent, with the same next automatic id.
        back.add(codes[290:])
        assert back.contents()[1][-10:].tolist() == list(range(1688, 1698))
        assert back.remove([1015]) == 0 and back.remove([1003]) == 1
        assert len(ix) == 287 and ix.contents()[1][-1] == 1687 and 1003 in ix.contents()[1]
    # Corrupt states: FormatError, never a broken index.
    data = ix.__getstate__()["safetensors"]
    n = len(data) - 8 - int.from_bytes(data[:8], "little")  # bytes of tensor data
    header = json.loads(data[8 : len(data) - n])
    header["__metadata__"]["count"] = "288"  # codes must then be (288, ...): wrong shape
    raw = json.dumps(header).encode()
    bad_count = len(raw).to_bytes(8, "little") + raw + data[len(data) - n :]
    for state in (
        {"safetensors": bad_count},
        {"safetensors": data[:-3]},
        {"safetensors": data.replace(b"neuropil.BinaryIndex", b"neuropil.FlyHashXyzw")},
        {"safetensors": data.decode("latin-1")},
        {"codes": data},
        [data],
    ):
        with pytest.raises(neuropil.FormatError):
            unpickle_tampered(ix, state)


class _Call:
    """Pickles as ``fn(*args)``."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


EMPTY_OUTPUTS = {  # method: (width of a row, numpy dtype, torch dtype name)
    "encode": (lambda fh: fh.output_dim, np.float32, "float32"),
    "activations": (lambda fh: fh.output_dim, np.float32, "float32"),
    "encode_indices": (lambda fh: fh.active_bits, np.uint32, "int64"),
    "hash": (lambda fh: fh.code_bytes, np.uint8, "uint8"),
}


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("level", LEVELS)
def test_an_empty_batch_encodes_to_an_empty_output(projection, level):
    # As numpy and torch do for 0 rows: the (0, ...) output of the method's
    # dtype, not a ShapeError.
    fh = FlyHash(16, 8.0, 0.1, seed=1, projection=projection)
    for method, (width, dtype, _) in EMPTY_OUTPUTS.items():
        for x in (np.zeros((0, 16), np.float32), np.zeros((0, 16))):
            out = getattr(fh, method)(x, level=level)
            assert isinstance(out, np.ndarray)
            assert out.shape == (0, width(fh)) and out.dtype == dtype, method
    with pytest.raises(ShapeError, match=r"\(16,\) or \(n, 16\); got \(0,\)"):
        fh.encode(np.zeros(0, np.float32))
    with pytest.raises(ShapeError):
        fh.hash(np.zeros((0, 15), np.float32))


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_an_empty_torch_batch_encodes_to_an_empty_tensor():
    import torch

    from neuropil import _flyhash_torch

    fh = FlyHash(16, 8.0, 0.1, seed=1)
    for method, (width, _, tdtype) in EMPTY_OUTPUTS.items():
        for x in (torch.zeros(0, 16), torch.zeros(0, 16, dtype=torch.float64)):
            out = getattr(fh, method)(x)
            assert isinstance(out, torch.Tensor), method
            assert out.shape == (0, width(fh)) and out.dtype == getattr(torch, tdtype), method
        # The CUDA path's logic, on a CPU tensor.
        out = _flyhash_torch.encode(fh, torch.zeros(0, 16), method)
        assert out.shape == (0, width(fh)) and out.dtype == getattr(torch, tdtype), method
    with pytest.raises(ShapeError):
        _flyhash_torch.encode(fh, torch.zeros(0, 15), "hash")


def test_binary_index_answers_an_empty_batch_of_queries():
    fh = FlyHash(16, 8.0, 0.1, seed=1)
    ix = BinaryIndex(fh.output_dim)
    ix.add(fh.hash(rand(20, 16)))
    q = np.zeros((0, fh.code_bytes), np.uint8)
    for metric, dtype in (("hamming", np.int32), ("jaccard", np.float32)):
        d, i = ix.search(q, 3, metric=metric)
        assert d.shape == i.shape == (0, 3)
        assert (d.dtype, i.dtype) == (dtype, np.int64)
    lims, d, i = ix.range_search(q, 10)
    assert lims.tolist() == [0] and lims.dtype == np.int64
    assert (d.shape, d.dtype, i.shape, i.dtype) == ((0,), np.int32, (0,), np.int64)


_SAVE_BOTH = """
import sys
import numpy as np
from neuropil.flyhash import BinaryIndex, FlyHash
out = sys.argv[1] if len(sys.argv) > 1 else {out!r}
fh = FlyHash(40, 5.0, 0.1, seed=11, projection="sparse", connectivity=0.2)
fh.save(out + "/fh.safetensors")
FlyHash(40, 5.0, 0.1, seed=11, projection="seeded").save(out + "/seeded.safetensors")
ix = BinaryIndex(fh.output_dim)
ix.add(fh.hash(np.arange(200, dtype=np.float32).reshape(5, 40)), ids=[9, 4, 7, 1, 3])
ix.save(out + "/ix.safetensors")
"""


def test_saved_files_are_identical_across_processes(tmp_path):
    # The metadata header's key order once followed a per-process random hash
    # seed: the same object saved twice gave different bytes.
    names = ("fh.safetensors", "seeded.safetensors", "ix.safetensors")
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        out.mkdir()
        r = run_python(_SAVE_BOTH.format(out=str(out)))
        assert r.returncode == 0, r.stderr
        runs.append({name: (out / name).read_bytes() for name in names})
    assert runs[0] == runs[1]
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    for name in names:
        path = tmp_path / "0" / name
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert n % 8 == 0
        header = json.loads(raw[8 : 8 + n])
        meta = header["__metadata__"]
        assert list(meta) == sorted(meta)
        assert next(iter(header)) == "__metadata__"
        safetensors_numpy.load_file(path)  # the reference reader accepts it
    FlyHash.load(tmp_path / "0" / "fh.safetensors")
    FlyHash.load(tmp_path / "0" / "seeded.safetensors")
    ix = BinaryIndex.load(tmp_path / "0" / "ix.safetensors")
    assert len(ix) == 5

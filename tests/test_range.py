"""Exact range search (neuropil.range) and sparse attention (neuropil.hf)."""

from __future__ import annotations

import json
import math
import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neuropil
from conftest import unpickle_tampered
from neuropil import _native
from neuropil.range import METHODS, RangeIndex

LEVELS = _native.simd_levels()


def low_rank(n: int, d: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d))
    coef = rng.standard_normal((n, rank)) * (4.0 / np.arange(1, rank + 1))
    return (coef @ basis + 0.3 + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def brute(keys: np.ndarray, q: np.ndarray, t: np.ndarray):
    """float64 answers and the tie band of the module docstring."""
    s = q.astype(np.float64) @ keys.astype(np.float64).T
    tol = 2 * keys.shape[1] * 2.0**-24 * np.linalg.norm(q, axis=1)[:, None]
    tol = tol * np.linalg.norm(keys, axis=1)[None, :]
    return s >= t[:, None], np.abs(s - t[:, None]) <= tol


def as_mask(lims, ids, nq, n):
    m = np.zeros((nq, n), dtype=bool)
    for i in range(nq):
        m[i, ids[lims[i] : lims[i + 1]]] = True
    return m


def quantile_thresholds(keys, q, frac):
    s = q.astype(np.float64) @ keys.astype(np.float64).T
    k = max(1, int(frac * keys.shape[0]))
    return np.partition(s, -k, axis=1)[:, -k].astype(np.float32)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    d=st.integers(1, 48),
    rank=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    frac=st.floats(0.0, 0.3),
    method=st.sampled_from(METHODS),
    adds=st.lists(st.integers(1, 20), max_size=4),
)
def test_exact_against_brute_force_with_adds(n, d, rank, seed, frac, method, adds):
    total = n + sum(adds)
    keys = low_rank(total, d, rank, seed)
    ix = RangeIndex(keys[:n], method, rebuild_min=8, rebuild_fraction=0.2)
    pos = n
    for m in adds:
        ix.add(keys[pos : pos + m])
        pos += m
    assert len(ix) == total
    np.testing.assert_array_equal(ix.keys(), keys)
    q = low_rank(4, d, rank, seed + 1)
    t = quantile_thresholds(keys, q, frac)
    want, tie = brute(keys, q, t)
    flat = None
    for level in LEVELS:
        lims, ids, scores, _, _ = ix._native.search(q, t, level=level)
        got = as_mask(lims, ids, len(q), total)
        assert not np.any((got != want) & ~tie), (method, level)
        # Precision: every reported score reaches its threshold; ids ascend per query.
        for i in range(len(q)):
            assert np.all(scores[lims[i] : lims[i + 1]] >= t[i])
            assert np.all(np.diff(ids[lims[i] : lims[i + 1]]) > 0)
        # Bit-identical across levels and methods.
        if flat is None:
            flat = RangeIndex(keys, "flat")._native.search(q, t, level=level)
        assert np.array_equal(ids, flat[1]) and np.array_equal(scores, flat[2])


@pytest.mark.slow
def test_real_smollm2_keys_exact_and_pruned(tmp_path_factory, smollm2):
    """Real keys captured from SmolLM2 (post-RoPE) are answered exactly, reading few keys."""
    from neuropil._range_data import smollm2_keys, top_fraction_thresholds

    z = _cached_keys(tmp_path_factory, smollm2_keys, smollm2)
    for li, h in [(0, 0), (2, 1)]:
        k, q = z["keys"][li, h], z["queries"][li, h, :32]
        t = top_fraction_thresholds(k, q)
        want, tie = brute(k, q, t)
        for method in ("auto", "pca", "kmeans"):
            ix = RangeIndex(k, method)
            lims, ids, _ = ix.search(q, t)
            got = as_mask(lims, ids, len(q), len(k))
            assert not np.any((got != want) & ~tie), method
        ix = RangeIndex(k)
        ix.search(q, t)
        assert np.median(ix.last_scanned) < 0.2


_KEYS: dict[str, dict] = {}


def _cached_keys(tmp_path_factory, fn, model_and_tok):
    if "z" not in _KEYS:
        cache = tmp_path_factory.mktemp("keys")
        _KEYS["z"] = fn(2048, queries_per_head=32, model_and_tok=model_and_tok, cache=cache)
    return _KEYS["z"]


@pytest.mark.parametrize("method", METHODS)
def test_topk_matches_sorted_scores(method):
    keys = low_rank(500, 24, 3, 1)
    q = low_rank(5, 24, 3, 2)
    ix = RangeIndex(keys, method)
    ids, scores = ix.topk(q, 7)
    assert ids.shape == (5, 7) and scores.shape == (5, 7)
    s = q.astype(np.float64) @ keys.astype(np.float64).T
    for i in range(5):
        assert np.all(np.diff(scores[i]) <= 0)
        kth = np.sort(s[i])[-7]
        assert np.all(s[i, ids[i]] >= kth - 1e-4)


def test_save_load_roundtrip_and_atomic(tmp_path):
    keys = low_rank(300, 16, 3, 5)
    ix = RangeIndex(keys, "kmeans", seed=7, leaf=32)
    ix.add(low_rank(3, 16, 3, 6))
    path = tmp_path / "ix.safetensors"
    ix.save(path)
    back = RangeIndex.load(path)
    assert back.method == "kmeans" and back.stats["seed"] == 7 and back.stats["leaf"] == 32
    np.testing.assert_array_equal(back.keys(), ix.keys())
    q = low_rank(3, 16, 3, 9)
    a, b = ix.search(q, 1.0), back.search(q, 1.0)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not list(tmp_path.glob("*.tmp"))


def _rewrite(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h: h["__metadata__"].update(format_version="99"),
        lambda h: h["__metadata__"].update(format="other"),
        lambda h: h["__metadata__"].update(leaf="many"),
        lambda h: h["__metadata__"].update(method="hnsw"),
        lambda h: h["keys"].update(shape=[999, 16]),
        lambda h: h["keys"].update(dtype="I8"),
        lambda h: h.pop("keys"),
    ],
)
def test_malformed_files_raise_format_error(tmp_path, mutate):
    path = tmp_path / "ix.safetensors"
    RangeIndex(low_rank(50, 16, 2, 1)).save(path)
    _rewrite(path, mutate)
    with pytest.raises(neuropil.FormatError):
        RangeIndex.load(path)


def test_a_newer_format_version_says_to_upgrade(tmp_path):
    path = tmp_path / "ix.safetensors"
    RangeIndex(low_rank(50, 16, 2, 1)).save(path)
    _rewrite(path, lambda h: h["__metadata__"].update(format_version="7"))
    with pytest.raises(neuropil.FormatError, match=r"format_version 7 is newer .*upgrade neuropil"):
        RangeIndex.load(path)


def test_keys_of_another_dtype_are_a_format_error(tmp_path):
    # A well-formed safetensors file, but float64 keys: load names the field and dtype.
    from neuropil import _safetensors

    path = tmp_path / "ix.safetensors"
    RangeIndex(low_rank(50, 16, 2, 1)).save(path)
    tensors, meta = _safetensors.load(path)
    _safetensors.save(path, {"keys": tensors["keys"].astype(np.float64)}, meta)
    with pytest.raises(neuropil.FormatError, match=r"keys must be float32 \(F32\); got float64"):
        RangeIndex.load(path)


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "ix.safetensors"
    RangeIndex(low_rank(50, 16, 2, 1)).save(path)
    raw = path.read_bytes()
    for bad in (raw[:5], raw[:-10], b"\xff" * 64):
        path.write_bytes(bad)
        with pytest.raises(neuropil.FormatError):
            RangeIndex.load(path)


def test_bad_input_errors():
    keys = low_rank(100, 8, 2, 1)
    ix = RangeIndex(keys)
    with pytest.raises(
        neuropil.ShapeError, match=r"queries must have shape \(nq, 8\).*got \(2, 7\)"
    ):
        ix.search(np.ones((2, 7), np.float32), [0.0, 0.0])
    with pytest.raises(neuropil.ShapeError, match="thresholds"):
        ix.search(np.ones((2, 8), np.float32), np.zeros(3, np.float32))
    bad = np.ones((2, 8), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(neuropil.ArgumentError, match="queries must be finite"):
        ix.search(bad, [0.0, 0.0])
    with pytest.raises(neuropil.ArgumentError, match="thresholds must be finite"):
        ix.search(np.ones((1, 8), np.float32), [np.inf])
    with pytest.raises(neuropil.ShapeError, match="keys must not be empty"):
        RangeIndex(np.zeros((0, 8), np.float32))
    k2 = keys.copy()
    k2[5, 0] = np.inf
    with pytest.raises(neuropil.ArgumentError, match="keys must be finite"):
        RangeIndex(k2)
    with pytest.raises(neuropil.DTypeError):
        RangeIndex(np.ones((4, 8), np.int32))
    with pytest.raises(neuropil.ArgumentError, match="method"):
        RangeIndex(keys, "hnsw")
    with pytest.raises(neuropil.ArgumentError, match="k must be between 1"):
        ix.topk(keys[:1], 101)
    with pytest.raises(neuropil.ShapeError, match=r"keys must have shape \(m, 8\)"):
        ix.add(np.ones((1, 9), np.float32))


def test_out_of_range_integers_and_thresholds_name_the_argument():
    keys = low_rank(100, 8, 2, 1)
    ix = RangeIndex(keys)
    for name, v in [("leaf", 2**64), ("branching", 2**70), ("rebuild_min", 2**64), ("seed", 2**64)]:
        with pytest.raises(neuropil.ArgumentError, match=rf"{name} must be an integer .*got {v}"):
            RangeIndex(keys, "kmeans", **{name: v})
    assert RangeIndex(keys, seed=2**64 - 1).stats["seed"] == 2**64 - 1
    for k in (2**64, 2**70, 0):
        with pytest.raises(neuropil.ArgumentError, match=rf"k must be between 1 .*got {k}"):
            ix.topk(keys[:2], k)
    assert ix.topk(keys[:2], np.int64(3))[0].shape == (2, 3)
    # A finite threshold beyond float32 is reported as given, not as inf.
    with pytest.raises(neuropil.ArgumentError, match=r"thresholds must be finite float32.*1e\+300"):
        ix.search(keys[:2], 1e300)
    with pytest.raises(neuropil.ArgumentError, match=r"-1e\+300 at flat index 1"):
        ix.search(keys[:2], np.array([0.0, -1e300]))


def test_lists_and_scalar_arrays_are_read_as_arrays_and_numbers():
    torch = pytest.importorskip("torch")
    keys = low_rank(200, 8, 2, 1)
    q = low_rank(3, 8, 2, 2)
    ix = RangeIndex(keys)
    want = ix.search(q, 1.5)
    from_lists = RangeIndex(keys.tolist())
    for got in (
        from_lists.search(q.tolist(), 1.5),
        ix.search(q, np.array(1.5)),  # 0-d: one threshold for all queries
        ix.search(q, np.float32(1.5)),
        ix.search(q, [1.5, 1.5, 1.5]),
    ):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    _, ids, _ = ix.search(torch.from_numpy(q), torch.tensor(1.5))
    np.testing.assert_array_equal(ids.numpy(), want[1])
    np.testing.assert_array_equal(from_lists.topk(q.tolist(), 3)[0], ix.topk(q, 3)[0])
    from_lists.add(keys[:2].tolist())
    assert len(from_lists) == 202
    with pytest.raises(neuropil.ShapeError, match="queries must have shape"):
        ix.search([[1.0] * 8, [1.0] * 7], 0.0)
    with pytest.raises(neuropil.ShapeError, match="thresholds must have shape"):
        ix.search(q, np.ones((3, 1)))


def test_bf16_and_f16_torch_tensors_are_read_as_float32():
    torch = pytest.importorskip("torch")
    keys = low_rank(300, 16, 3, 5)
    q = low_rank(4, 16, 3, 6)
    for dtype in (torch.bfloat16, torch.float16):
        k16 = torch.from_numpy(keys).to(dtype)
        q16 = torch.from_numpy(q).to(dtype)
        ref = RangeIndex(k16.float().numpy(), "flat")
        ix = RangeIndex(k16)
        ix.add(k16[:3])
        ref.add(k16[:3].float().numpy())
        lims, ids, _ = ix.search(q16, 2.0)
        want = ref.search(q16.float().numpy(), 2.0)
        assert isinstance(ids, torch.Tensor)
        np.testing.assert_array_equal(lims.numpy(), want[0])
        np.testing.assert_array_equal(ids.numpy(), want[1])
        np.testing.assert_array_equal(
            ix.topk(q16, 3)[0].numpy(), ref.topk(q16.float().numpy(), 3)[0]
        )


def test_scores_that_may_overflow_float32_are_rejected():
    rng = np.random.default_rng(7)
    big = (rng.standard_normal((500, 24)) * 1e20).astype(np.float32)
    q = (rng.standard_normal((4, 24)) * 1e20).astype(np.float32)
    for method in ("auto", "flat"):
        ix = RangeIndex(big, method)
        with pytest.raises(neuropil.ArgumentError, match=r"q \. k within float32.*max \|q\|"):
            ix.search(q, 0.0)
        with pytest.raises(neuropil.ArgumentError, match="within float32"):
            ix.topk(q, 3)
        # Large keys with small queries keep finite scores and stay exact.
        small = q * 1e-20
        ids, _ = ix.topk(small, 3)
        s = small.astype(np.float64) @ big.astype(np.float64).T
        np.testing.assert_array_equal(ids, np.argsort(-s, axis=1)[:, :3])
    # A large key appended later is taken into account.
    ix = RangeIndex(low_rank(100, 24, 2, 1))
    ix.search(q, 0.0)
    ix.add(big[:1])
    with pytest.raises(neuropil.ArgumentError, match="within float32"):
        ix.search(q, 0.0)


def test_the_overflow_check_refuses_a_product_just_past_float32():
    # max |q| * max |k| = 1.005 * 3.4e38 would give an Inf score: refused
    # (the check keeps a rounding slack of 2**-7 below the limit, never above);
    # 0.98 of it is answered, finite and exact.
    f32_max = float(np.finfo(np.float32).max)
    ix = RangeIndex(np.array([[2e19, 0.0], [0.0, 1.0]], np.float32), "flat")
    ok = np.array([[0.98 * f32_max / 2e19, 0.0]], np.float32)
    lims, ids, scores = ix.search(ok, 0.0)
    assert lims.tolist() == [0, 2] and ids.tolist() == [0, 1] and np.isfinite(scores).all()
    assert ix.topk(ok, 1)[0].tolist() == [[0]]
    bad = np.array([[1.005 * f32_max / 2e19, 0.0]], np.float32)
    for call in (lambda: ix.search(bad, 0.0), lambda: ix.topk(bad, 1)):
        with pytest.raises(neuropil.ArgumentError, match=r"within float32.*product 3\.42e\+38"):
            call()
    # The limit the message states is the one checked: a product under
    # float32's largest value but within the slack is refused, and said to be
    # over the limit (the message gave 3.403e+38 as the limit before).
    near = np.array([[0.995 * f32_max / 2e19, 0.0]], np.float32)
    with pytest.raises(neuropil.ArgumentError) as e:
        ix.search(near, 0.0)
    found = re.findall(r"<= ([\d.e+]+)\).*product ([\d.e+]+)", str(e.value))
    limit, product = (float(v) for v in found[0])
    assert product > limit and product < f32_max, str(e.value)


def test_dimension_and_repr_describe_the_index():
    ix = RangeIndex(low_rank(40, 6, 2, 0), "pca")
    assert (len(ix), ix.d, ix.method, ix.device) == (40, 6, "pca", "cpu")
    assert repr(ix) == "RangeIndex(n=40, d=6, method='pca', device='cpu')"
    assert ix.stats["seed"] == 0  # the default seed


def test_a_refused_add_keeps_the_core_error_and_the_overflow_bound():
    # add raises the key-norm bound before the core appends (so a search
    # beside it never sees keys beyond the bound, tests/test_concurrency.py):
    # keys the core refuses still get its error, and the bound goes back, so
    # searches of large queries keep the cheap check.
    ix = RangeIndex(low_rank(300, 8, 2, 1))
    bound = ix._key_bound
    q = np.full((2, 8), 1e18, np.float32)  # (fine with these keys; not with 1e30 ones)
    want = ix.search(q, 0.0)
    for bad, error, match in [
        (np.ones(8, np.float32), neuropil.ShapeError, r"\(m, d\); got \(8,\)"),
        (np.full((2, 9), 1e30, np.float32), neuropil.ShapeError, r"\(m, 8\) to match"),
        (np.full((2, 8), np.nan, np.float32), neuropil.ArgumentError, "finite"),
        (np.full((2, 8), np.inf, np.float32), neuropil.ArgumentError, "finite"),
        (np.array([["a"] * 8]), neuropil.DTypeError, "got <U1"),
        (np.ones((2, 8), np.int32), neuropil.DTypeError, "got int32"),
        ([[1e30] * 7], neuropil.ShapeError, r"got \(1, 7\)"),
    ]:
        with pytest.raises(error, match=match):
            ix.add(bad)
        assert ix._key_bound == bound and len(ix) == 300
    for a, b in zip(ix.search(q, 0.0), want, strict=True):
        np.testing.assert_array_equal(a, b)
    ix.add(np.zeros((0, 8), np.float32))  # (nothing appended)
    assert ix._key_bound == bound
    ix.add(np.full((1, 8), 1e30, np.float32))
    assert ix._key_bound >= 1e30 * math.sqrt(8)
    with pytest.raises(neuropil.ArgumentError, match="within float32"):
        ix.search(q, 0.0)


def test_torch_path_copies_and_pickles_with_a_lock_of_its_own():
    # The torch path (CUDA's; CPU tensors here) holds a lock for its adds: a
    # copy, a deep copy or an unpickled one gets a fresh lock (a lock does not
    # pickle) and its own keys.
    import copy
    import pickle

    torch = pytest.importorskip("torch")
    from neuropil.range import _TorchRange

    keys = torch.from_numpy(low_rank(100, 8, 2, 1))
    tr = _TorchRange(keys)
    tr.add(keys[:7] * 2)
    want = tr.snapshot()
    for other in (tr.copy(), copy.deepcopy(tr), pickle.loads(pickle.dumps(tr))):
        assert other._lock is not tr._lock and not other._lock.locked()
        got = other.snapshot()
        assert torch.equal(got[0], want[0]) and got[1:] == want[1:] == (107, want[2])
        other.add(keys[:3])
        assert other.snapshot()[1] == 110 and tr.snapshot()[1] == 107
    ix = RangeIndex(keys.numpy())
    ix._native, ix._torch = None, tr
    twin = ix._copy()
    assert twin._lock is not ix._lock and twin._torch._lock is not tr._lock
    twin.add(keys[:1])
    assert (len(twin), len(ix)) == (108, 107)
    assert torch.equal(ix.keys(), want[0]) and ix.keys() is not want[0]


def test_torch_cpu_inputs_give_tensors():
    torch = pytest.importorskip("torch")
    keys = low_rank(200, 16, 2, 3)
    ix = RangeIndex(torch.from_numpy(keys))
    _, ids, _ = ix.search(torch.from_numpy(keys[:2]), 5.0)
    assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64
    ref = ix.search(keys[:2], 5.0)
    np.testing.assert_array_equal(ids.numpy(), ref[1])


def test_stats_and_rebuild_policy():
    keys = low_rank(1000, 16, 3, 4)
    ix = RangeIndex(keys[:500], rebuild_min=64, rebuild_fraction=0.25)
    for i in range(500, 1000):
        ix.add(keys[i : i + 1])
    s = ix.stats
    assert s["n"] == 1000 and s["builds"] >= 2 and s["pending"] <= 0.25 * s["indexed"] + 64
    assert s["method"] == "auto"


@pytest.mark.cuda
def test_cuda_path_matches_cpu_sets():
    import torch

    keys = low_rank(5000, 64, 6, 1)
    q = low_rank(16, 64, 6, 2)
    t = quantile_thresholds(keys, q, 0.01)
    gpu = RangeIndex(torch.from_numpy(keys).cuda())
    lims, ids, _ = gpu.search(torch.from_numpy(q).cuda(), torch.from_numpy(t).cuda())
    assert ids.device.type == "cuda"
    want, tie = brute(keys, q, t)
    got = as_mask(lims.cpu().numpy(), ids.cpu().numpy(), len(q), len(keys))
    assert not np.any((got != want) & ~tie)
    gpu.add(torch.from_numpy(keys[:10]).cuda())
    assert len(gpu) == 5010
    tk_ids, _ = gpu.topk(torch.from_numpy(q).cuda(), 5)
    cpu_ids, _ = RangeIndex(np.concatenate([keys, keys[:10]])).topk(q, 5)
    assert (tk_ids.cpu().numpy()[:, 0] % 5000 == cpu_ids[:, 0] % 5000).all()


# ------------------------------------------------------------------- transformers
@pytest.mark.slow
def test_sparse_cache_generation(smollm2):
    import torch
    from transformers import DynamicCache

    from neuropil import hf

    model, tok = smollm2
    impl = model.config._attn_implementation
    texts = neuropil.data.real_sentences(12)
    side, tok.padding_side = tok.padding_side, "left"
    batch = tok([texts[0], texts[5] + " " + texts[6]], return_tensors="pt", padding=True)
    tok.padding_side = side
    single = tok(texts[1], return_tensors="pt")
    try:
        with torch.inference_mode():
            ref = model.generate(
                **single,
                max_new_tokens=6,
                do_sample=False,
                **hf.cache_kwargs(model, DynamicCache()),
            )
            ref_b = model.generate(
                **batch, max_new_tokens=4, do_sample=False, **hf.cache_kwargs(model, DynamicCache())
            )
            model.set_attn_implementation(hf.ATTENTION)
            # No threshold: token for token the same as DynamicCache + sdpa.
            dense = hf.SparseCache(model, None)
            got = model.generate(
                **single, max_new_tokens=6, do_sample=False, **hf.cache_kwargs(model, dense)
            )
            assert torch.equal(got, ref)
            # top-p 0.99, batch of 2 with padding, grouped-query attention (9 q / 3 kv heads).
            cache = hf.SparseCache(model, "top_p", top_p=0.99, window=4, sinks=2)
            got_b = model.generate(
                **batch, max_new_tokens=4, do_sample=False, **hf.cache_kwargs(model, cache)
            )
            assert (got_b == ref_b).float().mean() > 0.9
            s = cache.summary()
            assert s["steps"] == 3 and 0 < s["fraction_read"] < 1
            assert 0 <= s["dropped_bound"] <= 0.01 + 1e-6
            for strategy, kw in [("top_k", {"top_k": 8}), ("threshold", {"threshold": 0.0})]:
                c = hf.SparseCache(model, strategy, **kw)
                model.generate(
                    **single, max_new_tokens=3, do_sample=False, **hf.cache_kwargs(model, c)
                )
                assert c.summary()["steps"] == 2
                # reset empties the keys and the statistics: a new generation
                c.reset()
                assert c.get_seq_length() == 0 and c.summary()["steps"] == 0
                model.generate(
                    **single, max_new_tokens=2, do_sample=False, **hf.cache_kwargs(model, c)
                )
                assert c.summary()["steps"] == 1
            # The attention function without the cache: a clear error.
            with pytest.raises(neuropil.NeuropilError, match="SparseCache"):
                model.generate(
                    **single,
                    max_new_tokens=2,
                    do_sample=False,
                    **hf.cache_kwargs(model, DynamicCache()),
                )
    finally:
        model.set_attn_implementation(impl)
    # A model whose attention is not ours: the cache says what is missing.
    with pytest.raises(neuropil.NeuropilError, match="attn_implementation"):
        hf.SparseCache(model)
    with pytest.raises(neuropil.NeuropilError, match="config"):
        hf.SparseCache(object())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_sparse_decode_attention_torch_matches_dense(device):
    torch = pytest.importorskip("torch")
    from neuropil.hf import sparse_decode_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 1, 32, generator=g).to(device)
    k = torch.randn(2, 3, 300, 32, generator=g).to(device)
    v = torch.randn(2, 3, 300, 32, generator=g).to(device)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    ).transpose(1, 2)
    out, info = sparse_decode_attention(q, k, v, 32**-0.5, strategy=None)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    out, info = sparse_decode_attention(q, k, v, 32**-0.5, strategy="top_p", top_p=0.99)
    assert info["dropped_bound"] <= 0.01 + 1e-6
    assert (out - dense).abs().max() < 0.05


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("strategy", [None, "top_p", "top_k", "threshold"])
def test_sparse_decode_attention_with_a_fully_masked_row_matches_sdpa(device, strategy):
    # Row 0 may attend to nothing: torch's sdpa gives zeros there, and so must
    # we; the reported fraction covers the row that has keys, never nan.
    torch = pytest.importorskip("torch")
    from neuropil.hf import sparse_decode_attention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 1, 16, generator=g).to(device)
    k = torch.randn(2, 2, 50, 16, generator=g).to(device)
    v = torch.randn(2, 2, 50, 16, generator=g).to(device)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool, device=device)
    mask[0] = False
    mask[1, ..., :10] = False
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    ).transpose(1, 2)
    kw = {"threshold": 0.0} if strategy == "threshold" else {}
    out, info = sparse_decode_attention(
        q, k, v, 16**-0.5, strategy=strategy, sinks=0, window=1, attention_mask=mask, **kw
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(dense[0], torch.zeros_like(dense[0]))
    assert math.isfinite(info["fraction_read"]) and 0 < info["fraction_read"] <= 1
    if strategy is None:
        assert info["fraction_read"] == 1.0
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    mask[1] = False
    _, info = sparse_decode_attention(
        q, k, v, 16**-0.5, strategy=strategy, attention_mask=mask, **kw
    )
    assert info["fraction_read"] == 0.0


def _tiny_llama_config(heads=2, kv_heads=1):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )


def test_cpu_top_k_with_a_padding_mask_matches_the_torch_path():
    """Masked (padding) keys holding the best scores do not use up the top_k budget."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import types

    from neuropil import hf

    g = torch.Generator().manual_seed(0)
    n, d = 200, 16
    q = torch.randn(2, 2, 1, d, generator=g)
    k = torch.randn(2, 1, n, d, generator=g)
    v = torch.randn(2, 1, n, d, generator=g)
    k[0, :, :50] = q[0, 0, 0] * 5  # left padding of row 0, with the highest scores
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[0, ..., :50] = False
    for kw in [
        {"top_k": 8, "sinks": 0, "window": 0},
        {"top_k": 5, "sinks": 4, "window": 2},
        {"top_k": 300, "sinks": 0, "window": 0},  # more than the allowed keys
    ]:
        cache = hf.SparseCache(_tiny_llama_config(), "top_k", **kw)
        layer = cache.layers[0]
        layer.update(k[:, :, :-1], v[:, :, :-1])
        keys, values = layer.update(k[:, :, -1:], v[:, :, -1:])
        module = types.SimpleNamespace(layer_idx=0)
        out, _ = hf._attention(module, q, keys, values, mask, scaling=d**-0.5)
        ref, info = hf.sparse_decode_attention(
            q, keys, values, d**-0.5, strategy="top_k", attention_mask=mask, **kw
        )
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        summary = cache.summary()
        assert summary["fraction_read"] == pytest.approx(info["fraction_read"], rel=1e-5)
        assert summary["dropped_bound"] == pytest.approx(info["dropped_bound"], rel=1e-4, abs=1e-7)


def _layer_with(cache, k, v):
    """The cache's first layer after a prefill of all keys but the last and one decode update."""
    layer = cache.layers[0]
    layer.update(k[:, :, :-1], v[:, :, :-1])
    return layer.update(k[:, :, -1:], v[:, :, -1:])


@pytest.mark.parametrize("strategy", ["top_k", "top_p", "threshold"])
def test_a_left_padded_row_attends_as_the_same_row_unpadded(strategy):
    """The sinks are a row's first real tokens, not its padding, and padding does
    not widen top_p's margin: batching a prompt with a longer one (left padding)
    reads the same keys and gives the same output, on both paths."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import types

    from neuropil import hf

    g = torch.Generator().manual_seed(0)
    n, d, pad = 120, 16, 30
    q = torch.randn(1, 2, 1, d, generator=g)
    k = torch.randn(1, 1, n, d, generator=g)
    v = torch.randn(1, 1, n, d, generator=g)
    k[:, :, :3] += 2 * q[0, 0, 0]  # the first real tokens draw attention (sinks)
    kp = torch.cat([torch.randn(1, 1, pad, d, generator=g), k], 2)
    vp = torch.cat([torch.randn(1, 1, pad, d, generator=g), v], 2)
    mask = torch.ones(1, 1, 1, n + pad, dtype=torch.bool)
    mask[..., :pad] = False
    kw = {"top_k": {"top_k": 6}, "top_p": {"top_p": 0.9}, "threshold": {"threshold": 0.5}}
    kw = {**kw[strategy], "sinks": 3, "window": 2}
    got = []
    for keys, values, m in [(k, v, None), (kp, vp, mask)]:
        cache = hf.SparseCache(_tiny_llama_config(), strategy, **kw)
        keys, values = _layer_with(cache, keys, values)
        module = types.SimpleNamespace(layer_idx=0)
        out, _ = hf._attention(module, q, keys, values, m, scaling=d**-0.5)
        ref, info = hf.sparse_decode_attention(
            q, keys, values, d**-0.5, strategy=strategy, attention_mask=m, **kw
        )
        got.append((out, ref, cache.summary()["fraction_read"], info["fraction_read"]))
    (out, ref, f_cpu, f_torch), (out_p, ref_p, f_cpu_p, f_torch_p) = got
    torch.testing.assert_close(out_p, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref_p, ref, atol=1e-6, rtol=1e-6)
    assert f_cpu_p == pytest.approx(f_cpu) and f_torch_p == pytest.approx(f_torch, rel=1e-6)
    assert f_cpu_p == pytest.approx(f_torch_p, rel=1e-6)


@pytest.mark.parametrize("strategy", ["top_k", "top_p", "threshold"])
def test_cpu_path_with_a_fully_masked_row_matches_the_torch_path(strategy):
    # An all-padding row gives zeros (as sdpa), the other row its usual output.
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import types

    from neuropil import hf

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 1, 16, generator=g)
    k = torch.randn(2, 1, 50, 16, generator=g)
    v = torch.randn(2, 1, 50, 16, generator=g)
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[0] = False
    mask[1, ..., :10] = False
    kw = {"top_k": {"top_k": 5}, "top_p": {}, "threshold": {"threshold": 0.0}}[strategy]
    cache = hf.SparseCache(_tiny_llama_config(), strategy, sinks=2, window=1, **kw)
    keys, values = _layer_with(cache, k, v)
    out, _ = hf._attention(types.SimpleNamespace(layer_idx=0), q, keys, values, mask, scaling=0.25)
    ref, info = hf.sparse_decode_attention(
        q, keys, values, 0.25, strategy=strategy, sinks=2, window=1, attention_mask=mask, **kw
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert cache.summary()["fraction_read"] == pytest.approx(info["fraction_read"], rel=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cpu_path_in_half_precision_rounds_once(dtype):
    """bf16/f16 keys and values: the weighted sum runs in float32 and is rounded
    once, so with every key read the output is the correctly rounded attention
    (not the sum of products of rounded weights)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import types

    from neuropil import hf

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    n, d = 400, 16
    q = (torch.randn(1, 2, 1, d, generator=g) * 2).to(dt)
    k = torch.randn(1, 1, n, d, generator=g).to(dt)
    v = (torch.randn(1, 1, n, d, generator=g) + 3).to(dt)
    z = (q.double() @ k.double().transpose(-1, -2)) * d**-0.5
    exact = (torch.softmax(z, -1) @ v.double()).transpose(1, 2)
    cache = hf.SparseCache(_tiny_llama_config(), "threshold", threshold=-1e30, sinks=0, window=0)
    keys, values = _layer_with(cache, k, v)
    out, _ = hf._attention(
        types.SimpleNamespace(layer_idx=0), q, keys, values, None, scaling=d**-0.5
    )
    assert out.dtype == dt
    assert torch.equal(out, exact.to(dt))


def test_beam_reordering_and_crops_keep_the_indexes_without_rebuilding():
    """reorder_cache (beam search), batch_repeat_interleave and batch_select_indices
    carry each row's index along (a row taken twice gets a copy of it), a crop of
    keys no index holds keeps them, and the next decode step reads them as the
    torch path reads the keys."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import types

    from neuropil import hf

    g = torch.Generator().manual_seed(2)
    d = 16
    kw = {"top_k": 4, "sinks": 0, "window": 1}
    cache = hf.SparseCache(_tiny_llama_config(), "top_k", **kw)
    module = types.SimpleNamespace(layer_idx=0)
    layer = cache.layers[0]

    def step(rows):
        q = torch.randn(rows, 2, 1, d, generator=g)
        k, v = torch.randn(rows, 1, 1, d, generator=g), torch.randn(rows, 1, 1, d, generator=g)
        keys, values = layer.update(k, v)
        out, _ = hf._attention(module, q, keys, values, None, scaling=d**-0.5)
        ref, _ = hf.sparse_decode_attention(q, keys, values, d**-0.5, strategy="top_k", **kw)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    layer.update(torch.randn(3, 1, 300, d, generator=g), torch.randn(3, 1, 300, d, generator=g))
    step(3)
    old = [row[0] for row in layer.indexes]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    new = [row[0] for row in layer.indexes]
    assert new[0] is old[2] and new[1] is old[0] and new[2] is not old[0]
    assert new[2].stats["builds"] == old[0].stats["builds"]  # cloned, not rebuilt
    np.testing.assert_array_equal(new[2].keys(), old[0].keys())
    step(3)  # each row appends its own key: the copy and its original part
    assert len(new[1]) == len(new[2]) == 302
    assert not np.array_equal(new[1].keys()[-1], new[2].keys()[-1])
    cache.batch_repeat_interleave(2)
    assert [row[0] for row in layer.indexes][::2] == new
    step(6)
    cache.batch_select_indices(torch.tensor([5, 0]))
    step(2)
    assert len(layer.indexes) == 2 and all(len(row[0]) == 304 for row in layer.indexes)
    # Assisted decoding: a dense verification pass of 3 candidates, 2 rejected and
    # cropped. The indexes never held them, so they stay; a deeper crop drops them.
    kept = [row[0] for row in layer.indexes]
    layer.update(torch.randn(2, 1, 3, d, generator=g), torch.randn(2, 1, 3, d, generator=g))
    cache.crop(-2)
    assert [row[0] for row in layer.indexes] == kept
    step(2)
    assert all(len(row[0]) == 306 for row in layer.indexes)
    cache.crop(-3)
    assert layer.indexes == []
    step(2)


def test_layer_types_decide_and_unsupported_attention_is_refused():
    """A config whose layers are all full attention is accepted even when it
    carries a sliding_window no layer uses (and matches DynamicCache + sdpa);
    attention the sparse path cannot apply (learned sinks) and latent caches
    are refused with what they lack, never computed wrongly."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import (
        AutoModelForCausalLM,
        DeepseekV3Config,
        DynamicCache,
        GptOssConfig,
        MistralConfig,
        Qwen3Config,
    )

    from neuropil import hf

    small = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    ids = torch.randint(3, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    cfg = Qwen3Config(**small, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert cfg.layer_types == ["full_attention"] * 2 and cfg.sliding_window == 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(ids, **hf.cache_kwargs(model, DynamicCache())).logits
        model.set_attn_implementation(hf.ATTENTION)
        for strategy, kw in [(None, {}), ("threshold", {"threshold": -1e30})]:
            cache = hf.SparseCache(model, strategy, **kw)
            torch.testing.assert_close(
                model(ids, **hf.cache_kwargs(model, cache)).logits, ref, atol=1e-5, rtol=1e-5
            )
    with pytest.raises(neuropil.NeuropilError, match="sliding_attention"):
        hf.SparseCache(MistralConfig(**small, sliding_window=8))
    with pytest.raises(neuropil.NeuropilError, match="multi-head latent attention"):
        hf.SparseCache(DeepseekV3Config(**{**small, "num_key_value_heads": 4}, kv_lora_rank=8))
    cfg = GptOssConfig(
        **small, layer_types=["full_attention"] * 2, num_local_experts=2, num_experts_per_tok=1
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=hf.ATTENTION).eval()
    with torch.no_grad(), pytest.raises(neuropil.NeuropilError, match="attention sinks"):
        model.generate(ids, **gen, **hf.cache_kwargs(model, hf.SparseCache(model)))


def test_generate_journeys_read_as_the_torch_path():
    """Greedy, beam search, several return sequences, left-padded batches, prompt
    lookup (crop) and continuing from the returned cache: at every decode step
    the CPU path (range search over the per-row indexes) gives what the torch
    path computes from the keys; with every key read, the tokens of sdpa."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AttentionInterface, DynamicCache, LlamaForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from neuropil import hf

    cfg = _tiny_llama_config(heads=4, kv_heads=2)
    cfg.num_hidden_layers = 2
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked attention, so the strategies drop keys
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 6
            layer.self_attn.k_proj.weight *= 6
    worst = []

    def checked(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, w = hf._attention(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        c = key._neuropil_layer.cache
        if query.shape[2] == 1 and c.strategy is not None:
            ref, _ = hf.sparse_decode_attention(
                query, key, value, float(scaling), strategy=c.strategy, top_p=c.top_p,
                top_k=c.top_k, threshold=c.threshold, sinks=c.sinks, window=c.window,
                attention_mask=attention_mask,
            )  # fmt: skip
            worst.append(float((out - ref).abs().max()))
        return out, w

    # (the caches are made from the config: the model runs this wrapper, not ATTENTION)
    AttentionInterface.register("neuropil_test_checked", checked)
    AttentionMaskInterface.register("neuropil_test_checked", sdpa_mask)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    journeys = {
        "greedy": ({"input_ids": ids, "attention_mask": mask}, {}),
        "beams": ({"input_ids": ids, "attention_mask": mask}, {"num_beams": 3}),
        "samples": ({"input_ids": ids[:1]}, {"do_sample": True, "num_return_sequences": 3}),
        "lookup": ({"input_ids": ids[:1]}, {"prompt_lookup_num_tokens": 3}),
    }
    strategies = [("top_k", {"top_k": 5, "sinks": 2, "window": 2}), ("top_p", {"top_p": 0.9})]
    with torch.no_grad():
        for name, (inputs, kw) in journeys.items():
            gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kw}
            model.set_attn_implementation("sdpa")
            torch.manual_seed(3)
            ref = model.generate(**inputs, **gen, **hf.cache_kwargs(model, DynamicCache()))
            model.set_attn_implementation("neuropil_test_checked")
            for strategy, skw in [("threshold", {"threshold": -1e30}), *strategies]:
                cache = hf.SparseCache(model.config, strategy, **skw)
                torch.manual_seed(3)
                out = model.generate(**inputs, **gen, **hf.cache_kwargs(model, cache))
                if strategy == "threshold":
                    assert torch.equal(out, ref), name
                assert worst and max(worst) < 1e-5, (name, strategy)
                worst.clear()
        # Continue from the returned cache, then after cropping it.
        cache = hf.SparseCache(model.config, "top_k", top_k=5, sinks=2, window=2)
        out = model.generate(ids[:1], max_new_tokens=5, **hf.cache_kwargs(model, cache))
        more = torch.cat([out, ids[:1, :3]], 1)
        out = model.generate(more, max_new_tokens=5, **hf.cache_kwargs(model, cache))
        assert cache.get_seq_length() == out.shape[1] - 1
        cache.crop(-4)
        model.generate(out[:, : cache.get_seq_length() + 1], max_new_tokens=3,
                       **hf.cache_kwargs(model, cache))  # fmt: skip
        assert worst and max(worst) < 1e-5


def test_hf_arguments_are_checked_up_front():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from neuropil import hf

    cfg = _tiny_llama_config()
    bad_cache = [
        ({"strategy": "top_k", "top_k": True}, "top_k must be a positive integer; got True"),
        ({"strategy": "top_k", "top_k": 2.0}, "top_k must be a positive integer; got 2.0"),
        ({"strategy": "top_k", "top_k": 0}, "top_k must be a positive integer; got 0"),
        ({"sinks": 2.5}, "sinks must be an integer >= 0; got 2.5"),
        ({"window": 4.0}, "window must be an integer >= 0; got 4.0"),
        ({"window": -1}, "window must be an integer >= 0; got -1"),
        ({"sinks": None}, "sinks must be an integer >= 0; got None"),
        ({"method": "bogus"}, "method must be one of .*; got 'bogus'"),
        ({"strategy": "bogus"}, "strategy must be one of .*; got 'bogus'"),
        ({"top_p": "0.5"}, r"top_p must be a number in \(0, 1\); got '0.5'"),
        ({"strategy": "threshold", "threshold": "1"}, "threshold must be a finite logit"),
    ]
    for kw, message in bad_cache:
        with pytest.raises(neuropil.ArgumentError, match=message):
            hf.SparseCache(cfg, **kw)
    cache = hf.SparseCache(cfg, "top_k", top_k=np.int64(4), sinks=np.int32(2), window=np.int64(3))
    assert (cache.top_k, cache.sinks, cache.window) == (4, 2, 3)
    assert type(cache.top_k) is int
    assert hf.SparseCache(cfg, "threshold", threshold=np.float32(1.5)).threshold == 1.5

    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 20, 8), torch.randn(1, 1, 20, 8)
    bad_call = [
        ({"strategy": "bogus"}, neuropil.ArgumentError, "strategy must be one of"),
        ({"strategy": "top_p", "top_p": 1.5}, neuropil.ArgumentError, "top_p must be a number"),
        ({"strategy": "top_k", "top_k": 0}, neuropil.ArgumentError, "top_k must be a positive"),
        ({"strategy": "top_k", "top_k": -3}, neuropil.ArgumentError, "top_k must be a positive"),
        ({"strategy": "threshold"}, neuropil.ArgumentError, "threshold must be a finite logit"),
        ({"sinks": -5}, neuropil.ArgumentError, "sinks must be an integer >= 0; got -5"),
    ]
    for kw, err, message in bad_call:
        with pytest.raises(err, match=message):
            hf.sparse_decode_attention(q, k, v, 0.3, **kw)
    with pytest.raises(neuropil.ArgumentError, match="scaling must be a finite number"):
        hf.sparse_decode_attention(q, k, v, float("nan"))
    with pytest.raises(neuropil.ShapeError, match="multiple of the key's kv heads"):
        hf.sparse_decode_attention(torch.randn(1, 3, 1, 8), torch.randn(1, 2, 20, 8), k, 0.3)
    with pytest.raises(neuropil.ShapeError, match=r"query must have shape \(batch, heads, 1, d\)"):
        hf.sparse_decode_attention(torch.randn(1, 2, 2, 8), k, v, 0.3)
    with pytest.raises(neuropil.ShapeError, match="n >= 1"):
        hf.sparse_decode_attention(q, k[:, :, :0], v[:, :, :0], 0.3)


def test_bench_quick_runs(monkeypatch, tmp_path):
    """`neuropil bench range --quick` prints every figure (small data, cached keys)."""
    from neuropil import _bench_range, _range_data

    z = {
        "keys": np.stack(
            [np.stack([low_rank(8192, 64, 6, s + 3 * li) for s in range(3)]) for li in range(4)]
        ),
        "queries": np.stack(
            [np.stack([low_rank(256, 64, 6, 100 + s) for s in range(3)]) for _ in range(4)]
        ),
    }
    monkeypatch.setattr(_bench_range, "smollm2_keys", lambda *a, **k: z)
    assert _range_data.LAYERS
    rows = _bench_range.range_bench(quick=True, verbose=False)
    assert rows and all(r.neuropil > 0 for r in rows)
    assert any("faiss" in r.baselines for r in rows)
    assert all("exact=yes" in r.limit for r in rows if "faiss" in r.baselines)


def test_cache_kwargs_follows_the_models_signature():
    pytest.importorskip("transformers")
    from neuropil import hf

    class Old:
        def forward(self, input_ids, past_key_values=None, use_cache=None): ...

    class New:
        def forward(self, input_ids, cache=None, use_cache=None): ...

    marker = object()
    assert hf.cache_kwargs(Old(), marker) == {"past_key_values": marker}
    assert hf.cache_kwargs(New(), marker) == {"cache": marker}
    with pytest.raises(neuropil.ArgumentError, match=r"transformers model.*got int"):
        hf.cache_kwargs(3, marker)


# ------------------------------------------------------------------- pickle and deepcopy


@pytest.mark.parametrize("method", METHODS)
def test_pickle_and_deepcopy_round_trip(method):
    import copy
    import pickle

    keys = low_rank(3000, 32, 4, 9)
    q = low_rank(12, 32, 4, 10)
    t = quantile_thresholds(keys, q, 0.02)
    ix = RangeIndex(keys[:2000], method, rebuild_min=64, leaf=32, seed=5)
    ix.add(keys[2000:2600])  # past the rebuild policy: a second build
    ix.add(keys[2600:2700])  # appended, not in the tree
    ix.search(q, t)
    want = ix.search(q, t)
    stats = {k: v for k, v in ix.stats.items() if k != "auto_work"}
    if method != "flat":
        assert stats["builds"] == 2 and stats["pending"] == 100
    for back in (pickle.loads(pickle.dumps(ix)), copy.deepcopy(ix)):
        assert back.stats["auto_work"] == 0.0  # auto re-measures (as after load)
        assert {k: v for k, v in back.stats.items() if k != "auto_work"} == stats
        assert np.array_equal(back.last_scanned, ix.last_scanned)
        assert np.array_equal(back.keys(), ix.keys()) and back.device == "cpu"
        for a, b in zip(back.search(q, t), want, strict=True):
            assert np.array_equal(a, b)
        for a, b in zip(back.topk(q, 7), ix.topk(q, 7), strict=True):
            assert np.array_equal(a, b)
        back.add(keys[2700:])  # independent of the original
        assert len(back) == 3000 and len(ix) == 2700
        assert all(np.array_equal(a, b) for a, b in zip(ix.search(q, t), want, strict=True))
    # Corrupt states: FormatError, never a broken index.
    good = ix.__getstate__()
    assert all(isinstance(v, (int, float, str, np.ndarray)) for v in good.values())
    assert len(unpickle_tampered(ix, good)) == 2700
    for change in (
        {"keys": good["keys"].reshape(-1)},  # wrong shape
        {"keys": good["keys"][:, :0]},
        {"keys": good["keys"].astype(np.float64)},
        {"keys": np.where(good["keys"] > 3, np.nan, good["keys"]).astype(np.float32)},
        {"indexed": 2701 if method != "flat" else 5},
        {"indexed": -1},
        {"builds": "2"},
        {"method": "nope"},
        {"leaf": 0},
        {"rebuild_fraction": -1.0},
        {"device": "tpu"},
        {"format_version": 2},
        {"last_scanned": np.zeros((2, 2), np.float32)},
        {"extra": 1},
    ):
        with pytest.raises(neuropil.FormatError):
            unpickle_tampered(ix, {**good, **change})
    with pytest.raises(neuropil.FormatError):
        unpickle_tampered(ix, {k: v for k, v in good.items() if k != "seed"})


@pytest.mark.cuda
def test_cuda_index_pickles_through_the_cpu_and_comes_back_on_its_device():
    import copy
    import pickle

    import torch

    keys = low_rank(4000, 32, 4, 11)
    q = low_rank(8, 32, 4, 12)
    t = quantile_thresholds(keys, q, 0.02)
    gpu = RangeIndex(torch.from_numpy(keys[:3000]).cuda())
    gpu.add(torch.from_numpy(keys[3000:]).cuda())
    state = gpu.__getstate__()
    assert isinstance(state["keys"], np.ndarray) and state["device"] == gpu.device
    for back in (pickle.loads(pickle.dumps(gpu)), copy.deepcopy(gpu)):
        assert back.device == gpu.device and len(back) == 4000
        qt, tt = torch.from_numpy(q).cuda(), torch.from_numpy(t).cuda()
        for a, b in zip(back.search(qt, tt), gpu.search(qt, tt), strict=True):
            assert a.device == b.device and torch.equal(a, b)
        back.add(torch.from_numpy(keys[:5]).cuda())
        assert len(back) == 4005 and len(gpu) == 4000


@pytest.mark.parametrize("method", METHODS)
def test_an_empty_batch_of_queries_gets_empty_answers(method):
    # faiss's answer to 0 queries: lims == [0] and empty ids and scores.
    keys = low_rank(500, 16, 4, 0)
    ix = RangeIndex(keys, method)
    q = np.zeros((0, 16), np.float32)
    for t in (0.5, np.zeros(0, np.float32), np.zeros(0)):
        lims, ids, scores = ix.search(q, t)
        assert lims.tolist() == [0] and lims.dtype == np.int64
        assert (ids.shape, ids.dtype) == ((0,), np.int64)
        assert (scores.shape, scores.dtype) == ((0,), np.float32)
        assert ix.last_scanned.shape == (0,)
    ids, scores = ix.topk(q, 5)
    assert (ids.shape, ids.dtype, scores.shape, scores.dtype) == (
        (0, 5),
        np.int64,
        (0, 5),
        np.float32,
    )
    # The index answers as before afterwards (that an empty batch is no search
    # to `auto`: test_an_empty_batch_is_no_search_to_auto).
    full = np.asarray(ix.search(keys[:3], 0.0)[1])
    assert full.size > 0
    # Adding 0 keys appends nothing; building from 0 keys stays refused.
    builds = ix.stats["builds"]
    ix.add(np.zeros((0, 16), np.float32))
    assert len(ix) == 500 and ix.stats["builds"] == builds
    with pytest.raises(neuropil.ShapeError, match="keys must not be empty"):
        RangeIndex(np.zeros((0, 16), np.float32), method)
    # Still refused: a width that differs from the keys', a zero width,
    # thresholds that do not match the empty batch.
    with pytest.raises(neuropil.ShapeError, match=r"queries must have shape \(nq, 16\)"):
        ix.search(np.zeros((0, 15), np.float32), 0.0)
    with pytest.raises(neuropil.ShapeError, match="queries must not be empty"):
        ix.topk(np.zeros((0, 0), np.float32), 1)
    with pytest.raises(neuropil.ShapeError, match="thresholds"):
        ix.search(q, np.zeros(1, np.float32))
    with pytest.raises(neuropil.ArgumentError, match="k must be between 1"):
        ix.topk(q, 501)


def test_an_empty_batch_is_no_search_to_auto():
    # Where pruning does not pay (every key within reach of a low threshold),
    # `auto` scans in full and prunes again every 16th search to re-measure:
    # a full scan reads every key once and nothing else (last_work == 1), a
    # pruned search also the principal prefixes (last_work > 1). Empty
    # batches in between must not move that schedule.
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((2000, 64)).astype(np.float32)
    q = rng.standard_normal((4, 64)).astype(np.float32)
    ix = RangeIndex(keys, "auto")
    empty = np.zeros((0, 64), np.float32)

    def pruned() -> bool:
        ix.search(q, -5.0)
        return bool((ix.last_work != 1.0).any())

    assert pruned() and ix.stats["auto_work"] > 0.9  # search 0 measures
    # 15 empty batches: counted as searches, they would make the next real
    # search the 16th, which prunes.
    for i in range(15):
        ix.search(empty, -5.0 if i % 2 else np.zeros(0, np.float32))
        assert ix.last_work.shape == (0,)
    assert [pruned() for _ in range(16)] == [False] * 15 + [True]


def test_rebuild_takes_the_appended_keys_into_the_tree():
    keys = low_rank(300, 8, 2, 1)
    ix = RangeIndex(keys[:200], rebuild_min=1000)
    ix.add(keys[200:])
    s = ix.stats
    assert (s["indexed"], s["pending"], s["builds"]) == (200, 100, 1)
    q = low_rank(3, 8, 2, 5)
    want = ix.search(q, 0.0)
    ix.rebuild()
    s = ix.stats
    assert (s["indexed"], s["pending"], s["builds"]) == (300, 0, 2)
    for a, b in zip(ix.search(q, 0.0), want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_torch_path_add_appends_the_given_keys():
    # The CUDA path's logic, on CPU tensors: appended keys (within the buffer
    # and past it, which grows it) are the ones searched and returned by keys().
    torch = pytest.importorskip("torch")
    from neuropil.range import _TorchRange

    keys = low_rank(40, 8, 2, 1)
    ix = RangeIndex(keys[:10])
    ix._native, ix._torch = None, _TorchRange(torch.from_numpy(keys[:10]))
    ix.add(torch.from_numpy(keys[10:25]))  # grows the buffer
    ix.add(keys[25:])
    assert len(ix) == 40
    np.testing.assert_array_equal(ix.keys().numpy(), keys)
    q = low_rank(2, 8, 2, 7)
    lims, ids, _ = ix.search(torch.from_numpy(q), 0.0)
    want = RangeIndex(keys, "flat").search(q, 0.0)
    np.testing.assert_array_equal(lims.numpy(), want[0])
    np.testing.assert_array_equal(ids.numpy(), want[1])
    # k = 1, the smallest k, is taken
    ids, _ = ix.topk(torch.from_numpy(q), 1)
    np.testing.assert_array_equal(ids.numpy(), RangeIndex(keys, "flat").topk(q, 1)[0])


def test_an_empty_torch_batch_gets_empty_tensors():
    torch = pytest.importorskip("torch")
    from neuropil.range import _TorchRange

    keys = low_rank(200, 8, 3, 1)
    ix = RangeIndex(keys)
    q = torch.zeros(0, 8)
    lims, ids, scores = ix.search(q, 0.0)
    assert all(isinstance(a, torch.Tensor) for a in (lims, ids, scores))
    assert lims.tolist() == [0] and ids.shape == scores.shape == (0,)
    assert (lims.dtype, ids.dtype, scores.dtype) == (torch.int64, torch.int64, torch.float32)
    ids, scores = ix.topk(q.double(), 4)
    assert ids.shape == scores.shape == (0, 4)
    assert (ids.dtype, scores.dtype) == (torch.int64, torch.float32)
    # The CUDA path's logic, on CPU tensors.
    tr = _TorchRange(torch.from_numpy(keys))
    lims, ids, scores = tr.search(q, 0.0, ix)
    assert lims.tolist() == [0] and ids.shape == scores.shape == (0,)
    assert (lims.dtype, ids.dtype, scores.dtype) == (torch.int64, torch.int64, torch.float32)
    ids, scores = tr.topk(q, 4, ix)
    assert ids.shape == scores.shape == (0, 4)


def test_integer_and_float64_thresholds_round_up_to_float32():
    # An integer array or list of ints was refused with DTypeError, while a
    # Python int and a float list were accepted; float64 thresholds were
    # rounded to the nearest float32, which let in the scores in between.
    torch = pytest.importorskip("torch")
    keys = low_rank(200, 8, 2, 1)
    q = low_rank(3, 8, 2, 2)
    ix = RangeIndex(keys)
    want = ix.search(q, np.array([1.0, 2.0, -3.0], np.float32))
    for t in (
        [1, 2, -3],
        np.array([1, 2, -3]),
        np.array([1, 2, -3], np.int8),
        torch.tensor([1, 2, -3]),
        (1, 2.0, np.int32(-3)),
    ):
        for a, b in zip(ix.search(q, t), want, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ix.search(q, np.uint16(2))[1], ix.search(q, 2.0)[1])
    # Exact scores: key j is v[j] on axis 0, the query is e0.
    one_up = float(np.nextafter(np.float32(1), np.float32(2)))
    v = np.array([2.0**24, 2.0**24 + 2, 1.0, one_up, 2.0**70, -(2.0**100)], np.float32)
    keys1 = np.pad(v[:, None], ((0, 0), (0, 7)))
    exact = RangeIndex(keys1)
    e0 = np.eye(1, 8, dtype=np.float32)
    from neuropil.range import _TorchRange

    on_torch = _TorchRange(torch.from_numpy(keys1))
    cases = [
        (2**24 + 1, [1, 4]),  # nearest float32 is 2^24 (ties to even): key 0 crept in
        (np.array([2**24 + 1]), [1, 4]),
        ([2**24 + 1], [1, 4]),
        (torch.tensor([2**24 + 1]), [1, 4]),
        (1.0 + 1e-12, [0, 1, 3, 4]),  # float64 just above 1: key 2 (exactly 1) is out
        (np.array([1.0 + 1e-12]), [0, 1, 3, 4]),
        (torch.tensor([1.0 + 1e-12], dtype=torch.float64), [0, 1, 3, 4]),
        (2**70, [4]),  # exact in float32
        ([2**70 + 1], []),  # an object array of Python ints beyond int64
        (-(2**100) - 1, [0, 1, 2, 3, 4, 5]),
        (np.array([2**63 - 1], np.int64), [4]),
        (np.array([2**64 - 1], np.uint64), [4]),
    ]
    for t, hits in cases:
        assert sorted(exact.search(e0, t)[1].tolist()) == hits, t
        # the CUDA path's logic, on CPU tensors: the same conversion
        assert sorted(on_torch.search(torch.from_numpy(e0), t, exact)[1].tolist()) == hits, t
    with pytest.raises(neuropil.ArgumentError, match=rf"got {2**200} at flat index 1"):
        exact.search(np.repeat(e0, 2, 0), [3, 2**200])
    # bool and complex stay refused
    for t in ([True, False, True], np.ones(3, np.complex64)):
        with pytest.raises(neuropil.DTypeError, match="thresholds must be a float or integer"):
            ix.search(q, t)


def test_a_scalar_threshold_is_rounded_up_without_numpy_arrays(monkeypatch):
    # One number for every query is the common call (a search per decoded
    # token): rounding it through _ceil_f32's arrays made each search ~9 us
    # slower (20 -> 30 us on 5,000 keys). Only scalars float32 cannot hold
    # exactly as integers (beyond 2**24) or beyond its range take that path.
    from neuropil import range as nrange

    q = np.zeros((3, 4), np.float32)
    cases = [(v, nrange._ceil_f32(np.array([v]))[0]) for v in
             (30.0, 1.0 + 1e-12, -1.0 - 1e-12, 0.1, -0.0, 5e-324, 2**24, -7, 3.4e38)]  # fmt: skip
    cases += [(np.float16(0.1), np.float32(np.float16(0.1))), (np.int64(-5), np.float32(-5))]
    calls = []
    ceil = nrange._ceil_f32
    monkeypatch.setattr(nrange, "_ceil_f32", lambda t: calls.append(t) or ceil(t))
    for v, want in cases:
        got = nrange._thresholds(v, q)
        assert got.dtype == np.float32 and got.shape == (3,), v
        assert got.tobytes() == np.full(3, want, np.float32).tobytes(), v
    assert calls == []
    nrange._thresholds(2**24 + 1, q)  # (beyond 2**24: the exact integer path)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "field,value",
    [
        ("leaf", " 64 "),
        ("leaf", "6_4"),
        ("leaf", "+64"),
        ("leaf", "64.0"),
        ("leaf", "\u0666\u0664"),  # Arabic-Indic digits: int() takes them
        ("seed", "0x10"),
        ("rebuild_min", "256\n"),
        ("rebuild_fraction", " 0.25"),
        ("rebuild_fraction", "0_5"),
        ("rebuild_fraction", "nan"),
        ("branching", ""),
    ],
)
def test_metadata_fields_must_be_written_as_save_writes_them(tmp_path, field, value):
    # int(" 64 ") and float(" 0.25") accept spaces, underscores and other digits.
    path = tmp_path / "ix.safetensors"
    RangeIndex(low_rank(50, 16, 2, 1)).save(path)
    _rewrite(path, lambda h: h["__metadata__"].update({field: value}))
    with pytest.raises(neuropil.FormatError, match=rf"metadata field {field!r} must be"):
        RangeIndex.load(path)


def test_unknown_metadata_fields_are_refused(tmp_path):
    # They were dropped without a word (FlyHash's loader refuses them).
    path = tmp_path / "ix.safetensors"
    RangeIndex(low_rank(50, 16, 2, 1)).save(path)
    _rewrite(path, lambda h: h["__metadata__"].update({"metric": "cosine"}))
    with pytest.raises(neuropil.FormatError, match=r"unknown metadata fields \['metric'\]"):
        RangeIndex.load(path)


def test_metadata_written_by_save_loads_for_every_value():
    # the strict parse takes everything save writes (float repr: 1e-05, 2.5e+30)
    import tempfile
    from pathlib import Path

    keys = low_rank(50, 16, 2, 1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ix.safetensors"
        for kw in (
            {"rebuild_fraction": 1e-05, "seed": 2**64 - 1, "leaf": 1},
            {"rebuild_fraction": 2.5e30, "rebuild_min": 0},
            {"rebuild_fraction": 0.5, "branching": 2},
            {"rebuild_fraction": 3},
        ):
            ix = RangeIndex(keys, "kmeans", **kw)
            ix.save(path)
            assert RangeIndex.load(path).stats == ix.stats, kw


def test_non_finite_inputs_of_the_torch_path_are_named_by_position():
    # The torch (CUDA) path said only "must be finite (no NaN or Inf)"; it now
    # names the first bad value and its flat index, as the core does for numpy.
    torch = pytest.importorskip("torch")
    from neuropil.range import _TorchRange

    keys = low_rank(100, 8, 2, 1)
    ix = RangeIndex(keys)
    tr = _TorchRange(torch.from_numpy(keys))
    q = torch.ones(2, 8)
    q[1, 3] = float("nan")
    with pytest.raises(neuropil.ArgumentError, match=r"queries must.*got NaN at flat index 11$"):
        tr.search(q, 0.0, ix)
    with pytest.raises(neuropil.ArgumentError, match=r"thresholds must.*-inf at flat index 1$"):
        tr.search(torch.ones(2, 8), torch.tensor([0.0, -float("inf")]), ix)
    bad = torch.from_numpy(keys.copy())
    bad[5, 0] = float("inf")
    with pytest.raises(neuropil.ArgumentError, match=r"keys must be .*got inf at flat index 40$"):
        _TorchRange(bad)
    with pytest.raises(neuropil.ArgumentError, match=r"keys must be .*got inf at flat index 40$"):
        tr.add(bad)
    # the numpy path (the core) words it the same way
    with pytest.raises(neuropil.ArgumentError, match=r"queries must.*got NaN at flat index 11$"):
        ix.search(q.numpy(), [0.0, 0.0])

"""Neuron cache and sparse FFN: exactness against numpy, policies against brute
force, persistence, bad input, and sparsify_mlp on the real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neuropil
from conftest import run_python, unpickle_tampered
from neuropil.neurons import NeuronCache, SparseFFN

# ------------------------------------------------------------------ references

erf = np.vectorize(math.erf)


def act_np(name, x):
    x = x.astype(np.float64)
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    return np.maximum(x, 0)


def ffn_reference(x, gate, up, down, act, threshold=None, top_k=None, up_bias=None, down_bias=None):
    """The dense FFN in float64 with the same masking rule as SparseFFN."""
    x = np.atleast_2d(x).astype(np.float64)
    pre = x @ (gate if gate is not None else up).T.astype(np.float64)
    if gate is None and up_bias is not None:
        pre = pre + up_bias
    a = act_np(act, pre)
    if threshold is not None:
        a = np.where(np.abs(a) > threshold, a, 0.0)
    if top_k is not None:
        keep = np.zeros_like(a, dtype=bool)
        idx = np.argsort(-np.abs(a), axis=1, kind="stable")[:, :top_k]
        np.put_along_axis(keep, idx, True, axis=1)
        a = np.where(keep, a, 0.0)
    if gate is not None:
        a = a * (x @ up.T.astype(np.float64))
    y = a @ down.T.astype(np.float64)
    if down_bias is not None:
        y = y + down_bias
    return y


def weights(h=96, d=40, seed=0, gated=True):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((h, d)).astype(np.float32) * 0.3 if gated else None
    u = rng.standard_normal((h, d)).astype(np.float32) * 0.3
    dn = rng.standard_normal((d, h)).astype(np.float32) * 0.3
    return g, u, dn


def f16(a):
    return None if a is None else a.astype(np.float16).astype(np.float32)


# ------------------------------------------------------------------ SparseFFN


FORMATS = [("float32", None), ("float16", None), ("int8", 8), ("int4", 4)]


def tiny_llama():
    """A seeded random 2-layer Llama (hidden 64, FFN 256): no model files needed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize(("dtype", "bits"), FORMATS)
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_sparse_ffn_matches_numpy_masking(dtype, bits, act, gated):
    g, u, dn = weights(gated=gated)
    rng = np.random.default_rng(1)
    ub = rng.standard_normal(96).astype(np.float32) * 0.1 if not gated else None
    db = rng.standard_normal(40).astype(np.float32) * 0.1
    x = rng.standard_normal((3, 40)).astype(np.float32)
    kw = {"bits": bits} if bits else {"dtype": dtype}
    ffn = SparseFFN(g, u, dn, activation=act, up_bias=ub, down_bias=db, **kw)
    assert ffn.dtype == dtype
    # The reference sees the weights the kernel stores (rounded or dequantized).
    rg, ru, rd = ffn.weights()
    if dtype == "float16":
        for got, orig in ((rg, g), (ru, u), (rd, dn)):
            if orig is not None:
                np.testing.assert_array_equal(got, f16(orig))
    if bits:
        # Row quantization error is at most half a step of each row's scale.
        step = np.abs(u).max(1, keepdims=True) / (127 if bits == 8 else 7)
        assert np.all(np.abs(ru - u) <= step / 2 + 1e-6)
    np.testing.assert_allclose(
        ffn(x), ffn_reference(x, rg, ru, rd, act, up_bias=ub, down_bias=db), atol=2e-4, rtol=1e-4
    )
    for t in (0.05, 0.3, 1.0):
        ffn.set_threshold(t)
        want = ffn_reference(x, rg, ru, rd, act, threshold=t, up_bias=ub, down_bias=db)
        np.testing.assert_allclose(ffn(x), want, atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(ffn(x[1]), want[1], atol=2e-4, rtol=1e-4)
    sparse = SparseFFN(g, u, dn, activation=act, up_bias=ub, down_bias=db, top_k=17, **kw)
    want = ffn_reference(x, rg, ru, rd, act, top_k=17, up_bias=ub, down_bias=db)
    np.testing.assert_allclose(sparse(x), want, atol=2e-4, rtol=1e-4)
    if dtype == "float32":
        back = ffn.weights()
        np.testing.assert_array_equal(back[1], u)
        np.testing.assert_array_equal(back[2], dn)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 130),
    d=st.integers(1, 70),
    n=st.integers(1, 4),
    sparsity=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_calibrated_threshold_is_exact_and_hits_the_sparsity(h, d, n, sparsity, seed):
    g, u, dn = weights(h, d, seed % 1000)
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal((64, d)).astype(np.float32)
    ffn = SparseFFN(g, u, dn, hot_capacity=h // 3)
    t = ffn.calibrate(samples, sparsity)
    x = rng.standard_normal((n, d)).astype(np.float32)
    want = ffn_reference(x, g, u, dn, "silu", threshold=t if sparsity > 0 else None)
    np.testing.assert_allclose(ffn(x), want, atol=1e-4, rtol=1e-4)
    ffn.reset_stats()
    ffn(samples)
    if sparsity > 0:
        density = ffn.stats()["density"]
        assert density <= 1 - sparsity + 1.5 / h + 0.02
    assert len(ffn.hot_neurons()) <= h // 3


def test_hot_tier_serves_hits_without_changing_results():
    g, u, dn = weights(200, 32)
    rng = np.random.default_rng(3)
    samples = rng.standard_normal((128, 32)).astype(np.float32)
    ffn = SparseFFN(g, u, dn, hot_capacity=50)
    cold = SparseFFN(g, u, dn)
    t = ffn.calibrate(samples, 0.7)
    cold.set_threshold(t)
    assert len(ffn.hot_neurons()) == 50
    ffn.reset_stats()
    y = ffn(samples[:4])
    np.testing.assert_allclose(y, cold(samples[:4]), atol=1e-5)
    s = ffn.stats()
    assert s["hot_fetches"] > 0 and s["cold_fetches"] > 0
    assert (
        s["cold_bytes"]
        == s["cold_fetches"] * ffn.bytes_per_neuron
        == s["cold_fetches"] * 3 * 32 * 4
    )
    # The calibrated hot set is the most frequently active neurons.
    freq = (np.abs(ffn.activations(samples)) > t).mean(0)
    assert freq[ffn.hot_neurons()].min() >= np.sort(freq)[-50] - 1e-12


def test_torch_input_gives_torch_output():
    torch = pytest.importorskip("torch")
    g, u, dn = weights()
    ffn = SparseFFN(torch.from_numpy(g), torch.from_numpy(u), torch.from_numpy(dn), threshold=0.1)
    x = torch.randn(2, 40)
    y = ffn(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 40)
    np.testing.assert_allclose(y.numpy(), ffn(x.numpy()), atol=0)


def test_sparse_ffn_bad_input():
    g, u, dn = weights()
    with pytest.raises(neuropil.ArgumentError, match="not both"):
        SparseFFN(g, u, dn, bits=8, dtype="float16")
    with pytest.raises(neuropil.ArgumentError, match="divisible by 2 for int4"):
        SparseFFN(g[:, :-1], u[:, :-1], dn[:-1], bits=4)
    with pytest.raises(neuropil.ArgumentError, match="bits must be None, 8 or 4"):
        SparseFFN(g, u, dn, bits=3)
    with pytest.raises(neuropil.ShapeError, match=r"down must have shape \(40, 96\)"):
        SparseFFN(g, u, dn[:, :-1])
    with pytest.raises(neuropil.ShapeError, match="gate must have shape"):
        SparseFFN(g[:-1], u, dn)
    with pytest.raises(neuropil.ArgumentError, match="activation"):
        SparseFFN(g, u, dn, activation="tanh")
    with pytest.raises(neuropil.ArgumentError, match="hot_capacity"):
        SparseFFN(g, u, dn, hot_capacity=97)
    ffn = SparseFFN(g, u, dn)
    with pytest.raises(neuropil.ShapeError, match=r"x must have shape \(n, 40\)"):
        ffn(np.zeros((2, 39), np.float32))
    with pytest.raises(neuropil.DTypeError):
        ffn(np.zeros(40, np.int32))
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(neuropil.ArgumentError, match=r"sparsity must be in \[0, 1\)"):
            ffn.calibrate(np.zeros((4, 40), np.float32), bad)
    with pytest.raises(neuropil.ArgumentError, match="threshold"):
        ffn.set_threshold(-1)
    with pytest.raises(IndexError):
        ffn.set_hot([96])


@pytest.mark.parametrize("cls", ["SparseFFN", "InputSparseFFN"])
def test_a_gated_ffn_refuses_an_up_bias(cls):
    # The kernels added it to the gate's pre-activation, the CUDA path dropped
    # it: two different wrong FFNs. Ungated FFNs take it.
    cls = getattr(neuropil.neurons, cls)
    g, u, dn = weights()
    with pytest.raises(neuropil.ArgumentError, match=r"up_bias must be None for a gated FFN"):
        cls(g, u, dn, up_bias=np.ones(96, np.float32))
    ub = np.ones(96, np.float32)
    x = np.random.default_rng(1).standard_normal(40).astype(np.float32)
    want = ffn_reference(x, None, u, dn, "silu", up_bias=ub)[0]
    np.testing.assert_allclose(cls(None, u, dn, up_bias=ub)(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", ["SparseFFN", "InputSparseFFN"])
def test_gradients_reach_a_torch_input_through_the_ffn(cls):
    # A CPU tensor that requires grad went through the kernel: the numpy result
    # carried no graph, so in `x + ffn(x)` the FFN's share of the gradient was
    # silently missing. It takes the torch ops now: the gradient of the same
    # masked FFN written with torch, and the kernel's values.
    import torch
    import torch.nn.functional as F

    g, u, dn = weights()
    ffn = getattr(neuropil.neurons, cls)(g, u, dn, activation="silu")
    if cls == "SparseFFN":
        ffn.set_threshold(0.1)
    else:
        ffn.set_thresholds(0.3, 0.1)
    x0 = torch.randn(3, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    x = x0.clone().requires_grad_()
    (x + ffn(x)).pow(2).sum().backward()
    xr = x0.clone().requires_grad_()
    gw, uw, dw = (torch.from_numpy(a) for a in (g, u, dn))

    def mask(v, t):
        return torch.where(v.abs() > t, v, torch.zeros_like(v))

    if cls == "SparseFFN":
        want = F.linear(mask(F.silu(F.linear(xr, gw)), 0.1) * F.linear(xr, uw), dw)
    else:
        xm = mask(xr, 0.3)
        want = F.linear(mask(F.silu(F.linear(xm, gw)) * F.linear(xm, uw), 0.1), dw)
    (xr + want).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # (the kernel: no graph needed)
        torch.testing.assert_close(ffn(x), want.detach(), atol=1e-5, rtol=1e-4)
    assert ffn(x0).grad_fn is None and ffn.stats()["calls"] == 2
    # Either path returns float32 (the torch one returned x's dtype: float64
    # stayed float64), and the gradient still reaches a float64 x.
    x64 = x0.double().requires_grad_()
    y = ffn(x64)
    with torch.no_grad():
        y_kernel = ffn(x64)
    assert y.dtype == y_kernel.dtype == torch.float32 and y.grad_fn is not None
    torch.testing.assert_close(y.detach(), y_kernel, atol=1e-5, rtol=1e-4)
    y.sum().backward()
    assert x64.grad.dtype == torch.float64
    xw = x0.clone().requires_grad_()
    ffn(xw).sum().backward()
    torch.testing.assert_close(x64.grad.float(), xw.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", ["SparseFFN", "InputSparseFFN"])
def test_calibrate_checks_its_samples_and_flattens_leading_dims(cls):
    torch = pytest.importorskip("torch")
    cls = getattr(neuropil.neurons, cls)
    ffn = cls(*weights())
    x = np.random.default_rng(2).standard_normal((2, 6, 40)).astype(np.float32)
    # Hidden states of a batch (b, t, d) calibrate as their b * t rows.
    assert ffn.calibrate(torch.from_numpy(x), 0.5) == ffn.calibrate(x.reshape(12, 40), 0.5)
    for bad, err, match in (
        (x[:, :, :39], neuropil.ShapeError, r"samples must have shape \(n, 40\).*got \(2, 6, 39\)"),
        (x[:0], neuropil.ShapeError, r"samples must have shape \(n, 40\).*got \(0, 6, 40\)"),
        (np.float32(1.0), neuropil.ShapeError, r"samples must have shape .*got \(\)"),
        (np.full((3, 40), np.nan), neuropil.ArgumentError, "samples must.*NaN at flat index 0"),
        (np.ones((3, 40), np.int64), neuropil.DTypeError, "samples must be a float.*int64"),
    ):
        with pytest.raises(err, match=match):
            ffn.calibrate(bad, 0.5)
    for bad in ("half", None, 1.0):
        with pytest.raises(neuropil.ArgumentError, match=r"sparsity must be in \[0, 1\)"):
            ffn.calibrate(x, bad)


# ------------------------------------------------------------------ NeuronCache


def test_a_repeated_id_counts_once_and_policy_errors_show_python_values():
    # [3, 1, 3] counted neuron 3 twice: a frequency of 2 ("fraction of tokens").
    c, m = NeuronCache(8, 2), NeuronCache(8, 2)
    c.record(np.array([3, 1, 3]))
    m.record(np.isin(np.arange(8), [1, 3]))
    assert c.activation_frequency(3) == 1.0 and c.stats()["events"] == 2
    np.testing.assert_array_equal(c.activation_frequency(), m.activation_frequency())
    # (the message showed Rust's `window=Some(5)`)
    with pytest.raises(neuropil.ArgumentError, match=r'got policy="static", decay=None, window=5$'):
        NeuronCache(100, policy="static", window=5)


def test_seed_api_and_out_of_range_ids_raise():
    c = NeuronCache(100, capacity=5)
    for _ in range(100):
        c.record_activations([0, 1, 2, 3, 4])
    c.reclassify()
    assert c.hot_neurons().tolist() == [0, 1, 2, 3, 4]
    assert len(c.cold_neurons()) == 95
    assert c.activation_frequency(0) == 1.0
    s = c.stats()
    assert (s["num_hot"], s["num_cold"], s["total_activations"], s["hot_ratio"]) == (
        5,
        95,
        100,
        0.05,
    )
    with pytest.raises(IndexError, match="active index 100 is out of range for length 100"):
        c.record([1, 100])
    with pytest.raises(IndexError):
        c.record(np.array([-1]))
    assert c.stats()["total_activations"] == 100  # nothing recorded by the failed calls
    with pytest.raises(IndexError):
        c.activation_frequency(100)
    with pytest.raises(IndexError, match=f"neuron index {2**70} is out of range for length 100"):
        c.activation_frequency(2**70)  # (an OverflowError from the native call)
    for bad in (1.5, True):
        with pytest.raises(
            neuropil.ArgumentError, match=rf"neuron must be an integer neuron id; got {bad}"
        ):
            c.activation_frequency(bad)
    with pytest.raises(neuropil.ShapeError, match=r"\(100,\) or \(n, 100\)"):
        c.record(np.zeros((2, 99), bool))
    with pytest.raises(neuropil.DTypeError):
        c.record(np.array([0.5, 1.0]))
    # A uint64 id past int64 is named as given (it wrapped to -1).
    for call, what in ((c.record, "active"), (c.set_hot, "hot")):
        with pytest.raises(IndexError, match=rf"{what} index {2**64 - 1} is out of range"):
            call(np.array([2**64 - 1], np.uint64))
    c.clear()
    assert c.stats()["total_activations"] == 0 and len(c.hot_neurons()) == 0


def test_bad_cache_arguments():
    with pytest.raises(neuropil.ArgumentError, match="capacity must be at most num_neurons = 10"):
        NeuronCache(10, capacity=11)
    with pytest.raises(neuropil.ArgumentError, match="capacity must be at most"):
        NeuronCache(10, capacity_bytes=1100, bytes_per_neuron=100)
    with pytest.raises(neuropil.ArgumentError, match="bytes_per_neuron"):
        NeuronCache(10, capacity_bytes=100)
    with pytest.raises(neuropil.ArgumentError, match="policy"):
        NeuronCache(10, policy="lru")
    with pytest.raises(neuropil.ArgumentError, match="decay"):
        NeuronCache(10, decay=1.5)
    with pytest.raises(neuropil.ArgumentError, match="window"):
        NeuronCache(10, policy="window")
    with pytest.raises(neuropil.ArgumentError, match="hysteresis"):
        NeuronCache(10, hysteresis=-0.5)
    assert NeuronCache(10, capacity_bytes=450, bytes_per_neuron=100).capacity == 4


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 500),
    rows=st.integers(1, 12),
    cap=st.floats(0, 1),
    density=st.floats(0.01, 0.9),
    seed=st.integers(0, 2**32 - 1),
)
def test_batch_mask_index_lists_and_brute_force_agree(n, rows, cap, density, seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, n)) < density
    capacity = int(cap * n)
    a, b, c = (NeuronCache(n, capacity) for _ in range(3))
    a.record(mask)
    for row in mask:
        b.record(np.flatnonzero(row))
        c.record(row)
    for x in (a, b, c):
        x.reclassify()
    np.testing.assert_array_equal(a.activation_frequency(), mask.mean(0))
    counts = mask.sum(0)
    order = sorted((j for j in range(n) if counts[j] > 0), key=lambda j: (-counts[j], j))
    want = sorted(order[:capacity])
    for x in (a, b, c):
        assert x.hot_neurons().tolist() == want
    # Hit statistics: the next tokens served by the hot set.
    nxt = rng.random((3, n)) < density
    a.record(nxt)
    s = a.stats()
    hits = int(nxt[:, want].sum()) if want else 0
    assert (s["hits"], s["misses"]) == (hits, int(nxt.sum()) - hits)


def test_policies_window_decay_static_and_hysteresis():
    w = NeuronCache(6, capacity=3, policy="window", window=2)
    for ids in ([0, 1], [2], [3]):
        w.record(ids)
    w.reclassify()
    assert w.hot_neurons().tolist() == [2, 3]
    d = NeuronCache(4, capacity=1, decay=0.5)
    d.record(np.array([[1, 0, 0, 0]] * 5 + [[0, 1, 0, 0]] * 3, dtype=bool))
    d.reclassify()
    assert d.hot_neurons().tolist() == [1]
    s = NeuronCache(3, capacity=1, policy="static")
    s.set_hot([2])
    s.record(np.ones((4, 3), bool))
    s.reclassify()
    assert s.hot_neurons().tolist() == [2]
    h = NeuronCache(3, capacity=1, hysteresis=0.5)
    h.record(np.array([[1, 0, 0]] * 2, bool))
    h.reclassify()
    h.record(np.array([[0, 1, 0]] * 3, bool))
    h.reclassify()
    assert h.hot_neurons().tolist() == [0]  # 3 < 2 * 1.5: stays
    auto = NeuronCache(2, capacity=1, policy="window", window=1, reclassify_every=1)
    auto.record(np.array([[1, 0], [1, 0], [0, 1], [0, 1]], bool))
    assert (auto.stats()["hits"], auto.stats()["misses"]) == (2, 1)


def test_cache_save_load_round_trip_and_malformed_files(tmp_path):
    c = NeuronCache(50, capacity=10, policy="frequency", decay=0.9, bytes_per_neuron=64)
    rng = np.random.default_rng(0)
    c.record(rng.random((20, 50)) < 0.3)
    c.reclassify()
    c.record(rng.random((5, 50)) < 0.3)
    path = tmp_path / "cache.safetensors"
    c.save(path)
    d = NeuronCache.load(path)
    assert d.stats() == c.stats()
    np.testing.assert_array_equal(d.hot_neurons(), c.hot_neurons())
    np.testing.assert_array_equal(d.activation_frequency(), c.activation_frequency())
    raw = path.read_bytes()
    cases = {
        "truncated": raw[: len(raw) - 9],
        "short": raw[:5],
        "bad json": raw[:8] + b"[" + raw[9:],
        "version": raw.replace(b'"format_version":"1"', b'"format_version":"9"'),
        "config": raw.replace(b'\\"capacity\\": 10', b'\\"capacity\\": 99'),
    }
    for name, blob in cases.items():
        assert blob != raw, name
        bad = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(neuropil.FormatError):
            NeuronCache.load(bad)
    # An inconsistent hot set (an id beyond the layer) is caught by the core.
    from neuropil import _safetensors

    tensors, meta = _safetensors.load(path)
    tensors["hot"] = np.array([7, 60], np.uint32)
    _safetensors.save(tmp_path / "hot.safetensors", tensors, meta)
    with pytest.raises(neuropil.FormatError, match="hot"):
        NeuronCache.load(tmp_path / "hot.safetensors")
    # The file is plain safetensors.
    safetensors = pytest.importorskip("safetensors.numpy")
    assert set(safetensors.load_file(str(path))) == {"counts", "scores", "last", "hot"}


def _tampered_cache(tmp_path, edit, name="bad"):
    """A saved cache (64 neurons, decayed frequency) with ``edit(tensors, meta,
    config)`` applied, and the path it was written to."""
    import json

    from neuropil import _safetensors

    c = NeuronCache(64, capacity=8, decay=0.9)
    c.record(np.arange(64) % 3 == 0)
    c.reclassify()
    c.save(tmp_path / "good.safetensors")
    tensors, meta = _safetensors.load(tmp_path / "good.safetensors")
    config = json.loads(meta["config"])
    edit(tensors, meta, config)
    meta["config"] = json.dumps(config)
    path = tmp_path / f"{name}.safetensors"
    _safetensors.save(path, tensors, meta)
    return path


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="RLIMIT_AS (POSIX)")
def test_cache_load_checks_the_tensors_before_allocating_num_neurons(tmp_path):
    # A config claiming 10**9 neurons over 64 stored counts: refused from the
    # tensors' lengths before the cache is built. (The cache was built first,
    # the core allocating ~5 GB, and under an address-space limit the process
    # aborted: "memory allocation of 4000000000 bytes failed".)
    path = _tampered_cache(tmp_path, lambda t, m, cfg: cfg.update(num_neurons=10**9))
    out = run_python(
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, resource.RLIM_INFINITY))\n"
        "import neuropil\n"
        "from neuropil.neurons import NeuronCache\n"
        "try:\n"
        f"    NeuronCache.load({str(path)!r})\n"
        "except neuropil.FormatError as e:\n"
        "    print('FormatError:', e)\n"
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.strip() == (
        f"FormatError: {path}: tensor 'counts' must hold num_neurons = 1000000000 values; got 64"
    )


def test_cache_load_names_the_file_in_size_errors_and_refuses_extra_tensors(tmp_path):
    import re

    def scores(t, m, cfg):
        t["scores"] = t["scores"][:32]

    def hot(t, m, cfg):
        t["hot"] = np.array([7, 70], np.uint32)

    def extra(t, m, cfg):
        t["extra"] = np.zeros(4, np.uint8)

    def window(t, m, cfg):  # a window cache keeps no scores but a last-seen tensor
        cfg.update(policy="window", window=4, decay=None)

    cases = [
        (scores, "tensor 'scores' must hold 64 values (policy 'frequency', decay 0.9); got 32"),
        (window, "tensor 'scores' must hold 0 values (policy 'window', decay None); got 64"),
        (hot, "hot"),  # the core's check, now prefixed with the file
        # (None, the constructor's default, loaded as 20% of the neurons)
        (lambda t, m, cfg: cfg.update(capacity=None), "config capacity must be an integer"),
        (extra, "tensors must be ['counts', 'hot', 'last', 'scores']; got "
                "['counts', 'extra', 'hot', 'last', 'scores'] (unexpected 'extra')"),
    ]  # fmt: skip
    for i, (edit, message) in enumerate(cases):
        path = _tampered_cache(tmp_path, edit, f"bad{i}")
        # (before: "neuron cache state: scores: expected 64 finite values >= 0",
        # no file named; the extra tensor loaded, ignored)
        with pytest.raises(
            neuropil.FormatError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)
        ):
            NeuronCache.load(path)


def test_cache_load_says_a_newer_format_version_needs_a_newer_neuropil(tmp_path):
    import re

    newer = _tampered_cache(tmp_path, lambda t, m, cfg: m.update(format_version="2"), "newer")
    want = (
        f"{newer}: format_version 2 is newer than this neuropil ({neuropil.__version__}) "
        "reads (up to 1): upgrade neuropil"
    )
    with pytest.raises(neuropil.FormatError, match=f"^{re.escape(want)}$"):
        NeuronCache.load(newer)
    for bad in ("0", "01", "+1", "x"):
        older = _tampered_cache(
            tmp_path, lambda t, m, cfg, v=bad: m.update(format_version=v), "old"
        )
        with pytest.raises(
            neuropil.FormatError, match=re.escape(f"format_version must be 1; got {bad!r}")
        ):
            NeuronCache.load(older)


# ------------------------------------------------------------------ sparsify_mlp


@pytest.fixture(scope="module")
def smollm2_ids(smollm2):
    from neuropil.data import gpl3_text, license_texts

    _, tok = smollm2
    calib = "\n".join(t for n, t in license_texts().items() if n != "GPL-3")
    return (
        tok(calib[:4000], return_tensors="pt").input_ids[:, :160],
        tok(gpl3_text()[:3000], return_tensors="pt").input_ids[:, :128],
    )


@pytest.mark.slow
def test_sparsify_smollm2_rust_and_torch_paths_agree(smollm2, smollm2_ids):
    import copy

    import torch

    from neuropil.torch import SparseMLP, sparsify_mlp

    model = copy.deepcopy(smollm2[0])
    calib, ev = smollm2_ids
    with torch.no_grad():
        dense_loss = float(model(ev, labels=ev).loss)
    th = sparsify_mlp(model, sparsity=0.4, calibration=calib)
    assert len(th) == model.config.num_hidden_layers and all(t > 0 for t in th.values())
    mlp = model.model.layers[5].mlp
    assert isinstance(mlp, SparseMLP)
    ffn = mlp.rust_ffn()
    x = torch.randn(1, 3, 576)
    with torch.no_grad():
        y_rust = mlp(x)
        mlp.rust_max_rows = 0
        y_torch = mlp(x)
        mlp.rust_max_rows = 8
        sparse_loss = float(model(ev, labels=ev).loss)
    np.testing.assert_allclose(y_rust.numpy(), y_torch.numpy(), atol=2e-3, rtol=1e-4)
    assert ffn.stats()["rows"] == 3
    assert dense_loss < sparse_loss < dense_loss + 0.5  # perplexity within ~65%
    with pytest.raises(neuropil.ArgumentError, match="sparsity"):
        sparsify_mlp(model, sparsity=1.0, calibration=calib)
    sparsify_mlp(model, sparsity=0.0)  # back to dense
    with torch.no_grad():
        assert abs(float(model(ev, labels=ev).loss) - dense_loss) < 1e-4
    with pytest.raises(neuropil.ArgumentError, match="no Llama-style"):
        sparsify_mlp(torch.nn.Linear(2, 2), sparsity=0.5, calibration=calib)


@pytest.mark.slow
def test_sparsify_minilm_embeddings_stay_close(minilm, sentences):
    import copy

    from neuropil.torch import sparsify_mlp

    model = copy.deepcopy(minilm)
    texts = sentences[:64]
    dense = model.encode(texts[32:], normalize_embeddings=True)
    th = sparsify_mlp(model[0].auto_model, 0.25, calibration=lambda: model.encode(texts[:32]))
    assert len(th) == 6
    sparse = model.encode(texts[32:], normalize_embeddings=True)
    cos = (dense * sparse).sum(1)
    assert cos.mean() > 0.95 and cos.min() > 0.8
    # BERT-style FFN (biases, GELU): the Rust kernel and the torch path agree.
    import torch

    mlp = model[0].auto_model.encoder.layer[2].intermediate
    x = torch.randn(1, 3, 384)
    with torch.no_grad():
        y_rust = mlp(x)
        mlp.rust_max_rows = 0
        y_torch = mlp(x)
    assert mlp.rust_ffn().stats()["rows"] == 3
    np.testing.assert_allclose(y_rust.numpy(), y_torch.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.cuda
def test_cuda_path_matches_cpu(smollm2, smollm2_ids):
    import copy

    import torch
    import torch.nn.functional as F

    from neuropil.torch import sparsify_mlp

    calib, ev = smollm2_ids
    cpu = copy.deepcopy(smollm2[0])
    th = sparsify_mlp(cpu, 0.5, calibration=calib)
    gpu = copy.deepcopy(cpu).cuda()
    for name, t in th.items():
        assert gpu.get_submodule(name).threshold == t
    # Each sparse MLP on the GPU, fed what its CPU twin was fed in the model's
    # forward, gives the CPU's output. A neuron whose |act| lies within rounding
    # of the threshold can be kept on one device and dropped on the other (the
    # matmuls round differently): rows holding one are left out, and must be
    # rare; on every other row a different masking rule would show.
    fed: dict[str, dict[int, torch.Tensor]] = {"cpu": {}, "gpu": {}}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i, d=d: fed[d].setdefault(i, a[0]))
        for d, model in (("cpu", cpu), ("gpu", gpu))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        a = cpu(ev).logits
        b = gpu(ev.cuda()).logits.cpu()
        for h in hooks:
            h.remove()
        flipped_rows = 0
        first_flip = ev.shape[1]  # the first position where some layer's mask flipped
        for side in ("cpu", "gpu"):  # (the GPU model's own inputs, too: its own flips)
            for i, x in fed[side].items():
                x = x.cpu()
                mc, mg = cpu.model.layers[i].mlp, gpu.model.layers[i].mlp
                t = mc.threshold
                act_c, act_g = F.silu(mc.gate(x)), F.silu(mg.gate(x.cuda())).cpu()
                torch.testing.assert_close(act_g, act_c, atol=1e-3, rtol=1e-3)
                flip = ((act_c.abs() > t) != (act_g.abs() > t)).any(-1)  # (batch, positions)
                clean = ~flip
                if side == "cpu":
                    flipped_rows += int(flip.sum())
                    y_c, y_g = mc(x), mg(x.cuda()).cpu()
                    torch.testing.assert_close(y_g[clean], y_c[clean], atol=1e-3, rtol=1e-3)
                if flip.any():
                    first_flip = min(first_flip, int(flip.any(0).nonzero()[0]))
    assert flipped_rows <= 0.02 * len(fed["cpu"]) * ev.shape[1]
    # End to end, a flip at position p changes every later position through
    # attention, and 30 layers amplify it (on the H100 two flips 1e-7 and 6e-7
    # of the threshold away moved later logits by up to 4): the logits agree
    # before the first flip, and the greedy predictions agree throughout.
    torch.testing.assert_close(b[:, :first_flip], a[:, :first_flip], atol=1e-2, rtol=1e-3)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


@pytest.mark.cuda
def test_cuda_path_matches_cpu_on_a_tiny_llama():
    """Needs no model files: a seeded random Llama, sparsified on the CPU, run on both."""
    import copy

    import torch

    from neuropil.torch import sparsify_mlp

    cpu = tiny_llama()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    sparsify_mlp(cpu, 0.5, calibration=ids)
    gpu = copy.deepcopy(cpu).cuda()
    with torch.no_grad():
        a = cpu(ids).logits
        b = gpu(ids.cuda()).logits.cpu()
        x = torch.randn(1, 1, 64)
        y_cpu = cpu.model.layers[0].mlp(x)  # one token: the Rust kernel
        y_gpu = gpu.model.layers[0].mlp(x.cuda()).cpu()  # the torch path on the GPU
    torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(y_gpu, y_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_bench_quick_reports_every_acceptance_figure():
    from neuropil._bench_neurons import neurons

    rows = neurons(quick=True, verbose=False)
    cases = " | ".join(r.case for r in rows)
    for needle in ("NeuronCache.record", "NeuronCache.reclassify", "sparsity 50%", "sparsity 70%",
                   "sparsity 90%", "576x1536 float16", "torch dense", "TEAL sparsity 50%",
                   "TEAL dense"):  # fmt: skip
        assert needle in cases or any(needle in r.baselines for r in rows), needle
    assert all(r.neuropil > 0 for r in rows)


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "bits"), FORMATS)
def test_sparse_ffn_cuda_tensor_matches_cpu(dtype, bits):
    import torch

    g, u, dn = weights()
    kw = {"bits": bits} if bits else {"dtype": dtype}
    ffn = SparseFFN(g, u, dn, threshold=0.1, **kw)
    x = torch.randn(3, 40)
    y = ffn(x.cuda())
    assert y.device.type == "cuda" and y.dtype == torch.float32
    np.testing.assert_allclose(y.cpu().numpy(), ffn(x).numpy(), atol=1e-4, rtol=1e-4)
    # On a GPU the result keeps x's dtype (float32 only on the CPU)
    assert ffn(x.cuda().half()).dtype == torch.float16


@pytest.mark.parametrize("gated", [True, False])
def test_torch_device_path_logic_matches_the_kernel(gated):
    """The torch path CUDA tensors take, run here on CPU tensors."""
    torch = pytest.importorskip("torch")
    g, u, dn = weights(gated=gated)
    rng = np.random.default_rng(5)
    ub = rng.standard_normal(96).astype(np.float32) * 0.1 if not gated else None
    db = rng.standard_normal(40).astype(np.float32) * 0.1
    x = rng.standard_normal((3, 40)).astype(np.float32)
    for kw in ({"threshold": 0.1}, {"top_k": 20}, {}):
        ffn = SparseFFN(g, u, dn, activation="gelu", up_bias=ub, down_bias=db, **kw)
        got = ffn._torch_forward(torch.from_numpy(x), dense=False).numpy()
        np.testing.assert_allclose(got, ffn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_mlp_token_calls_match_the_torch_path(method):
    # The per-token Rust path of a patched MLP (1-D fast path, numpy views,
    # thresholds re-applied only when they change) against its torch path.
    import torch

    from neuropil.torch import SparseMLP

    torch.manual_seed(0)
    d, h = 64, 160
    lin = [torch.nn.Linear(a, b, bias=False) for a, b in ((d, h), (d, h), (h, d))]
    mlp = SparseMLP(*lin, activation="silu", threshold=0.05, method=method, t_in=0.5)
    x = torch.randn(2, 5, d)
    shapes = [x[0, 0], x[:1, :1], x[:1, :3], x.transpose(0, 1)[:1]]  # last: not contiguous
    with torch.no_grad():
        for _step in range(2):
            for xi in shapes:
                y_rust = mlp(xi)
                mlp.rust_max_rows = 0
                y_torch = mlp(xi)
                mlp.rust_max_rows = 8
                assert y_rust.shape == xi.shape and y_rust.dtype == torch.float32
                np.testing.assert_allclose(y_rust.numpy(), y_torch.numpy(), atol=1e-5, rtol=1e-4)
            # New thresholds reach the Rust layer built at the first call.
            mlp.threshold, mlp.t_in = 0.2, 1.0
        assert mlp.rust_ffn().stats()["rows"] == 2 * (1 + 1 + 3 + 2)
        # A gate bias added after construction sends calls to the torch path
        # (the Rust kernels take none), which includes it.
        mlp.gate.bias = torch.nn.Parameter(torch.full((h,), 0.5))
        y = mlp(x[0, 0])
        mlp.rust_max_rows = 0
        np.testing.assert_allclose(y.numpy(), mlp(x[0, 0]).numpy(), atol=1e-6)
        assert mlp.rust_ffn().stats()["rows"] == 2 * (1 + 1 + 3 + 2)


def _tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(cfg).eval()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_sparsify_mlp_keeps_the_state_dict_keys_and_sees_new_weights(kind):
    # The patched model keeps the original model's keys (plus one calibration
    # buffer per FFN) and loads its checkpoints, and a state load or an
    # in-place update after a Rust call reaches the kernel.
    import torch

    from neuropil.torch import sparsify_mlp

    model = tiny_llama() if kind == "llama" else _tiny_bert()
    keys = list(model.state_dict())
    other = (tiny_llama() if kind == "llama" else _tiny_bert()).state_dict()
    for v in other.values():
        if v.is_floating_point():
            v.mul_(1.5)
    ids = torch.randint(0, 100, (1, 12))
    th = sparsify_mlp(model, 0.3, ids, method="cats")
    new_keys = [k for k in model.state_dict() if k not in keys]
    assert sorted(new_keys) == sorted(f"{name}.sparse_config" for name in th)
    assert [k for k in model.state_dict() if k in keys] == keys
    mlp = model.model.layers[0].mlp if kind == "llama" else model.encoder.layer[0].intermediate
    d = mlp.up.in_features
    x = torch.randn(1, 1, d)

    def check():
        with torch.no_grad():
            y_rust = mlp(x)
            mlp.rust_max_rows = 0
            y_torch = mlp(x)
            mlp.rust_max_rows = 8
        np.testing.assert_allclose(y_rust.numpy(), y_torch.numpy(), atol=1e-5, rtol=1e-4)
        return y_rust

    before = check()
    model.load_state_dict(other)  # strict: the original keys, nothing else
    after = check()
    assert not np.allclose(before.numpy(), after.numpy())
    with torch.no_grad():
        mlp.down.weight.mul_(-1.0)  # in place, as an optimizer step writes
    np.testing.assert_allclose(check().numpy(), -after.numpy() + 2 * _down_bias(mlp), atol=1e-5)
    if kind == "bert":
        out = model.encoder.layer[0].output
        assert out.dense.weight is mlp.down.weight  # one tensor, kept under output.dense


def _down_bias(mlp):
    b = mlp.down.bias
    return 0.0 if b is None else b.detach().numpy()


def _logits(model, ids):
    import torch

    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    ("kind", "method"), [("llama", "teal"), ("llama", "cats"), ("bert", "teal")]
)
def test_sparsify_mlp_state_dict_carries_the_calibration(kind, method, tmp_path):
    # Calibrate, save the state dict (torch.save, or save_pretrained's
    # safetensors), load it into a fresh model sparsified otherwise: the same
    # thresholds, method and outputs, on the torch path and the Rust kernel.
    import io

    import torch
    from safetensors.torch import load_file

    from neuropil.torch import sparsify_mlp

    build = tiny_llama if kind == "llama" else _tiny_bert
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    model = build()
    sparsify_mlp(model, 0.5, ids, method=method)
    name = "model.layers.0.mlp" if kind == "llama" else "encoder.layer.0.intermediate"
    mlp = model.get_submodule(name)
    x = torch.randn(1, 1, mlp.up.in_features)
    with torch.no_grad():
        want_full, want_token = _logits(model, ids), mlp(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    model.save_pretrained(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    for state in (torch.load(io.BytesIO(buf.getvalue())), load_file(files[0])):
        fresh = build()
        other = "cats" if method == "teal" else "teal"
        sparsify_mlp(fresh, 0.2, ids[:, :8], method=other)  # other thresholds and method
        fresh.load_state_dict(state)
        got = fresh.get_submodule(name)
        assert (got.method, got.threshold, got.t_in) == (mlp.method, mlp.threshold, mlp.t_in)
        assert torch.equal(_logits(fresh, ids), want_full)
        with torch.no_grad():
            assert torch.equal(got(x), want_token)
        assert got.rust_ffn().stats()["calls"] == 1  # (the token went to the kernel)
        assert type(got.rust_ffn()) is type(mlp.rust_ffn())


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_mlp_pickled_by_the_previous_release_still_runs(method):
    # torch.save(model) pickles each module's __dict__: one written before
    # the Rust copy became `_rust` holds `_ffn`/`_ffn_key` and a `_seen` pair
    # (it raised AttributeError: no attribute '_rust' on its first call).
    import torch

    from neuropil.torch import SparseMLP

    torch.manual_seed(0)
    d, h = 32, 64
    layers = [torch.nn.Linear(d, h, bias=False), torch.nn.Linear(d, h, bias=False),
              torch.nn.Linear(h, d, bias=False)]  # fmt: skip
    mlp = SparseMLP(*layers, "silu", threshold=0.05, method=method, t_in=0.1)
    x = torch.randn(1, 1, d)
    with torch.no_grad():
        want = mlp(x)
    state = {k: v for k, v in mlp.__dict__.items() if k != "_rust"}
    state.update(_ffn=mlp.rust_ffn(), _ffn_key=None, _seen=mlp._seen[:2])
    old = unpickle_tampered(mlp, state)
    with torch.no_grad():
        assert torch.equal(old(x), want)
        mlp.threshold = old.threshold = 0.2
        assert torch.equal(old(x), mlp(x))
    assert old.rust_ffn() is not None and "_ffn" not in old.__dict__


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_mlp_pickled_with_a_rust_copy_keyed_by_versions_runs(method, gated):
    # A module pickled after its first call by the version before the Rust
    # copy's key held each weight's storage (commit 3a5a72a) holds `_rust` =
    # ((method, layers, held parameters, their versions), ffn): the key
    # survived the load and its first call raised "too many values to unpack".
    # The state is the one that version pickles (checked against a real pickle
    # of it): its __dict__ as it is after a call.
    import torch
    from torch import nn

    from neuropil.torch import SparseMLP

    torch.manual_seed(0)
    d, h = 32, 64
    gate = nn.Linear(d, h, bias=False) if gated else None
    layers = (gate, nn.Linear(d, h, bias=not gated), nn.Linear(h, d, bias=not gated))
    mlp = SparseMLP(*layers, "silu", threshold=0.05, method=method, t_in=0.1)
    x = torch.randn(1, 1, d)
    with torch.no_grad():
        want = mlp(x)
    gate, up, down = layers  # (what that version's Rust copy held)
    held = [gate and gate.weight, up.weight, down.weight, down.bias, None if gate else up.bias]
    held = [p for p in held if p is not None]
    key = (method, layers, held, [p._version for p in held])
    state = dict(mlp.__dict__, _rust=(key, mlp.rust_ffn()))
    old = unpickle_tampered(mlp, state)
    fresh = SparseMLP(old.gate, old.up, old.down, "silu", threshold=0.05, method=method,
                      t_in=0.1)  # fmt: skip
    with torch.no_grad():
        assert torch.equal(old(x), fresh(x)) and torch.equal(old(x), want)
        assert old.rust_ffn().stats()["calls"] == 2  # (the token went to the kernel)
        old.up.weight.data = old.up.weight.data * 2  # (its new key sees a change)
        assert torch.equal(old(x), fresh(x)) and not torch.equal(old(x), want)


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_mlp_rust_ffn_has_the_current_thresholds(method):
    # forward passes its thresholds with each call and leaves the shared copy
    # alone; rust_ffn() gave that copy with the thresholds of its build, so a
    # direct call of it after a threshold change computed another FFN.
    import torch

    from neuropil.torch import SparseMLP

    torch.manual_seed(0)
    d, h = 32, 64
    layers = [torch.nn.Linear(d, h, bias=False), torch.nn.Linear(d, h, bias=False),
              torch.nn.Linear(h, d, bias=False)]  # fmt: skip
    mlp = SparseMLP(*layers, "silu", threshold=0.05, method=method, t_in=0.1)
    x = torch.randn(1, d)
    with torch.no_grad():
        mlp(x)  # (the copy is built here)
        for t, t_in in ((0.2, 0.3), (None, None), (0.01, 0.0)):
            mlp.threshold = t
            if method == "teal":
                mlp.t_in = t_in
            ffn = mlp.rust_ffn()
            if method == "teal":
                assert (ffn.t_in, ffn.t_hidden) == (mlp.t_in, mlp.threshold)
            else:
                assert (ffn.threshold, ffn.top_k) == (mlp.threshold, None)
            want = mlp(x)[0] if t is not None else None  # (dense: the torch path)
            if want is not None:
                assert torch.equal(torch.from_numpy(ffn(x[0].numpy())), want)


def test_sparse_mlp_calibration_buffer_edits_casts_and_bad_states():
    import torch

    from neuropil.torch import sparsify_mlp

    model = tiny_llama()
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    sparsify_mlp(model, 0.5, ids)
    mlp = model.model.layers[1].mlp
    x = torch.randn(1, 1, 64)

    def token():  # the Rust kernel, then the torch path
        with torch.no_grad():
            y = mlp(x)
            mlp.rust_max_rows = 0
            torch.testing.assert_close(y, mlp(x), atol=1e-5, rtol=1e-4)
            mlp.rust_max_rows = 8
        return y

    calibrated = token()
    # An in-place write to the buffer after the kernel cached the threshold.
    with torch.no_grad():
        mlp.sparse_config[1] = 0.0
    assert mlp.threshold == 0.0
    mlp_dense = token()
    assert not torch.equal(mlp_dense, calibrated)
    sd = model.state_dict()
    with torch.no_grad():
        sd["model.layers.1.mlp.sparse_config"][1] = 1e9  # (a view of the buffer)
    assert mlp.threshold == 1e9 and torch.count_nonzero(token()) == 0
    mlp.threshold = None
    torch.testing.assert_close(token(), mlp_dense)
    sparsify_mlp(model, 0.5, ids)
    torch.testing.assert_close(token(), calibrated)
    # A round trip through half precision keeps the float32 thresholds (a cast
    # would round 0.0547 to 0.05469, and bfloat16 to 0.05469 or 0.05493).
    t = mlp.threshold
    t0 = model.model.layers[0].mlp.threshold
    for dtype in (torch.float16, torch.bfloat16):
        model.to(dtype)
        assert mlp.sparse_config.dtype == torch.float32 and mlp.threshold == t
        assert _logits(model, ids).dtype == dtype
        model.float()
        assert mlp.threshold == t and mlp.sparse_config.dtype == torch.float32
    before = token()
    # to("meta") and to_empty keep the calibration (to_empty leaves garbage).
    state = {k: v for k, v in model.state_dict().items() if "sparse_config" not in k}
    model.to("meta").to_empty(device="cpu")
    model.load_state_dict(state)  # the dense model's own checkpoint
    assert mlp.threshold == t
    assert torch.equal(token(), before)
    # Malformed states, as torch treats a shape mismatch: load_state_dict's
    # RuntimeError names the key, the expected and the found value; that entry
    # is not copied, and the rest of the state (which torch walks before
    # raising) is loaded. (It raised FormatError in the middle of the walk.)
    key = "model.layers.1.mlp.sparse_config"
    first = model.model.layers[0].mlp
    for bad, found in (
        (torch.tensor([2.0, 0.1, float("nan")]), r"got \[2\.0"),
        (torch.tensor([0.0, -0.1, float("nan")]), r"got \[0\.0, -0\.1"),
        (torch.tensor([1.0, float("inf"), 0.1]), r"got \[1\.0, inf"),
        (torch.zeros(2), r"shape \(3,\).*got torch.float32 \(2,\)"),
        (torch.zeros(3, dtype=torch.int64), "got torch.int64"),
        ("0.1", "got str"),
    ):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["model.layers.0.mlp.sparse_config"][1] = 0.5  # (a valid change, loaded)
        state["model.norm.weight"] += 1.0  # (a module after the bad one, loaded)
        state[key] = bad
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=rf"{key} must be .*{found}") as e:
                model.load_state_dict(state, strict=strict)
            assert "Missing key" not in str(e.value)
            assert first.threshold == 0.5 and mlp.threshold == t
            assert torch.equal(model.model.norm.weight, state["model.norm.weight"])
        first.threshold = t0
        with torch.no_grad():
            model.model.norm.weight -= 1.0
    assert torch.equal(token(), before)
    with pytest.raises(neuropil.ArgumentError, match="threshold must be None or a finite"):
        mlp.threshold = -1.0
    with pytest.raises(neuropil.ArgumentError, match="method must be one of"):
        mlp.method = "deja-vu"


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["cats", "teal"])
def test_cuda_model_loads_a_cpu_calibration(method):
    # The CPU model's state (thresholds included) loaded into a model on the
    # GPU, sparsified otherwise: the same masking on the GPU's torch path.
    import torch

    from neuropil.torch import sparsify_mlp

    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    cpu = tiny_llama()
    sparsify_mlp(cpu, 0.5, calibration=ids, method=method)
    gpu = tiny_llama().cuda()
    sparsify_mlp(gpu, 0.1, calibration=ids.cuda())
    gpu.load_state_dict(cpu.state_dict())
    mlp_c, mlp_g = cpu.model.layers[1].mlp, gpu.model.layers[1].mlp
    assert mlp_g.sparse_config.device.type == "cuda"
    assert (mlp_g.method, mlp_g.threshold, mlp_g.t_in) == (
        mlp_c.method,
        mlp_c.threshold,
        mlp_c.t_in,
    )
    with torch.no_grad():
        torch.testing.assert_close(
            gpu(ids.cuda()).logits.cpu(), cpu(ids).logits, atol=1e-3, rtol=1e-3
        )
        x = torch.randn(1, 1, 64)
        torch.testing.assert_close(mlp_g(x.cuda()).cpu(), mlp_c(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_mlp_traces_and_exports_its_masking(method):
    # Under no_grad a token call goes to the Rust kernel, whose numpy output
    # torch.jit.trace recorded as a constant (every later input gave the
    # traced token's result) and torch.export could not read at all.
    import warnings

    import torch

    from neuropil.torch import SparseMLP

    torch.manual_seed(0)
    lin = [torch.nn.Linear(a, b, bias=False) for a, b in ((16, 40), (16, 40), (40, 16))]
    mlp = SparseMLP(*lin, activation="silu", threshold=0.05, method=method, t_in=0.1)
    x1, x2 = torch.randn(2, 1, 16)

    def torch_path(x):
        mlp.rust_max_rows = 0
        y = mlp(x)
        mlp.rust_max_rows = 8
        return y

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(mlp, x1, check_trace=False)
        torch.testing.assert_close(traced(x2), torch_path(x2))
        for strict in (False, True):
            exported = torch.export.export(mlp, (x1,), strict=strict).module()
            torch.testing.assert_close(exported(x2), torch_path(x2))
        assert mlp.rust_ffn().stats()["calls"] == 0  # (the kernel never ran)
        torch.testing.assert_close(mlp(x2), torch_path(x2), atol=1e-5, rtol=1e-4)


def _compiled_model_follows_the_eager_one(device):
    # torch.compile(fullgraph=True) failed with "Could not guard on
    # data-dependent expression" at the buffer's version check (grad mode on
    # CPU, every call on CUDA). Compiled, the model gives the eager outputs,
    # and a threshold set or loaded after compiling reaches the compiled model.
    import torch

    from neuropil.torch import SparseMLP, sparsify_mlp

    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    model = tiny_llama().to(device)
    sparsify_mlp(model, 0.5, ids.to(device))
    mlp = model.model.layers[1].mlp
    x = ids[:1, :12].to(device)  # (more rows than rust_max_rows: no kernel call in the graph)
    compiled = torch.compile(model, backend="eager", fullgraph=True)

    def same(y, want):
        if device == "cpu":  # (the same ops in the same order)
            assert torch.equal(y, want)
        else:
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)

    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            same(compiled(x).logits, model(x).logits)
    calibrated = model(x).logits
    mlp.threshold = 0.0
    dense = model(x).logits
    assert not torch.allclose(dense, calibrated)
    same(compiled(x).logits, dense)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.sparse_config"][1] = 1e9  # (every neuron masked)
    model.load_state_dict(state)
    masked = model(x).logits
    assert not torch.allclose(masked, dense)
    same(compiled(x).logits, masked)
    # The default backend (inductor) on one block: same masking up to rounding.
    torch.manual_seed(0)
    lin = [torch.nn.Linear(a, b, bias=False) for a, b in ((16, 40), (16, 40), (40, 16))]
    block = SparseMLP(*lin, activation="silu", threshold=0.05, method="teal", t_in=0.1)
    block = block.to(device)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(12, 16, device=device)
    for t in (0.05, 0.3):
        block.threshold = t
        torch.testing.assert_close(compiled(x), block(x), atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_follows_the_eager_model():
    _compiled_model_follows_the_eager_one("cpu")


@pytest.mark.cuda
def test_torch_compile_fullgraph_follows_the_eager_model_on_cuda():
    _compiled_model_follows_the_eager_one("cuda")


def test_a_calibration_made_under_inference_mode_loads_in_and_out_of_it():
    # sparsify_mlp under torch.inference_mode made the buffer an inference
    # tensor: a later load_state_dict outside the mode raised "While copying
    # the parameter named ...sparse_config", and one inside it was not seen
    # (calls kept the old threshold while state_dict carried the new one).
    import torch

    from neuropil.torch import sparsify_mlp

    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    model = tiny_llama()
    with torch.inference_mode():
        sparsify_mlp(model, 0.5, ids)
    mlp = model.model.layers[1].mlp
    key = "model.layers.1.mlp.sparse_config"
    x = torch.randn(1, 1, 64)
    for mode, t in ((torch.no_grad, 0.0), (torch.inference_mode, 1e9), (torch.no_grad, 0.25)):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state[key][1] = t
        with mode():
            model.load_state_dict(state)
            assert mlp.threshold == model.state_dict()[key][1].item() == t
            y = mlp(x)  # (the Rust kernel)
            mlp.rust_max_rows = 0
            torch.testing.assert_close(mlp(x), y, atol=1e-5, rtol=1e-4)
            mlp.rust_max_rows = 8
            if t == 1e9:
                assert torch.count_nonzero(y) == 0
            a = torch.nn.functional.silu(mlp.gate(x))
            want = mlp.down(torch.where(a.abs() > t, a, torch.zeros_like(a)) * mlp.up(x))
            torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_mlp_takes_an_empty_batch(method):
    # A batch of no tokens (an empty shard, a fully cropped sequence) gives an
    # empty result, as nn.Linear does, rather than a ShapeError from the kernel.
    import torch

    from neuropil.torch import SparseMLP

    lin = [torch.nn.Linear(a, b, bias=False) for a, b in ((16, 40), (16, 40), (40, 16))]
    mlp = SparseMLP(*lin, activation="silu", threshold=0.05, method=method, t_in=0.1)
    with torch.no_grad():
        for shape in ((0, 16), (2, 0, 16), (0, 1, 16)):
            assert mlp(torch.randn(shape)).shape == shape


def test_bfloat16_torch_weights_and_inputs_are_read_as_float32():
    # Hugging Face weights are often bfloat16, which has no numpy dtype.
    import torch

    from neuropil.neurons import InputSparseFFN

    g, u, dn = (torch.from_numpy(a).to(torch.bfloat16) for a in weights(gated=True))
    x = torch.randn(3, g.shape[1]).to(torch.bfloat16)
    f32 = [t.float().numpy() for t in (g, u, dn)]
    for cls in (SparseFFN, InputSparseFFN):
        got = cls(g, u, dn, activation="silu")(x)
        want = cls(*f32, activation="silu")(x.float().numpy())
        np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_sparsify_then_quantize_and_inference_mode(kind):
    # quantize_model after sparsify_mlp quantizes the patched layers (the torch
    # path then runs them); a model used under torch.inference_mode keeps the
    # Rust path.
    import torch

    from neuropil.torch import QuantizedLinear, quantize_model, sparsify_mlp

    model = tiny_llama() if kind == "llama" else _tiny_bert()
    ids = torch.randint(0, 100, (1, 12))
    sparsify_mlp(model, 0.3, ids, method="cats")
    mlp = model.model.layers[0].mlp if kind == "llama" else model.encoder.layer[0].intermediate
    x = torch.randn(1, 1, mlp.up.in_features)
    with torch.inference_mode():
        y_rust = mlp(x)
        assert mlp.rust_ffn().stats()["calls"] == 1
    with torch.no_grad():
        full = model(ids).last_hidden_state if kind == "bert" else model(ids).logits
    quantize_model(model, bits=8, group_size=32)
    assert isinstance(mlp.up, QuantizedLinear)
    with torch.no_grad():
        y_q = mlp(x)
        full_q = model(ids).last_hidden_state if kind == "bert" else model(ids).logits
    np.testing.assert_allclose(y_q.numpy(), y_rust.numpy(), atol=0.05, rtol=0.05)
    np.testing.assert_allclose(full_q.numpy(), full.numpy(), atol=0.1, rtol=0.1)


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_quantize_then_sparsify_masks_the_quantized_layers(method):
    # The other order (a model quantized first) used to find no MLP to sparsify.
    # The SparseMLP runs the QuantizedLinear layers on the masked values: it
    # equals the masking done by hand with the same layers and thresholds.
    import torch
    import torch.nn.functional as F

    from neuropil.torch import QuantizedLinear, SparseMLP, quantize_model, sparsify_mlp

    model = quantize_model(tiny_llama(), bits=4, group_size=32, skip=["lm_head"])
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        dense = model(ids).logits
    sparsify_mlp(model, 0.0, ids, method=method)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    sparsify_mlp(model, 0.5, ids, method=method)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, SparseMLP) and isinstance(mlp.gate, QuantizedLinear)
    assert mlp.rust_ffn() is None  # quantized layers: the torch path
    x = torch.randn(3, 64)
    with torch.no_grad():
        if method == "teal":
            xm = torch.where(x.abs() > mlp.t_in, x, torch.zeros_like(x))
            h = F.silu(mlp.gate(xm)) * mlp.up(xm)
            want = mlp.down(torch.where(h.abs() > mlp.threshold, h, torch.zeros_like(h)))
        else:
            a = F.silu(mlp.gate(x))
            a = torch.where(a.abs() > mlp.threshold, a, torch.zeros_like(a))
            want = mlp.down(a * mlp.up(x))
        torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=1e-5)
        assert not torch.equal(model(ids).logits, dense)


def test_load_quantized_checks_the_calibrations_before_the_model_changes(tmp_path):
    # A file with a malformed sparse_config: FormatError naming it, and the
    # model keeps its float layers and its state (load_state_dict would have
    # refused it only after the layers were replaced).
    import torch

    from neuropil.quant import load_file, save_file
    from neuropil.torch import (
        QuantizedLinear,
        load_quantized,
        quantize_model,
        save_quantized,
        sparsify_mlp,
    )

    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    model = tiny_llama()
    sparsify_mlp(model, 0.5, ids)
    good = tmp_path / "good.safetensors"
    save_quantized(quantize_model(model, bits=8, group_size=32), good)
    key = "model.layers.1.mlp.sparse_config"
    entries = load_file(good)
    entries[key] = np.array([0.0, -1.0, np.nan], dtype=np.float32)
    bad = tmp_path / "bad.safetensors"
    save_file(bad, entries)
    fresh = tiny_llama()
    sparsify_mlp(fresh, 0.2, ids)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(neuropil.FormatError, match=rf"{key} must be .*got \[0\.0, -1\.0"):
        load_quantized(fresh, bad)
    assert not any(isinstance(m, QuantizedLinear) for m in fresh.modules())
    torch.testing.assert_close(fresh.state_dict(), state, rtol=0, atol=0, equal_nan=True)
    load_quantized(fresh, good)
    assert fresh.model.layers[1].mlp.threshold == model.model.layers[1].mlp.threshold
    assert isinstance(fresh.model.layers[1].mlp.up, QuantizedLinear)


def test_a_quantized_bert_mlp_is_refused_with_the_order_to_use():
    import torch

    from neuropil.torch import quantize_model, sparsify_mlp

    model = quantize_model(_tiny_bert(), bits=8, group_size=32)
    with pytest.raises(neuropil.ArgumentError, match="sparsify_mlp before quantize_model"):
        sparsify_mlp(model, 0.3, torch.randint(0, 100, (1, 12)))


# ------------------------------------------------------------------- pickle and deepcopy


def _firing(tokens, neurons, seed):
    """Skewed activity, as in real FFNs: a few neurons fire on most tokens."""
    rng = np.random.default_rng(seed)
    return rng.random((tokens, neurons)) < 0.7 / np.arange(1, neurons + 1) ** 0.6


@pytest.mark.parametrize(
    "config",
    [
        {"policy": "frequency", "decay": 0.98, "hysteresis": 0.25, "reclassify_every": 64},
        {"policy": "window", "window": 24, "hysteresis": 0.5},
        {"policy": "static"},
    ],
)
def test_neuron_cache_pickle_and_deepcopy(config):
    import copy
    import pickle

    def state(c):
        return (c.stats(), c.hot_neurons().tolist(), c.activation_frequency().tolist())

    mask = _firing(300, 256, 1)
    c = NeuronCache(256, 40, bytes_per_neuron=3 * 576 * 2, **config)
    c.record(mask[:150])
    c.reclassify()
    c.record(mask[150:])
    c.record([0, 5, 255])
    before = state(c)
    assert before[0]["num_hot"] == 40 and before[0]["hits"] > 0
    copies = [pickle.loads(pickle.dumps(c)), copy.deepcopy(c)]
    for back in copies:
        assert type(back) is NeuronCache and state(back) == before
        assert back._args == c._args
        back.record(mask[:70])  # the same future as the original's
        back.reclassify()
        back.reset_stats()
        back.record(mask[70:90])
    assert state(c) == before  # the copies are independent
    c.record(mask[:70])
    c.reclassify()
    c.reset_stats()
    c.record(mask[70:90])
    assert state(copies[0]) == state(copies[1]) == state(c)
    # Corrupt states: FormatError, never a broken cache.
    good = c.__getstate__()
    assert unpickle_tampered(c, good).stats() == c.stats()
    t, m = good["tensors"], good["metadata"]
    for tensors, meta in (
        ({**t, "counts": t["counts"][:-1]}, m),  # wrong shape
        ({**t, "scores": t["scores"].reshape(2, -1)}, m),
        ({**t, "hot": t["hot"].astype(np.int64)}, m),
        ({**t, "hot": np.array([3, 3], np.uint32)}, m),
        ({k: v for k, v in t.items() if k != "last"}, m),
        (t, {**m, "config": m["config"].replace('"capacity": 40', '"capacity": 400')}),
        (t, {**m, "counters": "[1, 2]"}),
        (t, {**m, "format_version": "2"}),
        (t, {**m, "classified": 1}),
    ):
        with pytest.raises(neuropil.FormatError):
            unpickle_tampered(c, {"tensors": tensors, "metadata": meta})
    for bad in ([t, m], {"tensors": t}, {"tensors": t, "metadata": m, "x": 1}):
        with pytest.raises(neuropil.FormatError):
            unpickle_tampered(c, bad)


@pytest.mark.parametrize(("dtype", "bits"), FORMATS)
@pytest.mark.parametrize("gated", [True, False])
def test_sparse_ffn_pickle_and_deepcopy(dtype, bits, gated):
    import copy
    import pickle

    rng = np.random.default_rng(4)
    g, u, dn = weights(h=192, d=64, seed=4, gated=gated)
    biases = {} if gated else {"up_bias": rng.standard_normal(192), "down_bias": np.ones(64)}
    ffn = SparseFFN(g, u, dn, "silu" if gated else "gelu", bits, hot_capacity=32,
                    dtype=dtype if bits is None else "float32", **biases)  # fmt: skip
    # Hidden-state-like inputs: a shared offset and a few large outlier dimensions.
    x = rng.standard_normal((48, 64)).astype(np.float32) + 0.5
    x[:, [3, 17]] *= 8
    t = ffn.calibrate(x[:32], sparsity=0.6)
    ffn(x[32:40])
    ffn(x[40])
    assert ffn.stats()["calls"] == 2 and len(ffn.hot_neurons()) == 32
    before = (ffn.stats(), ffn.hot_neurons().tolist())
    copies = [pickle.loads(pickle.dumps(ffn)), copy.deepcopy(ffn)]
    for back in copies:
        assert type(back) is SparseFFN and (back.stats(), back.hot_neurons().tolist()) == before
        assert (back.threshold, back.sparsity, back.top_k, back.dtype) == (t, 0.6, None, ffn.dtype)
        assert back.cache is not ffn.cache
        assert back.cache.hot_neurons().tolist() == ffn.cache.hot_neurons().tolist()
        for a, b in zip(back.weights(), ffn.weights(), strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)
        for dense in (False, True):
            assert np.array_equal(back(x[40:], dense=dense), ffn(x[40:], dense=dense))
        back.set_hot([0, 1, 2])  # independent of the original
        back.set_threshold(0.0)
        back.reset_stats()
        assert back.stats()["calls"] == 0
    assert ffn.hot_neurons().tolist() == before[1] and ffn.threshold == t
    assert ffn.stats()["calls"] == 6
    ffn.top_k = 20  # top-k and the tier survive too
    back = pickle.loads(pickle.dumps(ffn))
    assert back.top_k == 20 and np.array_equal(back(x), ffn(x))
    # Corrupt states: FormatError, never a broken FFN.
    good = ffn.__getstate__()
    assert all(
        v is None or isinstance(v, (int, float, str, dict, np.ndarray, NeuronCache))
        for v in good.values()
    )
    for change in (
        {"up": good["up"][:, :-1]},  # wrong shape
        {"down": good["down"].T.copy()},
        {"up": good["up"].astype(np.float64)},
        {"up_bias": np.zeros(7, np.float32)},
        {"hot": np.array([192], np.uint32)},
        {"hot": good["hot"].astype(np.int64)},
        {"dtype": "int3"},
        {"activation": "tanh"},
        {"threshold": -1.0},
        {"top_k": 193},
        {"sparsity": 2.0},
        {"stats": {**good["stats"], "calls": -1}},
        {"cache": "cache"},
    ):
        with pytest.raises(neuropil.FormatError):
            unpickle_tampered(ffn, {**good, **change})
    with pytest.raises(neuropil.FormatError):
        unpickle_tampered(ffn, {k: v for k, v in good.items() if k != "hot"})


def test_neuron_cache_state_of_wrong_keys_names_the_expected_and_found_keys():
    c = NeuronCache(20, capacity=4)
    good = c.__getstate__()
    expected = r"keys \['metadata', 'tensors'\]"
    with pytest.raises(neuropil.FormatError, match=rf"{expected}; got \['tensors'\]"):
        unpickle_tampered(c, {"tensors": good["tensors"]})
    with pytest.raises(
        neuropil.FormatError, match=rf"{expected}; got \['metadata', 'tensors', 'x'\]"
    ):
        unpickle_tampered(c, {**good, "x": 1})
    with pytest.raises(neuropil.FormatError, match=rf"{expected}; got list"):
        unpickle_tampered(c, [good["tensors"], good["metadata"]])
    with pytest.raises(neuropil.FormatError, match="metadata must be a dict; got list"):
        unpickle_tampered(c, {**good, "metadata": []})


def test_sparse_ffn_state_refuses_a_cache_or_hot_set_that_does_not_fit():
    g, u, dn = weights(h=96, d=40, seed=7)
    ffn = SparseFFN(g, u, dn, hot_capacity=8)
    ffn.calibrate(np.random.default_rng(7).standard_normal((16, 40), dtype=np.float32), 0.5)
    good = ffn.__getstate__()
    assert len(good["hot"]) == 8 and good["cache"].num_neurons == 96
    with pytest.raises(
        neuropil.FormatError,
        match=r"state: cache must have num_neurons 96 \(the hidden size\); got 95",
    ):
        unpickle_tampered(ffn, {**good, "cache": NeuronCache(95, capacity=8)})
    with pytest.raises(
        neuropil.FormatError, match="state: hot must hold at most hot_capacity = 8 neurons; got 9"
    ):
        unpickle_tampered(ffn, {**good, "hot": np.arange(9, dtype=np.uint32)})
    back = unpickle_tampered(ffn, {**good, "hot": np.arange(8, dtype=np.uint32)})
    assert back.hot_neurons().tolist() == list(range(8))
    # set_hot keeps the same bound, so every live FFN pickles into a state that loads.
    with pytest.raises(neuropil.ArgumentError, match="hot_capacity = 8 neurons; got 9"):
        ffn.set_hot(range(9))
    unbounded = SparseFFN(g, u, dn)
    unbounded.set_hot(range(50))
    assert unpickle_tampered(unbounded, unbounded.__getstate__()).hot_neurons().size == 50


@pytest.mark.parametrize(("dtype", "bits"), FORMATS)
def test_sparse_ffn_takes_an_empty_batch(dtype, bits):
    # As nn.Linear does: (0, d) in, (0, d) out (float32), in every mode, and
    # the counters stay as they were (no call was computed).
    g, u, dn = weights()
    kw = {"bits": bits} if bits else {"dtype": dtype}
    ffn = SparseFFN(g, u, dn, hot_capacity=8, **kw)
    x = np.zeros((0, 40), np.float32)
    before = ffn.stats()
    for setup in (lambda: None, lambda: ffn.set_threshold(0.1), lambda: setattr(ffn, "top_k", 5)):
        setup()
        for xx in (x, x.astype(np.float64)):
            for dense in (False, True):
                y = ffn(xx, dense=dense)
                assert isinstance(y, np.ndarray)
                assert y.shape == (0, 40) and y.dtype == np.float32
    a = ffn.activations(x)
    assert a.shape == (0, 96) and a.dtype == np.float32
    assert ffn.stats() == before
    # Still refused: a width other than d (zero included), empty calibration.
    with pytest.raises(neuropil.ShapeError):
        ffn(np.zeros((0, 39), np.float32))
    with pytest.raises(neuropil.ShapeError, match="x must not be empty"):
        ffn(np.zeros((0, 0), np.float32))
    with pytest.raises(neuropil.ShapeError, match="samples"):
        ffn.calibrate(x, 0.5)


def test_sparse_ffn_takes_an_empty_torch_batch():
    torch = pytest.importorskip("torch")
    g, u, dn = weights()
    ffn = SparseFFN(g, u, dn)
    for dtype in (torch.float32, torch.float64):
        y = ffn(torch.zeros(0, 40, dtype=dtype))
        assert isinstance(y, torch.Tensor)
        assert y.shape == (0, 40) and y.dtype == torch.float32


def test_ragged_lists_raise_shape_error_naming_the_argument():
    # numpy's own ValueError ("setting an array element with a sequence") came out
    # bare; ShapeError is a ValueError too, so `except ValueError` still catches it.
    cache = NeuronCache(10, capacity=3)
    for ragged in ([[1, 2], [3]], [1, [2, 3]]):
        with pytest.raises(neuropil.ShapeError, match=r"^active must be .*got a ragged") as e:
            cache.record(ragged)
        assert isinstance(e.value, ValueError)
        assert "(num_neurons,)" in str(e.value) or "(10,)" in str(e.value)
        with pytest.raises(neuropil.ShapeError, match=r"^ids must be .*got a ragged"):
            cache.set_hot(ragged)
    assert cache.stats() == NeuronCache(10, capacity=3).stats()  # nothing recorded
    mask = [[True] * 10, [False] * 9 + [True]]
    cache.record(mask)  # rectangular lists still work
    same = NeuronCache(10, capacity=3)
    same.record(np.array(mask))
    assert cache.stats() == same.stats() != NeuronCache(10, capacity=3).stats()


def test_calibrating_at_sparsity_zero_computes_every_neuron():
    # "0.0 for sparsity 0, which computes every neuron": dense, not a threshold
    # of 0 (which would drop relu's zeros from the counts).
    g, u, dn = weights()
    ffn = SparseFFN(g, u, dn, activation="relu")
    x = np.random.default_rng(0).standard_normal((20, 40)).astype(np.float32)
    assert ffn.calibrate(x, 0.0) == 0.0
    assert ffn.threshold is None and ffn.top_k is None and "dense" in repr(ffn)
    ffn(x)
    assert ffn.stats()["density"] == 1.0


def test_reset_stats_zeroes_hits_and_misses_and_keeps_activity_and_hot_set():
    c = NeuronCache(10, 3)
    c.record([1, 2])
    c.reclassify()
    c.record([1, 5])
    s = c.stats()
    assert (s["hits"], s["misses"], s["total_activations"]) == (1, 1, 2)
    freq, hot = c.activation_frequency(), c.hot_neurons()
    c.reset_stats()
    s = c.stats()
    assert (s["hits"], s["misses"], s["hit_rate"]) == (0, 0, 0.0)
    assert (s["total_activations"], s["events"], s["num_hot"]) == (2, 4, 2)
    np.testing.assert_array_equal(c.activation_frequency(), freq)
    np.testing.assert_array_equal(c.hot_neurons(), hot)


def test_reprs_name_the_mode():
    # dense until a threshold or top_k is set; top_k takes precedence over threshold
    g, u, dn = weights(h=8, d=4)
    ffn = SparseFFN(g, u, dn, hot_capacity=4)
    assert repr(ffn) == "SparseFFN(h=8, d=4, silu, float32, dense, hot tier 0)"
    ffn.set_threshold(0.25)
    ffn.set_hot([1, 2])
    assert repr(ffn) == "SparseFFN(h=8, d=4, silu, float32, threshold=0.25, hot tier 2)"
    ffn.top_k = 3
    assert repr(ffn) == "SparseFFN(h=8, d=4, silu, float32, top_k=3, hot tier 2)"
    assert repr(NeuronCache(10, 3)) == (
        "NeuronCache(10 neurons, policy='frequency', hot 0/3, hit rate 0.000)"
    )


@pytest.mark.parametrize("method", ["cats", "teal"])
def test_sparse_mlp_sees_every_replacement_of_a_weight(method):
    # The Rust copy was keyed on the parameters' versions, which `p.data = w`
    # does not bump (nor a cast of one layer alone, which assigns p.data, nor
    # a new Parameter object, whose versions were never looked at): the calls
    # after such a change kept computing with the old weights.
    import copy
    import pickle

    import torch
    from torch import nn

    from neuropil.torch import SparseMLP

    torch.manual_seed(0)
    d = h = 48  # (square weights: a transposed view keeps storage, address and shape)
    layers = [nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False),
              nn.Linear(h, d, bias=False)]  # fmt: skip
    mlp = SparseMLP(*layers, "silu", threshold=0.05, method=method, t_in=0.1)
    x = torch.randn(1, 1, d)

    def built_now() -> torch.Tensor:
        """The call of a module around the same layers, its copy built now."""
        return SparseMLP(mlp.gate, mlp.up, mlp.down, "silu", threshold=0.05, method=method,
                         t_in=0.1)(x)  # fmt: skip

    memory = np.random.default_rng(0).standard_normal((h, d), dtype=np.float32)
    changes = {
        "p.data = w": lambda: setattr(mlp.up.weight, "data", torch.randn(h, d)),
        "a new Parameter": lambda: setattr(mlp.down, "weight", nn.Parameter(torch.randn(d, h))),
        "a cast of one layer": lambda: mlp.gate.half(),  # (rounds the weights)
        "a transposed view": lambda: setattr(mlp.up.weight, "data", mlp.up.weight.data.t()),
        "numpy memory": lambda: setattr(mlp.down.weight, "data", torch.from_numpy(memory)),
        # New data at the very address (and shape, dtype, version) of the
        # freed one: the old storage is gone, so its key matches nothing.
        "other values where freed ones were": lambda: (
            memory.__setitem__(slice(None), -memory),
            setattr(mlp.down.weight, "data", torch.from_numpy(memory)),
        ),
    }
    with torch.no_grad():
        y = mlp(x)
        for name, change in changes.items():
            change()
            want = built_now()
            assert not torch.equal(want, y), name  # (the change changes the result)
            y = mlp(x)
            assert torch.equal(y, want), name
        # Unchanged weights: the copy stays (built once, not on every call).
        ffn = mlp.rust_ffn()
        assert torch.equal(mlp(x), y) and mlp.rust_ffn() is ffn
        # The copy is not pickled nor deep-copied (its key holds weak
        # references); the copies build their own.
        for other in (pickle.loads(pickle.dumps(mlp)), copy.deepcopy(mlp)):
            assert other._rust is None and torch.equal(other(x), y)
            assert other.rust_ffn() is not ffn

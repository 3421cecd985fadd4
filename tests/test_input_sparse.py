"""InputSparseFFN (TEAL): exactness against a numpy reference in every weight
format, calibration, the torch paths, sparsify_mlp(method="teal") on the real
models, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import neuropil
from conftest import run_python, unpickle_tampered
from neuropil.neurons import InputSparseFFN
from test_neurons import FORMATS, act_np, tiny_llama, weights


def teal_reference(x, gate, up, down, act, t_in=None, t_h=None, up_bias=None, down_bias=None):
    """The dense FFN in float64 on masked inputs, then masked hidden values."""
    x = np.atleast_2d(x).astype(np.float64)
    if t_in is not None:
        x = np.where(np.abs(x) > t_in, x, 0.0)
    if gate is not None:
        h = act_np(act, x @ gate.T.astype(np.float64)) * (x @ up.T.astype(np.float64))
    else:
        pre = x @ up.T.astype(np.float64) + (0 if up_bias is None else up_bias)
        h = act_np(act, pre)
    if t_h is not None:
        h = np.where(np.abs(h) > t_h, h, 0.0)
    y = h @ down.T.astype(np.float64)
    return y if down_bias is None else y + down_bias


@pytest.mark.parametrize(("dtype", "bits"), FORMATS)
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_matches_numpy_masking_in_every_format(dtype, bits, act, gated):
    # h = 600: several neuron tiles of 64, and an even h and d for 4-bit.
    g, u, dn = weights(h=600, d=40, gated=gated)
    rng = np.random.default_rng(1)
    ub = rng.standard_normal(600).astype(np.float32) * 0.1 if not gated else None
    db = rng.standard_normal(40).astype(np.float32) * 0.1
    x = rng.standard_normal((3, 40)).astype(np.float32)
    kw = {"bits": bits} if bits else {"dtype": dtype}
    ffn = InputSparseFFN(g, u, dn, activation=act, up_bias=ub, down_bias=db, **kw)
    assert ffn.dtype == dtype
    rg, ru, rd = ffn.weights()  # what the kernel stores (rounded or dequantized)
    if dtype == "float32":
        np.testing.assert_array_equal(ru, u)
        np.testing.assert_array_equal(rd, dn)
    if bits:
        # One scale per input column slice of <= 512 neurons: within half a
        # step of the column's absmax scale.
        step = np.abs(u).max(0, keepdims=True) / (127 if bits == 8 else 7)
        assert np.all(np.abs(ru - u) <= step / 2 + 1e-6)
    ref = teal_reference(x, rg, ru, rd, act, up_bias=ub, down_bias=db)
    np.testing.assert_allclose(ffn(x), ref, atol=2e-4, rtol=1e-4)
    for t_in, t_h in ((0.5, None), (None, 0.2), (0.8, 0.1), (3.0, 0.0)):
        ffn.set_thresholds(t_in, t_h)
        hid = ffn.hidden(x, t_in)
        # The hidden mask is decided on the kernel's own f32 values: skip
        # draws where one lies within rounding of the threshold.
        if t_h is not None and np.min(np.abs(np.abs(hid) - t_h)) < 1e-4:
            continue
        want = teal_reference(x, rg, ru, rd, act, t_in, t_h, up_bias=ub, down_bias=db)
        np.testing.assert_allclose(ffn(x), want, atol=2e-4, rtol=1e-4)
        one = ffn(x[1])  # the per-token path: 1-D in, 1-D out
        assert one.shape == (40,) and one.dtype == np.float32
        np.testing.assert_allclose(one, want[1], atol=2e-4, rtol=1e-4)
        # The converting path (big-endian input) gives the same values.
        np.testing.assert_array_equal(ffn(x[1].astype(">f4")), one)
        np.testing.assert_allclose(ffn(x[1], dense=True), ref[1], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(ffn(x, dense=True), ref, atol=2e-4, rtol=1e-4)


@settings(max_examples=20, deadline=None)
@given(
    h=st.integers(1, 300).map(lambda v: 2 * v),
    d=st.integers(1, 40).map(lambda v: 2 * v),
    n=st.integers(1, 4),
    s=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**32 - 1),
)
def test_calibration_hits_the_sparsity_and_counts_what_it_kept(h, d, n, s, seed):
    g, u, dn = weights(h=h, d=d, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    ffn = InputSparseFFN(g, u, dn)
    t_in, t_h = ffn.calibrate(x, s)
    kept_in = (np.abs(x) > t_in).mean() if s > 0 else 1.0
    # The quantile interpolates between two of the n*d values (and ties keep
    # together), so the kept fraction is 1 - s within one value.
    if s > 0 and len(np.unique(np.abs(x))) == x.size:
        assert abs(kept_in - (1 - s)) <= 1 / x.size + 1e-9
    ffn(x)
    st_ = ffn.stats()
    assert st_["rows"] == n and st_["calls"] == 1
    assert st_["kept_inputs"] == int(np.sum(np.abs(x) > t_in)) if s > 0 else n * d
    hid = ffn.hidden(x, t_in if s > 0 else None)
    want_h = int(np.sum(np.abs(hid) > t_h)) if s > 0 else n * h
    assert st_["kept_hidden"] == want_h
    ffn.reset_stats()
    assert ffn.stats()["calls"] == 0


def test_torch_inputs_and_the_device_path_logic():
    torch = pytest.importorskip("torch")
    for gated in (True, False):
        g, u, dn = weights(h=200, d=40, gated=gated)
        rng = np.random.default_rng(5)
        ub = rng.standard_normal(200).astype(np.float32) * 0.1 if not gated else None
        db = rng.standard_normal(40).astype(np.float32) * 0.1
        x = rng.standard_normal((3, 40)).astype(np.float32)
        ffn = InputSparseFFN(g, u, dn, "gelu", up_bias=ub, down_bias=db, thresholds=(0.5, 0.05))
        y = ffn(torch.from_numpy(x))
        assert isinstance(y, torch.Tensor)
        # The torch path CUDA tensors take, run here on CPU tensors.
        got = ffn._torch_forward(torch.from_numpy(x), ffn.t_in, ffn.t_hidden).numpy()
        np.testing.assert_allclose(got, y.numpy(), atol=1e-5, rtol=1e-5)


def test_bad_input_raises_clear_errors():
    g, u, dn = weights(h=64, d=40)
    with pytest.raises(neuropil.ArgumentError, match="bits must be None, 8 or 4; got 3"):
        InputSparseFFN(g, u, dn, bits=3)
    with pytest.raises(neuropil.ArgumentError, match="dtype must be"):
        InputSparseFFN(g, u, dn, dtype="bfloat16")
    with pytest.raises(neuropil.ShapeError, match=r"down must have shape \(40, 64\)"):
        InputSparseFFN(g, u, dn[:, :63])
    with pytest.raises(neuropil.ShapeError, match="gate"):
        InputSparseFFN(g[:10], u, dn)
    with pytest.raises(neuropil.NeuropilError, match="divisible by 2 for int4"):
        InputSparseFFN(g[:63], u[:63], dn[:, :63], bits=4)
    ffn = InputSparseFFN(g, u, dn)
    with pytest.raises(neuropil.ShapeError, match=r"\(40,\) or \(n, 40\); got \(39,\)"):
        ffn(np.zeros(39, np.float32))
    with pytest.raises(neuropil.ShapeError, match=r"\(n, 40\); got \(2, 39\)"):
        ffn(np.zeros((2, 39), np.float32))
    with pytest.raises(neuropil.ArgumentError, match="t_in must be a finite value >= 0"):
        ffn.set_thresholds(-1.0, None)
    with pytest.raises(neuropil.ArgumentError, match="t_hidden"):
        ffn.set_thresholds(None, float("nan"))
    with pytest.raises(neuropil.ArgumentError, match=r"sparsity must be in \[0, 1\); got 1.0"):
        ffn.calibrate(np.zeros((2, 40), np.float32), 1.0)
    with pytest.raises(neuropil.ArgumentError, match="hidden_sparsity"):
        ffn.calibrate(np.zeros((2, 40), np.float32), 0.5, hidden_sparsity=-0.1)
    with pytest.raises(neuropil.NeuropilError, match="finite"):
        ffn(np.full(40, np.nan, np.float32))


def _pair_values():
    """Pairs of thresholds, each as a tuple and in another 1-D length-2 form."""
    yield (0.25, 0.5), np.array([0.25, 0.5])
    yield (0.25, 0.5), np.array([0.25, 0.5], np.float32)
    yield (0.25, None), np.array([0.25, None], dtype=object)
    yield (None, 0.5), [None, np.float32(0.5)]
    try:
        import torch
    except ImportError:
        return
    yield (0.25, 0.5), torch.tensor([0.25, 0.5])
    yield (0.25, 0.5), torch.tensor([0.25, 0.5], dtype=torch.float64)
    yield (0.25, 0.5), [torch.tensor(0.25), np.array(0.5)]


@pytest.mark.parametrize(("pair", "given"), list(_pair_values()))
def test_thresholds_take_any_pair_of_numbers(pair, given):
    # np.array([0.1, 0.2]) was refused as "thresholds must be a pair (t_in,
    # t_hidden) of numbers or None; got array([0.1, 0.2])".
    g, u, dn = weights(h=64, d=40)
    x = np.random.default_rng(6).standard_normal((3, 40)).astype(np.float32)
    want = InputSparseFFN(g, u, dn, thresholds=pair)
    ffn = InputSparseFFN(g, u, dn, thresholds=given)
    assert (ffn.t_in, ffn.t_hidden) == (want.t_in, want.t_hidden)
    np.testing.assert_array_equal(ffn(x), want(x))


def test_threshold_setters_change_one_threshold_and_check_it():
    g, u, dn = weights(h=64, d=40)
    x = np.random.default_rng(6).standard_normal((3, 40)).astype(np.float32)
    ffn = InputSparseFFN(g, u, dn)
    ffn.t_hidden = 0.3
    assert (ffn.t_in, ffn.t_hidden) == (None, 0.3)
    ffn.t_in = 0.5
    assert (ffn.t_in, ffn.t_hidden) == (0.5, 0.3)
    np.testing.assert_array_equal(ffn(x), InputSparseFFN(g, u, dn, thresholds=(0.5, 0.3))(x))
    for name in ("t_in", "t_hidden"):
        with pytest.raises(neuropil.ArgumentError, match=name + _NUM + "nan"):
            setattr(ffn, name, float("nan"))
    assert (ffn.t_in, ffn.t_hidden) == (0.5, 0.3)
    ffn.t_hidden = None
    assert (ffn.t_in, ffn.t_hidden) == (0.5, None)


def test_memory_bytes_counts_the_stored_weights():
    # float32 holds 4 bytes per weight (at least), float16 and 8-bit less, an
    # ungated FFN (no gate) less than a gated one.
    g, u, dn = weights(h=64, d=40)
    size = {
        kw: InputSparseFFN(g, u, dn, **dict([kw])).memory_bytes
        for kw in (("dtype", "float32"), ("dtype", "float16"), ("bits", 8))
    }
    assert size[("dtype", "float32")] >= 4 * 3 * 64 * 40
    assert size[("dtype", "float32")] > size[("dtype", "float16")] > size[("bits", 8)] > 0
    assert InputSparseFFN(None, u, dn).memory_bytes < size[("dtype", "float32")]


_PAIR = (
    "thresholds must be a pair (t_in, t_hidden) of numbers or None (a tuple, list, "
    "or 1-D array or tensor of length 2); got "
)
_NUM = " must be a finite value >= 0 or None; got "


@pytest.mark.parametrize(
    ("given", "err"),
    [
        (np.array([0.1, 0.2, 0.3]), _PAIR + "ndarray of shape (3,)"),
        (np.array([[0.1, 0.2]]), _PAIR + "ndarray of shape (1, 2)"),
        (np.array(0.1), _PAIR + "ndarray of shape ()"),
        ((0.1,), _PAIR + "(0.1,)"),
        ("ab", _PAIR + "'ab'"),
        ({0.1, 0.2}, _PAIR + "{0.1, 0.2}"),
        (np.array([True, False]), "t_in" + _NUM + "True"),
        (np.array([0.1, -0.2]), "t_hidden" + _NUM + "-0.2"),
        (np.array([0.1, np.nan]), "t_hidden" + _NUM + "nan"),
        (np.array([0.1j, 0.2]), "t_in" + _NUM + "0.1j"),
    ],
)
def test_thresholds_refuse_what_is_no_pair_of_numbers(given, err):
    g, u, dn = weights(h=64, d=40)
    with pytest.raises(neuropil.ArgumentError) as e:
        InputSparseFFN(g, u, dn, thresholds=given)
    assert str(e.value) == err


def test_torch_path_helpers_are_bound_once():
    # The torch path imported _check_torch_x (and _torch_path) from neurons on
    # every call; they are bound at import, in whichever order the modules load.
    from neuropil import _input_sparse, errors, flyhash, neurons, quant

    for name in ("_check_torch_x", "_torch_path", "_as_numpy"):
        assert getattr(_input_sparse, name) is getattr(neurons, name)
    # (and the shared checks come from errors, not through another module)
    assert _input_sparse._real is neurons._real is errors._real
    assert quant._check_level is flyhash._check_level is errors._check_level
    for first in ("neuropil._input_sparse", "neuropil.neurons", "neuropil.quant"):
        r = run_python(
            f"import {first}\n"
            "from neuropil import _input_sparse as i, neurons as n\n"
            "assert i._check_torch_x is n._check_torch_x and n.InputSparseFFN is i.InputSparseFFN"
        )
        assert r.returncode == 0, (first, r.stderr)


@pytest.mark.slow
def test_sparsify_smollm2_teal_rust_and_torch_paths_agree(smollm2):
    import copy

    import torch

    from neuropil.data import gpl3_text, license_texts
    from neuropil.torch import SparseMLP, sparsify_mlp

    model, tok = copy.deepcopy(smollm2[0]), smollm2[1]
    calib = "\n".join(t for n, t in license_texts().items() if n != "GPL-3")
    calib = tok(calib[:4000], return_tensors="pt").input_ids[:, :160]
    ev = tok(gpl3_text()[:3000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        dense_loss = float(model(ev, labels=ev).loss)
    th = sparsify_mlp(model, sparsity=0.25, calibration=calib, method="teal")
    mlp = model.model.layers[5].mlp
    assert isinstance(mlp, SparseMLP) and mlp.method == "teal"
    assert len(th) == model.config.num_hidden_layers and mlp.t_in > 0 and mlp.threshold > 0
    x = torch.randn(1, 3, 576)
    with torch.no_grad():
        y_rust = mlp(x)
        mlp.rust_max_rows = 0
        y_torch = mlp(x)
        mlp.rust_max_rows = 8
        sparse_loss = float(model(ev, labels=ev).loss)
    assert type(mlp.rust_ffn()).__name__ == "InputSparseFFN"
    assert mlp.rust_ffn().stats()["rows"] == 3
    np.testing.assert_allclose(y_rust.numpy(), y_torch.numpy(), atol=2e-3, rtol=1e-4)
    assert dense_loss < sparse_loss < dense_loss + 0.1  # perplexity within ~10% at 25%
    with pytest.raises(neuropil.ArgumentError, match="method must be one of"):
        sparsify_mlp(model, sparsity=0.5, calibration=calib, method="deja-vu")
    sparsify_mlp(model, sparsity=0.0, method="teal")
    with torch.no_grad():
        assert abs(float(model(ev, labels=ev).loss) - dense_loss) < 1e-4


@pytest.mark.slow
def test_sparsify_minilm_teal_keeps_embeddings_close(minilm, sentences):
    import copy

    import torch

    from neuropil.torch import sparsify_mlp

    model = copy.deepcopy(minilm)
    texts = sentences[:64]
    dense = model.encode(texts[32:], normalize_embeddings=True)
    sparsify_mlp(model[0].auto_model, 0.25, calibration=lambda: model.encode(texts[:32]),
                 method="teal")  # fmt: skip
    sparse = model.encode(texts[32:], normalize_embeddings=True)
    cos = (dense * sparse).sum(1)
    assert cos.mean() > 0.95 and cos.min() > 0.8
    # BERT-style FFN (biases, GELU): the Rust kernel and the torch path agree.
    mlp = model[0].auto_model.encoder.layer[2].intermediate
    x = torch.randn(1, 3, 384)
    with torch.no_grad():
        y_rust = mlp(x)
        mlp.rust_max_rows = 0
        y_torch = mlp(x)
    assert mlp.rust_ffn().stats()["rows"] == 3
    np.testing.assert_allclose(y_rust.numpy(), y_torch.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "bits"), FORMATS)
def test_cuda_tensor_matches_cpu(dtype, bits):
    import torch

    g, u, dn = weights(h=200, d=40)
    kw = {"bits": bits} if bits else {"dtype": dtype}
    ffn = InputSparseFFN(g, u, dn, thresholds=(0.3, 0.05), **kw)
    x = torch.randn(3, 40)
    y = ffn(x.cuda())
    assert y.device.type == "cuda" and y.dtype == torch.float32
    np.testing.assert_allclose(y.cpu().numpy(), ffn(x).numpy(), atol=1e-4, rtol=1e-4)
    # On a GPU the result keeps x's dtype (float32 only on the CPU)
    assert ffn(x.cuda().half()).dtype == torch.float16


def test_sparsify_teal_with_its_own_hidden_sparsity_on_a_tiny_llama():
    """Needs no model files: a seeded random Llama. The thresholds are the
    calibration quantiles, so on the calibration tokens the torch path drops
    the asked fractions of inputs and of (dense) hidden values."""
    import torch

    from neuropil.torch import sparsify_mlp

    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    th = sparsify_mlp(model, 0.3, calibration=ids, method="teal", hidden_sparsity=0.8)
    mlp = model.model.layers[1].mlp
    assert th["model.layers.1.mlp"] == mlp.threshold
    seen = []
    hook = mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(ids)  # 96 rows: the torch path, as calibration ran
    hook.remove()
    x = seen[0].reshape(-1, 64)
    h = torch.nn.functional.silu(mlp.gate(x)) * mlp.up(x)
    assert abs(float((x.abs() <= mlp.t_in).float().mean()) - 0.3) < 0.01
    assert abs(float((h.abs() <= mlp.threshold).float().mean()) - 0.8) < 0.01
    # Hidden values kept whole, inputs still masked.
    sparsify_mlp(model, 0.3, calibration=ids, method="teal", hidden_sparsity=0.0)
    assert mlp.threshold is None and mlp.t_in > 0
    with pytest.raises(neuropil.ArgumentError, match="method='teal' only"):
        sparsify_mlp(model, 0.3, calibration=ids, hidden_sparsity=0.5)
    with pytest.raises(neuropil.ArgumentError, match=r"hidden_sparsity must be in \[0, 1\)"):
        sparsify_mlp(model, 0.3, calibration=ids, method="teal", hidden_sparsity=1.0)


def test_long_calls_release_the_gil_and_short_ones_agree():
    # A long sweep runs without the GIL: another Python thread keeps running
    # meanwhile. It records the longest pause between its steps; a GIL held
    # through the native call would pause it for the whole call.
    import threading
    import time

    g, u, dn = weights(h=2048, d=512)
    ffn = InputSparseFFN(g, u, dn)
    x = np.random.default_rng(3).standard_normal((256, 512)).astype(np.float32)
    s = {"last": time.perf_counter(), "gap": 0.0, "stop": False}

    def tick():
        while not s["stop"]:
            now = time.perf_counter()
            s["gap"] = max(s["gap"], now - s["last"])
            s["last"] = now

    t = threading.Thread(target=tick)
    t.start()
    try:
        results = []
        for _ in range(3):
            time.sleep(0.01)
            s["last"], s["gap"] = time.perf_counter(), 0.0
            t0 = time.perf_counter()
            ffn(x, dense=True)  # 256 rows x 3 M weights
            took = time.perf_counter() - t0
            time.sleep(0.01)  # the ticker's next step records a pause the call caused
            results.append((took, s["gap"]))
    finally:
        s["stop"] = True
        t.join()
    assert all(took > 0.03 for took, _ in results), results  # long enough to tell
    assert min(gap / took for took, gap in results) < 0.5, results
    # Short calls keep the GIL and give the same values as the long path.
    np.testing.assert_allclose(ffn(x[0], dense=True), ffn(x, dense=True)[0], atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------- pickle and deepcopy


@pytest.mark.parametrize(("dtype", "bits"), FORMATS)
@pytest.mark.parametrize("gated", [True, False])
def test_pickle_and_deepcopy(dtype, bits, gated):
    import copy
    import pickle

    # h = 600: two input column slices (512 + 88 neurons), each with its own scales.
    g, u, dn = weights(h=600, d=40, seed=6, gated=gated)
    rng = np.random.default_rng(6)
    biases = {"down_bias": rng.standard_normal(40).astype(np.float32)}
    if not gated:
        biases["up_bias"] = rng.standard_normal(600)  # float64: converted once
    kw = {"bits": bits} if bits else {"dtype": dtype}
    ffn = InputSparseFFN(g, u, dn, "silu" if gated else "gelu", **kw, **biases)
    x = rng.standard_normal((40, 40)).astype(np.float32) * np.linspace(0.2, 3.0, 40)
    t_in, t_h = ffn.calibrate(x[:32], 0.5, hidden_sparsity=0.7)
    ffn(x[32:36])
    ffn(x[36])  # the per-token path
    before = ffn.stats()
    assert before["calls"] == 2 and before["rows"] == 5
    copies = [pickle.loads(pickle.dumps(ffn)), copy.deepcopy(ffn)]
    for back in copies:
        assert type(back) is InputSparseFFN and back.stats() == before
        assert (back.t_in, back.t_hidden, back.sparsity) == (t_in, t_h, 0.5)
        assert (back.dtype, back.gated, back.memory_bytes) == (dtype, gated, ffn.memory_bytes)
        for a, b in zip(back.weights(), ffn.weights(), strict=True):
            assert (a is None and b is None) or np.array_equal(a, b)
        for row in (x[37], x[36:]):
            for dense in (False, True):
                assert np.array_equal(back(row, dense=dense), ffn(row, dense=dense))
        assert np.array_equal(back.hidden(x, t_in), ffn.hidden(x, t_in))
        back.set_thresholds(None, 0.5)  # independent of the original
        back.reset_stats()
        assert back.stats()["calls"] == 0
    assert (ffn.t_in, ffn.t_hidden) == (t_in, t_h) and ffn.stats()["calls"] == 10
    # Corrupt states: FormatError, never a broken FFN.
    good = ffn.__getstate__()
    assert all(v is None or isinstance(v, (float, str, dict, np.ndarray)) for v in good.values())
    for change in (
        {"up": good["up"][:-1]},  # wrong shape
        {"down": good["down"][:, :-2]},
        {"down": good["down"].astype(np.float16)},
        {"down_bias": good["down_bias"][None]},
        {"dtype": "bfloat16"},
        {"t_in": float("nan")},
        {"t_hidden": -0.5},
        {"sparsity": "0.5"},
        {"stats": {**good["stats"], "rows": 1.5}},
        {"stats": {"calls": 1}},
    ):
        with pytest.raises(neuropil.FormatError):
            unpickle_tampered(ffn, {**good, **change})
    with pytest.raises(neuropil.FormatError):
        unpickle_tampered(ffn, {**good, "extra": 1})


@pytest.mark.parametrize(("dtype", "bits"), FORMATS)
def test_an_empty_batch_gives_an_empty_result(dtype, bits):
    # As nn.Linear does: (0, d) in, (0, d) out, with or without thresholds,
    # and the counters stay as they were.
    g, u, dn = weights(h=64)
    kw = {"bits": bits} if bits else {"dtype": dtype}
    ffn = InputSparseFFN(g, u, dn, **kw)
    x = np.zeros((0, 40), np.float32)
    before = ffn.stats()
    for t in ((None, None), (0.1, 0.2)):
        ffn.set_thresholds(*t)
        for xx in (x, x.astype(np.float64)):
            for dense in (False, True):
                y = ffn(xx, dense=dense)
                assert isinstance(y, np.ndarray)
                assert y.shape == (0, 40) and y.dtype == np.float32
        hid = ffn.hidden(x, t[0])
        assert hid.shape == (0, 64) and hid.dtype == np.float32
    assert ffn.stats() == before
    with pytest.raises(neuropil.ShapeError, match=r"\(n, 40\); got \(0, 39\)"):
        ffn(np.zeros((0, 39), np.float32))
    with pytest.raises(neuropil.ShapeError, match="x must not be empty"):
        ffn(np.zeros(0, np.float32))
    with pytest.raises(neuropil.ShapeError, match="samples"):
        ffn.calibrate(x, 0.5)


@pytest.mark.parametrize("call", ["hidden", "call", "dense"])
@pytest.mark.parametrize("width", [39, 41])
def test_an_empty_batch_of_the_wrong_width_is_refused(call, width):
    # With 0 rows the core's length check (n * d values) holds for any width:
    # the bindings check x's width on its shape.
    g, u, dn = weights(h=64)
    ffn = InputSparseFFN(g, u, dn, thresholds=(0.1, 0.1))
    x = np.zeros((0, width), np.float32)
    run = {
        "hidden": lambda: ffn.hidden(x),
        "call": lambda: ffn(x),
        "dense": lambda: ffn(x, dense=True),
    }[call]
    with pytest.raises(
        neuropil.ShapeError, match=rf"x must have shape \(n, 40\); got \(0, {width}\)"
    ):
        run()


def test_an_empty_torch_batch_gives_an_empty_tensor():
    torch = pytest.importorskip("torch")
    g, u, dn = weights(h=64)
    ffn = InputSparseFFN(g, u, dn, thresholds=(0.1, 0.1))
    for dtype in (torch.float32, torch.float64):
        y = ffn(torch.zeros(0, 40, dtype=dtype))
        assert isinstance(y, torch.Tensor)
        assert y.shape == (0, 40) and y.dtype == torch.float32

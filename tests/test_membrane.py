"""The membrane bank (neuropil.membrane): codes, fidelity, capacity, persistence,
the improvement list, metrics, save/load and bad input."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import neuropil  # noqa: E402
from conftest import assert_saves_take_normal_modes, run_python  # noqa: E402
from neuropil.membrane import (  # noqa: E402
    AdaptivePersistence,
    HierarchicalMembraneBank,
    HopfieldCleanup,
    MembraneBank,
    coherence_stats,
    dct_codes,
    gaussian_codes,
    generate_codes,
    hadamard_codes,
    orthogonal_codes,
    psnr,
    ssim,
)
from neuropil.membrane import _evaluate as ev  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return ev.digits()


@pytest.fixture(scope="module")
def photos():
    return ev.photo_patches(32, 32)


def test_import_neuropil_does_not_import_torch():
    r = run_python("import sys, neuropil; assert 'torch' not in sys.modules; print('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---------------------------------------------------------------- codes
@pytest.mark.parametrize("fn", [hadamard_codes, dct_codes, orthogonal_codes])
@pytest.mark.parametrize("L,K", [(8, 8), (64, 20), (128, 128)])
def test_orthogonal_code_books_are_orthonormal(fn, L, K):
    c = fn(L, K, dtype=torch.float64)
    assert c.shape == (L, K)
    assert torch.allclose(c.T @ c, torch.eye(K, dtype=torch.float64), atol=1e-12)
    stats = coherence_stats(c)
    assert stats["max"] < 1e-12


def test_hadamard_entries_and_sylvester_order():
    c = hadamard_codes(4, 4)
    want = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2
    assert torch.equal(c, want.float())


def test_dct_matches_formula():
    c = dct_codes(6, 3, dtype=torch.float64)
    assert math.isclose(float(c[0, 0]), math.sqrt(1 / 6))
    assert math.isclose(float(c[2, 1]), math.sqrt(2 / 6) * math.cos(math.pi * 2.5 / 6))


def test_random_codes_are_seeded_and_documented_generator():
    a = gaussian_codes(16, 40, seed=7)
    assert torch.equal(a, gaussian_codes(16, 40, seed=7))
    assert not torch.equal(a, gaussian_codes(16, 40, seed=8))
    raw = np.random.default_rng(7).standard_normal((16, 40))
    want = raw / np.linalg.norm(raw, axis=0)
    assert np.allclose(a.numpy(), want, atol=1e-7)
    assert torch.allclose(a.norm(dim=0), torch.ones(40))
    assert torch.equal(orthogonal_codes(16, 5, seed=3), orthogonal_codes(16, 5, seed=3))


def test_generate_codes_orthonormal_then_near_welch_bound():
    assert torch.equal(generate_codes(32, 10), hadamard_codes(32, 10))
    c = generate_codes(24, 10, dtype=torch.float64)
    assert torch.allclose(c.T @ c, torch.eye(10, dtype=torch.float64), atol=1e-12)
    c = generate_codes(32, 128, dtype=torch.float64)
    s = coherence_stats(c)
    # rms coherence of a unit-norm tight frame meets the Welch bound
    assert s["rms"] == pytest.approx(s["welch_bound"], rel=0.01)
    assert s["rms"] < coherence_stats(gaussian_codes(32, 128))["rms"] * 0.9


def test_generate_codes_keeps_existing():
    old = hadamard_codes(16, 6)
    c = generate_codes(16, 12, existing=old)
    assert torch.equal(c[:, :6], old)
    assert coherence_stats(c)["max"] < 1e-6
    c = generate_codes(16, 40, existing=old)
    assert torch.allclose(c[:, :6], old) and c.shape == (16, 40)


def test_coherence_stats_known_values():
    c = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    s = coherence_stats(c)
    # normalised: e1, (e1+e2)/sqrt2, e2 -> |g| = 1/sqrt2, 0, 1/sqrt2
    assert s["max"] == pytest.approx(1 / math.sqrt(2))
    assert s["mean"] == pytest.approx(math.sqrt(2) / 3)
    assert s["welch_bound"] == pytest.approx(math.sqrt(1 / 4))


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (lambda: hadamard_codes(12, 4), neuropil.ArgumentError, "power of two"),
        (lambda: dct_codes(8, 9), neuropil.ArgumentError, "K must be <= L=8"),
        (lambda: gaussian_codes(0, 3), neuropil.ArgumentError, "L must be a positive integer"),
        (lambda: generate_codes(8, 4, existing=torch.ones(7, 2)), neuropil.ShapeError, "(8, K0)"),
        (lambda: coherence_stats(torch.ones(3)), neuropil.ShapeError, "(L, K)"),
    ],
)
def test_code_errors(call, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        call()


# ---------------------------------------------------------------- fidelity
@pytest.mark.parametrize("codes", ["hadamard", "dct"])
def test_orthogonal_codes_recall_random_and_real_images_exactly(codes, digits, photos):
    rnd = torch.rand(64, 16, 16, generator=torch.Generator().manual_seed(0))
    for pats, L in ((rnd, 64), (digits[:64], 64), (photos, 32)):
        f = ev.fidelity(pats, L, codes, "correlation")
        assert f["psnr"] >= 100 and f["rel_error"] <= 1e-6, (codes, f)


def test_pinv_rescues_gaussian_codes(digits, photos):
    for pats, L in ((digits[:64], 64), (photos, 32)):
        corr = ev.fidelity(pats, L, "gaussian", "correlation")
        pinv = ev.fidelity(pats, L, "gaussian", "pinv")
        assert corr["psnr"] < 20
        assert pinv["psnr"] >= 100


@pytest.mark.parametrize("K", [128, 256])
def test_crosstalk_past_L_follows_sqrt_k_minus_1_over_L(K):
    c = ev.crosstalk(64, K)
    assert 0.8 <= c["ratio"] <= 1.2
    bank = MembraneBank(64, 4, 4, codes="gaussian", K=K)
    bank.store(torch.rand(K, 4, 4))
    s = bank.stats()
    assert s["stored"] == K and s["load"] == K / 64
    assert s["expected_crosstalk"] == pytest.approx(math.sqrt((K - 1) / 64))
    assert s["code_crosstalk"] == pytest.approx(c["code_crosstalk"], rel=1e-6)


def test_cleanup_keeps_top1_recall_at_2L_on_digits(digits):
    r = ev.cleanup(digits, 64, 128)
    assert r["top1_readout"] < 0.9  # the readout alone does not
    assert r["top1_cleanup"] >= 0.99
    assert r["psnr_cleanup"] > 60


def test_hopfield_step_snaps_to_nearest(digits):
    hop = HopfieldCleanup(digits[:50], beta=1000.0)
    noisy = digits[:50] + 0.1 * torch.randn(50, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hop.nearest(noisy), torch.arange(50))
    assert torch.allclose(hop(noisy), digits[:50], atol=1e-4)


# ---------------------------------------------------------------- persistence
def test_automatic_persistence_amplitude_is_lam_to_the_T():
    p = ev.persistence(0.95, 50)
    assert p["abs_error"] <= 1e-5
    assert p["half_life"] == pytest.approx(math.log(2) / -math.log(0.95))
    bank = MembraneBank(8, 2, 2, codes="hadamard")
    v = torch.rand(8, 2, 2)
    bank.store(v)
    bank.decay(0.5, steps=3)
    assert torch.allclose(bank.read()[0], v / 8, atol=1e-6)
    assert bank.steps == 3 and bank.half_life == math.inf
    bank.step(5)  # persistence off: no-op
    assert bank.steps == 3


def test_adaptive_persistence_decays_by_access_count():
    r = ev.adaptive_persistence(40)
    assert r["max_abs_error"] <= 1e-5
    assert r["hot_amplitude"] > 10 * r["cold_amplitude"]
    bank = MembraneBank(8, 2, 2, codes="hadamard")
    bank.store(torch.ones(8, 2, 2))
    for _ in range(50):
        bank.read([2])
    ap = AdaptivePersistence(bank, base_lambda=0.5, max_lambda=0.9, saturation=100)
    assert ap.lambdas()[0, 2] == pytest.approx(0.75) and ap.lambdas()[0, 0] == 0.5
    ap.step(2)
    y = bank.read()[0, :, 0, 0]
    assert y[2] == pytest.approx(0.75**2, abs=1e-6) and y[0] == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(neuropil.ArgumentError, match="max_lambda must be >= base_lambda"):
        AdaptivePersistence(bank, base_lambda=0.9, max_lambda=0.8)


def test_adaptive_alpha_improves_the_weakest_pattern():
    r = ev.adaptive_alpha()
    assert r["worst_psnr_adaptive"] > r["worst_psnr_uniform"] + 10


def test_adaptive_alpha_round_trips_with_unscale(digits):
    bank = MembraneBank(64, 8, 8, codes="dct")
    v = digits[:64] * torch.logspace(-2, 2, 64)[:, None, None]
    bank.store(v, alphas="adaptive")
    assert torch.allclose(bank.gains[0], 1 / v.reshape(64, -1).norm(dim=1), rtol=1e-5)
    assert torch.allclose(bank.read(unscale=True)[0], v, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- improvements
def test_hierarchical_bank_routes_keys_exactly(digits):
    hb = HierarchicalMembraneBank(32, 8, 8, levels=3, codes="dct")
    assert hb.K == 56 and [b.L for b in hb.banks] == [32, 16, 8]
    keys = [55, 0, 40, 31, 32, 48]
    hb.store(digits[:6], keys)
    y = hb.read(keys)[0]
    assert torch.allclose(y, digits[:6], atol=1e-5)
    r = ev.hierarchical()
    assert r["psnr_hierarchical"] >= 100 and r["bytes_hierarchical"] == r["bytes_flat"]


def test_batched_banks_match_single_banks():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(3, 5, 4, 4, generator=g)
    keys = torch.tensor([[0, 1, 2, 3, 4], [7, 6, 5, 4, 3], [2, 2, 9, 11, 15]])
    batched = MembraneBank(16, 4, 4, batch=3, codes="gaussian", K=16)
    alphas = torch.rand(3, 5, generator=g)
    batched.store(v, keys, alphas=alphas)
    for b in range(3):
        single = MembraneBank(16, 4, 4, codes="gaussian", K=16)
        single.store(v[b], keys[b], alphas=alphas[b])
        assert torch.allclose(batched.M[b], single.M[0], atol=1e-6)
        assert torch.allclose(batched.read(keys)[b], single.read(keys[b])[0], atol=1e-6)
    assert batched.counts[2, 2] == 2 and batched.counts[2].sum() == 5


@pytest.mark.parametrize("batch", [1, 3])
def test_sparse_store_equals_dense(batch):
    g = torch.Generator().manual_seed(1)
    d = torch.rand(batch, 16, 32, 32, generator=g)
    d = d * (torch.rand(batch, 16, 32, 32, generator=g) < 0.001)
    a = MembraneBank(32, 32, 32, batch=batch)
    b = MembraneBank(32, 32, 32, batch=batch)
    a.store(d, range(3, 19))
    b.store(d.to_sparse(), range(3, 19))
    assert torch.allclose(a.M, b.M, atol=1e-6)
    b.store(d[0].to_sparse(), range(16))  # (K, H, W) to every bank
    a.store(d[0], range(16))
    assert torch.allclose(a.M, b.M, atol=1e-6)


def test_store_and_read_are_differentiable():
    bank = MembraneBank(16, 3, 3, codes="hadamard")
    v = torch.rand(16, 3, 3, requires_grad=True)
    bank.store(v)
    w = torch.rand(16, 3, 3)
    (bank.read()[0] * w).sum().backward()
    assert v.grad is not None and torch.allclose(v.grad, w, atol=1e-6)


def test_learnable_codes_get_gradients():
    codes = orthogonal_codes(8, 8, seed=1).requires_grad_(True)
    bank = MembraneBank(8, 2, 2, codes=codes)
    v = torch.rand(8, 2, 2)
    bank.store(v)
    loss = (bank.read()[0] - v).pow(2).sum() + bank.read([0]).sum()
    loss.backward()
    assert codes.grad is not None and torch.isfinite(codes.grad).all()
    assert codes.grad.abs().sum() > 0


@settings(max_examples=25, deadline=None)
@given(
    L=st.sampled_from([4, 8, 16, 32]),
    frac=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**31 - 1),
    readout=st.sampled_from(["correlation", "pinv"]),
)
def test_recall_is_exact_for_any_key_subset(L, frac, seed, readout):
    g = torch.Generator().manual_seed(seed)
    K = max(1, int(frac * L))
    keys = torch.randperm(L, generator=g)[:K]
    v = torch.randn(K, 3, 5, generator=g, dtype=torch.float64)
    bank = MembraneBank(L, 3, 5, codes="dct", readout=readout, dtype=torch.float64)
    bank.store(v, keys)
    assert torch.allclose(bank.read(keys)[0], v, atol=1e-10)
    others = [k for k in range(L) if k not in set(keys.tolist())]
    if others:
        assert bank.read(others).abs().max() < 1e-10


@settings(max_examples=20, deadline=None)
@given(
    L=st.sampled_from([64, 128, 256]),
    batch=st.sampled_from([1, 2]),
    frac=st.sampled_from([0.25, 0.5, 1.0]),
    per_bank=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_factored_hadamard_equals_the_gemm(L, batch, frac, per_bank, seed):
    g = torch.Generator().manual_seed(seed)
    kp = int(frac * L)
    v = torch.randn(batch, kp, 2, 3, generator=g, dtype=torch.float64)
    shape = (batch, kp) if per_bank else (kp,)
    keys = torch.randint(0, L, shape, generator=g)
    alphas = torch.rand(batch, kp, generator=g, dtype=torch.float64) + 0.5
    kw = {"batch": batch, "dtype": torch.float64}
    fast = MembraneBank(L, 2, 3, fast_hadamard=True, **kw)
    gemm = MembraneBank(L, 2, 3, fast_hadamard=False, **kw)
    for bank in (fast, gemm):
        bank.store(v, keys, alphas=alphas)
        bank.store(v[:, :kp])
    assert torch.allclose(fast.M, gemm.M, atol=1e-10)
    assert torch.allclose(fast.read(keys), gemm.read(keys), atol=1e-10)
    assert torch.allclose(fast.read(), gemm.read(), atol=1e-10)
    assert torch.equal(fast.counts, gemm.counts) and torch.equal(fast.reads, gemm.reads)


def test_factored_hadamard_is_differentiable_and_survives_save_load(tmp_path):
    bank = MembraneBank(64, 2, 2)
    assert bank._use_transform(64)
    v = torch.rand(64, 2, 2, requires_grad=True)
    bank.store(v)
    w = torch.rand(64, 2, 2)
    (bank.read()[0] * w).sum().backward()
    assert torch.allclose(v.grad, w, atol=1e-5)
    bank.save(tmp_path / "h.safetensors")
    back = MembraneBank.load(tmp_path / "h.safetensors")
    assert back.code_kind == "hadamard" and back._use_transform(64)
    assert torch.allclose(back.read(), bank.read().detach(), atol=1e-6)


# ---------------------------------------------------------------- metrics
def test_psnr_known_values():
    x = torch.zeros(4, 4)
    assert psnr(x, x + 1, data_range=255) == pytest.approx(20 * math.log10(255))
    assert psnr(x, x + 0.1, data_range=1.0) == pytest.approx(20.0)
    assert psnr(x, x, data_range=1.0) == math.inf
    y = torch.tensor([0.0, 1.0, 2.0, 3.0])
    # default range 3; mse 0.25 -> 10 log10(9 / 0.25)
    assert psnr(y, y + 0.5) == pytest.approx(10 * math.log10(36))


def _ssim_reference(x: np.ndarray, y: np.ndarray, r: float, win: int = 7) -> float:
    """scikit-image's formula written out by hand, window by window."""
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    n = win * win
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a = x[i : i + win, j : j + win].ravel()
            b = y[i : i + win, j : j + win].ravel()
            ma, mb = a.mean(), b.mean()
            va = ((a - ma) ** 2).sum() / (n - 1)
            vb = ((b - mb) ** 2).sum() / (n - 1)
            cov = ((a - ma) * (b - mb)).sum() / (n - 1)
            vals.append(
                ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(vals))


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    x = rng.random((12, 15))
    y = np.clip(x + 0.2 * rng.standard_normal((12, 15)), 0, 1)
    got = ssim(torch.from_numpy(x), torch.from_numpy(y), data_range=1.0)
    assert got == pytest.approx(_ssim_reference(x, y, 1.0), abs=1e-10)
    assert ssim(torch.from_numpy(x), torch.from_numpy(x), data_range=1.0) == pytest.approx(1.0)
    a, b = 0.3, 0.6  # constant images: only the luminance term remains
    c1 = 0.01**2
    want = (2 * a * b + c1) / (a * a + b * b + c1)
    got = ssim(torch.full((9, 9), a), torch.full((9, 9), b), data_range=1.0)
    assert got == pytest.approx(want, rel=1e-6)


def test_ssim_matches_scikit_image_if_installed():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    x = rng.random((20, 20))
    y = np.clip(x + 0.1 * rng.standard_normal((20, 20)), 0, 1)
    want = metrics.structural_similarity(x, y, data_range=1.0)
    assert ssim(torch.from_numpy(x), torch.from_numpy(y), data_range=1.0) == pytest.approx(want)
    assert psnr(torch.from_numpy(x), torch.from_numpy(y), data_range=1.0) == pytest.approx(
        metrics.peak_signal_noise_ratio(x, y, data_range=1.0)
    )


def test_metric_errors():
    with pytest.raises(neuropil.ShapeError, match="y must have the shape of x"):
        psnr(torch.zeros(3, 3), torch.zeros(3, 4))
    with pytest.raises(neuropil.ArgumentError, match="data_range"):
        psnr(torch.zeros(3, 3), torch.ones(3, 3))
    with pytest.raises(neuropil.ShapeError, match="at least 7x7"):
        ssim(torch.rand(5, 5), torch.rand(5, 5))


# ---------------------------------------------------------------- save / load
def _saved(tmp_path, **kw):
    bank = MembraneBank(16, 4, 4, batch=2, codes="gaussian", K=20, persistence=0.9, **kw)
    bank.store(torch.rand(2, 5, 4, 4).to(bank.dtype), [1, 3, 5, 7, 19], alphas="adaptive")
    bank.read([1, 3])
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    return bank, path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    bank, path = _saved(tmp_path, dtype=dtype)
    back = MembraneBank.load(path)
    for name in ("M", "C", "gains", "counts", "reads"):
        assert torch.equal(getattr(back, name), getattr(bank, name)), name
    assert (back.persistence, back.steps, back.code_kind, back.K) == (0.9, 1, "gaussian", 20)
    assert torch.equal(back.read([1, 3, 5]), bank.read([1, 3, 5]))
    assert not list(tmp_path.glob("*.tmp"))


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    # The disk fills up after the header: the OSError open() would give,
    # naming the file (not safetensors' own SafetensorError), old file intact.
    import errno
    import os

    bank, path = _saved(tmp_path)
    before = path.read_bytes()
    fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes > 2:  # the length and the header went through
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: Full(fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left on device") as info:
        bank.save(path)
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*"))
    assert MembraneBank.load(path).K == bank.K


def test_saved_bank_files_are_plain_safetensors(tmp_path):
    # Written by the package's writer: safetensors reads every tensor as saved.
    from safetensors.torch import load_file as st_load

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        bank, path = _saved(tmp_path, dtype=dtype)
        got = st_load(str(path))
        assert sorted(got) == ["C", "M", "counts", "gains", "reads"]
        for name, t in got.items():
            assert t.dtype == getattr(bank, name).dtype, (dtype, name)
            assert torch.equal(t, getattr(bank, name).cpu()), (dtype, name)


def _rewrite(path, edit_meta=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(meta["neuropil"])
    if edit_meta:
        edit_meta(m)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata={"neuropil": json.dumps(m)})


@pytest.mark.parametrize(
    "meta,tensors,msg",
    [
        (lambda m: m.update(version=0), None, "version must be 1; got 0"),
        # a newer version says what to do (was "format version must be 1; got 2")
        (
            lambda m: m.update(version=2),
            None,
            r"bank\.safetensors: version 2 is newer than this neuropil \(.+\) reads "
            r"\(up to 1\): upgrade neuropil$",
        ),
        (lambda m: m.update(format="other"), None, "format must be"),
        (lambda m: m.pop("L"), None, "'L' is missing"),
        (lambda m: m.update(K="20"), None, "'K' must be"),
        (lambda m: m.update(dtype="int8"), None, "dtype must be one of"),
        (lambda m: m.update(readout="magic"), None, "inconsistent metadata"),
        (lambda m: m.update(persistence=1.5), None, "inconsistent metadata"),
        (lambda m: m.update(steps=-1), None, "steps must be >= 0"),
        (lambda m: m.update(H=5), None, "tensor 'M' must be"),
        (None, lambda t: t.update(counts=-t["counts"] - 1), "negative counts"),
        (None, lambda t: t["M"].__setitem__((0, 0, 0, 0), float("nan")), "non-finite"),
        (None, lambda t: t.pop("reads"), "tensors must be"),
        (None, lambda t: t.update(C=torch.zeros_like(t["C"])), "zero columns"),
        (lambda m: m.update(code_kind="hadamard"), None, "not the Hadamard code book"),
        # (loaded before: any string was kept as the bank's code_kind)
        (
            lambda m: m.update(code_kind="x"),
            None,
            r"code_kind must be one of \('hadamard', 'dct', 'gaussian', 'orthogonal', 'auto', "
            r"'custom', 'grown'\); got 'x'",
        ),
    ],
)
def test_load_rejects_malformed_files(tmp_path, meta, tensors, msg):
    _, path = _saved(tmp_path)
    _rewrite(path, meta, tensors)
    with pytest.raises(neuropil.FormatError, match=msg):
        MembraneBank.load(path)


@pytest.mark.parametrize("raw", ["[]", "1", "null", '"x"'])
def test_load_rejects_metadata_that_is_json_but_no_object(tmp_path, raw):
    # (was AttributeError: 'list' object has no attribute 'get', from the message)
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, path = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"neuropil": raw})
    kind = type(json.loads(raw)).__name__
    with pytest.raises(
        neuropil.FormatError,
        match=rf"bank\.safetensors: metadata 'neuropil' must be a JSON object; got {kind}$",
    ):
        MembraneBank.load(path)


@pytest.mark.parametrize(
    "kind", ["hadamard", "dct", "gaussian", "orthogonal", "auto", "custom", "grown"]
)
def test_load_keeps_every_code_kind_a_bank_can_have(tmp_path, kind):
    if kind == "custom":
        bank = MembraneBank(16, 2, 2, codes=torch.linalg.qr(torch.randn(16, 8))[0])
    else:
        bank = MembraneBank(16, 2, 2, codes="gaussian" if kind == "grown" else kind, K=8)
        if kind == "grown":
            bank.grow(12)
    assert bank.code_kind == kind
    bank.save(tmp_path / "b.safetensors")
    assert MembraneBank.load(tmp_path / "b.safetensors").code_kind == kind


def test_load_rejects_truncated_and_foreign_files(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (4, 50, len(data) - 8):
        path.write_bytes(data[:cut])
        with pytest.raises(neuropil.FormatError):
            MembraneBank.load(path)
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    with pytest.raises(neuropil.FormatError, match="tensors must be"):
        MembraneBank.load(path)
    path.write_text("not a safetensors file at all")
    with pytest.raises(neuropil.FormatError):
        MembraneBank.load(path)
    with pytest.raises(FileNotFoundError):
        MembraneBank.load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- bad input
@pytest.fixture
def bank():
    return MembraneBank(8, 4, 4, batch=2, codes="hadamard")


@pytest.mark.parametrize(
    "call,exc,msg",
    [
        (
            lambda b: b.store(torch.rand(2, 4, 4), [0, 8]),
            neuropil.ArgumentError,
            r"in \[0, 8\); got 8",
        ),
        (lambda b: b.store(torch.rand(2, 4, 4), [-1, 2]), neuropil.ArgumentError, "got -1"),
        (lambda b: b.read([3, 9]), neuropil.ArgumentError, r"keys must be in \[0, 8\)"),
        (lambda b: b.store(torch.rand(2, 4, 4), [0.0, 1.0]), neuropil.DTypeError, "integers"),
        (
            lambda b: b.store(torch.rand(2, 4, 4), torch.tensor([0.0, 1.0])),
            neuropil.DTypeError,
            "integer",
        ),
        (lambda b: b.store(torch.rand(2, 4, 4), [0, 1, 2]), neuropil.ShapeError, "hold 2 keys"),
        (
            lambda b: b.store(torch.rand(2, 4, 5), [0, 1]),
            neuropil.ShapeError,
            r"\(K, 4, 4\) or \(2, K, 4, 4\)",
        ),
        (
            lambda b: b.store(torch.rand(3, 2, 4, 4), [0, 1]),
            neuropil.ShapeError,
            "got \\(3, 2, 4, 4\\)",
        ),
        (lambda b: b.store(torch.rand(4, 4)), neuropil.ShapeError, "values must have shape"),
        (lambda b: b.store(torch.rand(9, 4, 4)), neuropil.ShapeError, "K=8 keys"),
        (
            lambda b: b.store(torch.rand(2, 4, 4, dtype=torch.float64)),
            neuropil.DTypeError,
            "float32",
        ),
        (lambda b: b.store(torch.ones(2, 4, 4, dtype=torch.int32)), neuropil.DTypeError, "dtype"),
        (lambda b: b.store(torch.rand(2, 4, 4, device="meta")), neuropil.ArgumentError, "device"),
        (lambda b: b.store(torch.rand(2, 4, 4), alphas="big"), neuropil.ArgumentError, "adaptive"),
        (
            lambda b: b.store(torch.rand(2, 4, 4), alphas=torch.ones(3)),
            neuropil.ShapeError,
            "alphas",
        ),
        (lambda b: b.read(readout="magic"), neuropil.ArgumentError, "readout must be one of"),
        (lambda b: b.decay(1.5), neuropil.ArgumentError, r"lam must be in \(0, 1\]"),
        (lambda b: b.decay(0.5, steps=-1), neuropil.ArgumentError, "steps"),
        (lambda b: b.set_persistence(0.0), neuropil.ArgumentError, "persistence"),
    ],
)
def test_bad_input_raises_clear_errors(bank, call, exc, msg):
    with pytest.raises(exc, match=msg):
        call(bank)


def test_constructor_errors_and_pinv_past_L():
    with pytest.raises(neuropil.ArgumentError, match="power of two"):
        MembraneBank(12, 4, 4, codes="hadamard")
    with pytest.raises(neuropil.ArgumentError, match="K must be <= L"):
        MembraneBank(8, 4, 4, codes="dct", K=9)
    with pytest.raises(neuropil.DTypeError, match="dtype must be"):
        MembraneBank(8, 4, 4, dtype=torch.int32)
    with pytest.raises(neuropil.ArgumentError, match="device must be an available torch device"):
        MembraneBank(8, 4, 4, device="nonsense")
    with pytest.raises(neuropil.ShapeError, match=r"codes must have shape \(8, K\)"):
        MembraneBank(8, 4, 4, codes=torch.rand(7, 3))
    with pytest.raises(neuropil.ArgumentError, match="full-rank"):
        MembraneBank(8, 4, 4, codes=torch.ones(8, 3), readout="pinv")
    b = MembraneBank(8, 2, 2, codes="gaussian", K=32, readout="pinv")
    v = torch.rand(8, 2, 2)
    b.store(v, range(10, 18))  # 8 stored keys <= L: pinv is still exact
    assert torch.allclose(b.read(range(10, 18))[0], v, atol=1e-4)
    b.store(torch.rand(1, 2, 2), [0])
    with pytest.raises(neuropil.ArgumentError, match="at most L=8 stored keys; got 9"):
        b.read([0])
    assert b.read([0], readout="correlation").shape == (1, 1, 2, 2)


def test_grow_keeps_stored_patterns_and_adds_codes():
    bank = MembraneBank(16, 3, 3, codes="dct", K=8)
    v = torch.rand(8, 3, 3)
    bank.store(v)
    bank.grow(16)  # orthonormal completion: still exact
    assert bank.K == 16 and bank.C.shape == (16, 16) and bank.counts.shape == (1, 16)
    w = torch.rand(8, 3, 3)
    bank.store(w, range(8, 16))
    assert torch.allclose(bank.read(range(16))[0], torch.cat([v, w]), atol=1e-5)
    assert coherence_stats(bank.C)["max"] < 1e-5
    bank.grow(40)  # past L: low coherence, old codes unchanged
    assert coherence_stats(bank.C)["rms"] < coherence_stats(gaussian_codes(16, 40))["rms"]
    with pytest.raises(neuropil.ArgumentError, match="K must be an integer >= 40"):
        bank.grow(20)


def test_clear_and_stats(bank):
    bank.store(torch.rand(2, 3, 4, 4), [0, 1, 2])
    s = bank.stats()
    assert s["stored"] == 3 and s["energy"][0] > 0 and s["coherence"]["max"] < 1e-6
    bank.clear()
    s = bank.stats()
    assert s["stored"] == 0 and s["energy"] == [0.0, 0.0] and bank.M.abs().max() == 0


# ---------------------------------------------------------------- CLI
def test_tour_section_writes_grid_and_capacity_plot(tmp_path, capsys):
    from neuropil import cli

    assert cli.main(["tour", "--only", "membrane", "--json", "--out", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)["membrane"]
    for name in ("membrane_grid.png", "membrane_capacity.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["photos_K=L=32"]["hadamard/correlation"]["psnr_db"] >= 100
    assert r["cleanup_digits_K=2L"]["top1_cleanup"] >= 0.99
    assert len(r["capacity"]["auto/correlation+cleanup"]["top1"]) == 5


def test_bench_quick_prints_every_acceptance_row(capsys):
    from neuropil import cli

    assert cli.main(["bench", "membrane", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]["membrane"]
    cases = " ".join(r["case"] for r in rows)
    for needle in (
        "PSNR hadamard",
        "pinv",
        "crosstalk",
        "top-1",
        "persistence",
        "CPU store, L=32",
        "CPU read, L=128",
        "sparse",
        "batched",
    ):
        assert needle in cases
    assert all(r["neuropil"] > 0 or "PSNR" in r["case"] for r in rows)
    gemm = next(r for r in rows if r["case"].startswith("CPU store, L=128"))
    assert gemm["baselines"]["GEMM limit"] > 0 and gemm["baselines"]["torch einsum"] > 0


def test_repeated_key_in_one_store_keeps_the_last_alpha():
    bank = MembraneBank(8, 2, 2, codes="hadamard")
    v = torch.rand(3, 2, 2)
    bank.store(v, torch.tensor([3, 5, 3]), alphas=torch.tensor([0.5, 1.5, 2.0]))
    assert bank.gains[0, 3].item() == 2.0 and bank.gains[0, 5].item() == 1.5


# ---------------------------------------------------------------- audit fixes
def _snapshot(bank):
    return (bank.M.clone(), bank.counts.clone(), bank.gains.clone(), bank.steps)


def _same(a, b):
    return all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("codes", ["hadamard", "dct"])
def test_non_finite_values_or_alphas_are_refused_before_any_write(codes):
    bank = MembraneBank(64 if codes == "hadamard" else 16, 4, 4, codes=codes, persistence=0.9)
    v = torch.rand(8, 4, 4)
    bank.store(v, keys=range(8))
    before = _snapshot(bank)
    nan = torch.rand(1, 4, 4)
    nan[0, 0, 0] = float("nan")
    inf = torch.rand(bank.L, 4, 4)  # all L keys: the factored-Hadamard path on CPU
    inf[3, 1, 2] = float("inf")
    sparse = torch.zeros(1, 4, 4)
    sparse[0, 1, 1] = float("nan")
    for call, msg in [
        (lambda: bank.store(nan, keys=[9]), "values must be finite; got 1 NaN or Inf"),
        (lambda: bank.store(inf), "values must be finite"),
        (lambda: bank.store(sparse.to_sparse(), keys=[9]), "values must be finite"),
        (lambda: bank.store(v[:1], [9], alphas=torch.tensor([float("inf")])), "alphas must be"),
        (lambda: bank.store(v[:2], [9, 10], alphas=torch.tensor([1.0, math.nan])), "alphas"),
        (lambda: bank.store(v[:1], [9], alphas=float("nan")), "alphas must be finite"),
    ]:
        with pytest.raises(neuropil.ArgumentError, match=msg):
            call()
        assert _same(_snapshot(bank), before)
    assert torch.allclose(bank.read(range(8))[0], v, atol=1e-5)  # decay precedes the write
    # alphas="adaptive" of an all-zero pattern: 1 / 1e-12 overflows float16 to inf.
    half = MembraneBank(16, 4, 4, dtype=torch.float16)
    with pytest.raises(neuropil.ArgumentError, match=r"alphas must be finite.*overflows"):
        half.store(torch.zeros(1, 4, 4, dtype=torch.float16), keys=[0], alphas="adaptive")
    assert not half.M.any() and not half.counts.any()


def _store_from_threads(bank, chunks, threads=4):
    import threading

    barrier = threading.Barrier(threads)

    def work(part):
        barrier.wait()
        for values, keys in part:
            bank.store(values, keys=keys)
            bank.read(keys if keys is not None else range(values.shape[-3]))

    ts = [threading.Thread(target=work, args=(chunks[i::threads],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


@pytest.mark.parametrize("codes,batch", [("dct", 1), ("hadamard", 1), ("hadamard", 2)])
def test_concurrent_stores_equal_the_sequential_result(codes, batch):
    # Unlocked, the in-place GEMMs of concurrent stores (the GIL is released inside
    # them) lost updates: about 1e-3 relative error on the factored-Hadamard path.
    g = torch.Generator().manual_seed(0)
    L, n = 64, 400
    v = torch.rand(L, 32, 32, dtype=torch.float64, generator=g)
    if codes == "hadamard":  # all L/2 keys at once: the factored transform on CPU
        chunks = [(v[: L // 2], None)] * n
    else:  # one key per call: the addmm_ path
        chunks = [(v[i % 4 : i % 4 + 1], [i % 4]) for i in range(n)]

    def make():
        return MembraneBank(L, 32, 32, batch=batch, codes=codes, dtype=torch.float64)

    seq, par = make(), make()
    for values, k in chunks:
        seq.store(values, keys=k)
    _store_from_threads(par, chunks)
    assert torch.allclose(par.M, seq.M, rtol=1e-12, atol=1e-12)
    assert torch.equal(par.counts, seq.counts)
    assert torch.equal(par.reads, par.counts)


def test_pinv_dual_follows_codes_changed_in_place():
    g = torch.Generator().manual_seed(0)
    C = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=g))[0]
    C.requires_grad_()
    bank = MembraneBank(16, 4, 4, codes=C, readout="pinv", dtype=torch.float64)
    v = torch.rand(8, 4, 4, dtype=torch.float64, generator=g)
    with torch.no_grad():
        bank.store(v, keys=range(8))
        assert torch.allclose(bank.read(range(8))[0], v, atol=1e-10)
    # An optimizer step on the learned codes changes them in place.
    C.grad = torch.randn(16, 16, dtype=torch.float64, generator=g)
    torch.optim.SGD([C], lr=0.5).step()
    bank.clear()
    with torch.no_grad():
        bank.store(v, keys=range(8))
        assert torch.allclose(bank.read(range(8))[0], v, atol=1e-8)
    # Without clear(): a dual cached by a read of the empty bank, then the
    # codes change in place; the next store and read must use the new codes.
    C2 = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=g))[0]
    fresh = MembraneBank(16, 4, 4, codes=C2, readout="pinv", dtype=torch.float64)
    with torch.no_grad():
        fresh.read([0])
        C2.mul_(3.0)
        fresh.store(v, keys=range(8))
        assert torch.allclose(fresh.read(range(8))[0], v, atol=1e-8)
    # Past L (dual over the stored keys) the cache follows the codes too.
    wide = MembraneBank(8, 2, 2, codes="gaussian", K=12, readout="pinv", dtype=torch.float64)
    w = torch.rand(5, 2, 2, dtype=torch.float64, generator=g)
    wide.store(w, keys=[0, 3, 5, 7, 11])
    assert torch.allclose(wide.read([0, 3, 5, 7, 11])[0], w, atol=1e-10)
    with torch.no_grad():
        wide.C.add_(0.1 * torch.randn(8, 12, dtype=torch.float64, generator=g))
    wide.clear()
    wide.store(w, keys=[0, 3, 5, 7, 11])
    assert torch.allclose(wide.read([0, 3, 5, 7, 11])[0], w, atol=1e-8)


def test_hierarchical_store_checks_everything_before_writing():
    h = HierarchicalMembraneBank(L=16, H=2, W=2, levels=2)
    v = torch.rand(2, 2, 2)
    bad = torch.rand(2, 2, 2)
    bad[1, 0, 0] = float("nan")
    for call, exc, msg in [
        (lambda: h.store(v, keys=[0, 20], alphas=torch.tensor([0.5])), neuropil.ShapeError,
         r"alphas must have shape \(2,\)"),
        (lambda: h.store(v, keys=[0, 1], alphas=torch.tensor([0.5, 1.0, 7.0])),
         neuropil.ShapeError, r"alphas must have shape \(2,\)"),
        (lambda: h.store(v, keys=[0, 24]), neuropil.ArgumentError, r"in \[0, 24\); got 24"),
        (lambda: h.store(bad, keys=[0, 20]), neuropil.ArgumentError, "values must be finite"),
        (lambda: h.store(v, keys=[0, 20], alphas=torch.tensor([1.0, math.inf])),
         neuropil.ArgumentError, "alphas must be finite"),
        (lambda: h.store(v.double(), keys=[0, 20]), neuropil.DTypeError, "dtype"),
    ]:  # fmt: skip
        with pytest.raises(exc, match=msg):
            call()
        assert [b.stored_keys() for b in h.banks] == [[], []]
        assert all(not b.M.any() for b in h.banks)
    h.store(v, keys=[3, 20], alphas=torch.tensor([0.5, 2.0]))
    assert [b.stored_keys() for b in h.banks] == [[3], [4]]
    assert torch.allclose(h.read([3, 20])[0], v * torch.tensor([0.5, 2.0])[:, None, None])


@pytest.mark.parametrize(
    "codes",
    [
        torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]),
        torch.tensor([[1e-200, 0], [0, 1], [0, 0], [0, 0]], dtype=torch.float64),
        torch.tensor([[1e200, 0], [1e200, 1], [0, 0], [0, 0]], dtype=torch.float64),
    ],
)
def test_codes_that_could_not_be_loaded_are_refused_at_construction(codes):
    with pytest.raises(neuropil.ArgumentError, match="codes must have columns of non-zero"):
        MembraneBank(4, 2, 2, codes=codes, dtype=codes.dtype)


def test_save_refuses_codes_that_drifted_to_zero(tmp_path):
    C = torch.eye(4)[:, :3].clone()
    bank = MembraneBank(4, 2, 2, codes=C)
    C[:, 2] = 0  # learned codes changed in place after construction
    with pytest.raises(neuropil.ArgumentError, match="codes must have columns"):
        bank.save(tmp_path / "b.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fast", [None, True, False])
def test_fast_hadamard_survives_save_load(tmp_path, fast):
    bank = MembraneBank(64, 4, 4, fast_hadamard=fast, dtype=torch.float32)
    bank.store(torch.rand(64, 4, 4, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "b.safetensors"
    bank.save(path)
    back = MembraneBank.load(path)
    assert back.fast_hadamard is fast
    assert torch.equal(back.read(), bank.read())
    # Files written before fast_hadamard was saved load with the default (None).
    _rewrite(path, lambda m: m.pop("fast_hadamard"))
    assert MembraneBank.load(path).fast_hadamard is None
    _rewrite(path, lambda m: m.update(fast_hadamard="yes"))
    with pytest.raises(neuropil.FormatError, match="fast_hadamard must be"):
        MembraneBank.load(path)


def test_saved_bank_file_gets_normal_permissions(tmp_path):
    assert_saves_take_normal_modes(MembraneBank(8, 2, 2).save, tmp_path / "b.safetensors")


def test_small_input_fixes():
    # numpy scalars are numbers
    bank = MembraneBank(16, 4, 4, persistence=np.float32(0.5))
    assert bank.persistence == 0.5
    v = torch.rand(2, 4, 4)
    bank.store(v, keys=[0, 1], alphas=np.float32(2.0))
    assert torch.allclose(bank.read([0, 1])[0], 2 * v)
    bank.decay(np.float64(0.5), steps=np.int64(1))
    with pytest.raises(neuropil.ArgumentError, match="persistence must be a number"):
        MembraneBank(16, 4, 4, persistence=np.True_)
    # a uint64 key past int64 is reported as given, not wrapped to a negative number
    with pytest.raises(neuropil.ArgumentError, match=r"got 9223372036854775809"):
        bank.store(v[:1], keys=np.array([2**63 + 1], np.uint64))
    with pytest.raises(neuropil.ArgumentError, match=r"in \[0, 16\); got 1180591620717411303424"):
        bank.store(v[:1], keys=2**70)
    # big-endian numpy values are converted (torch cannot hold them)
    bank.store(v.numpy().astype(">f4"), keys=[2, 3])
    # metrics
    with pytest.raises(neuropil.ShapeError, match="psnr: x must not be empty"):
        psnr(torch.zeros(0), torch.zeros(0), 1.0)
    with pytest.raises(neuropil.ShapeError, match="ssim: x must not be empty"):
        ssim(torch.zeros(0, 8, 8), torch.zeros(0, 8, 8), 1.0)
    with pytest.raises(neuropil.ArgumentError, match="win_size must be an odd integer"):
        ssim(torch.rand(8, 8), torch.rand(8, 8), data_range=1.0, win_size=7.0)
    assert ssim(torch.ones(8, 8), torch.ones(8, 8), 1.0, win_size=np.int64(7)) == 1.0
    with pytest.raises(neuropil.ArgumentError, match="data_range must be a number"):
        psnr(torch.rand(8), torch.rand(8), "1")
    # Hopfield beta must be finite: softmax(inf * s) is NaN
    for beta in (math.inf, math.nan, 0.0, True):
        with pytest.raises(neuropil.ArgumentError, match="beta must be a positive finite"):
            HopfieldCleanup(torch.rand(5, 4, 4), beta=beta)
    assert torch.isfinite(HopfieldCleanup(torch.rand(5, 4, 4), beta=1e4)(torch.rand(4, 4))).all()


def test_bank_copies_get_their_own_lock():
    import copy

    bank = MembraneBank(8, 2, 2)
    bank.store(torch.rand(3, 2, 2))
    twin = copy.deepcopy(bank)
    assert twin._lock is not bank._lock and torch.equal(twin.read(), bank.read())


def test_hierarchical_bank_pickles_and_deep_copies():
    # It holds a lock too (TypeError: cannot pickle '_thread.RLock' before).
    import copy
    import pickle

    h = HierarchicalMembraneBank(L=16, H=2, W=2, levels=2)
    v = torch.rand(20, 2, 2)
    h.store(v, keys=range(20))
    for twin in (copy.deepcopy(h), pickle.loads(pickle.dumps(h))):
        assert twin._lock is not h._lock
        assert torch.equal(twin.read(range(20)), h.read(range(20)))
        twin.store(torch.rand(1, 2, 2), keys=[3])  # independent of the original
        assert not torch.equal(twin.read([3]), h.read([3]))


def test_unpickled_banks_are_checked_as_loaded_files_are():
    # A tampered pickle was accepted: M of the wrong shape read as (1, 1, 2, 2)
    # with no error.
    import pickle

    bank = MembraneBank(8, 2, 2)
    bank.store(torch.rand(3, 2, 2))
    twin = pickle.loads(pickle.dumps(bank))
    assert torch.equal(twin.read(), bank.read()) and twin.M.shape == (1, 8, 2, 2)

    def tampered(**change):
        state = bank.__getstate__()
        state.update(change)
        copy = MembraneBank.__new__(MembraneBank)
        copy.__setstate__(state)

    for change, match in [
        ({"_M": torch.zeros(3, 3)}, r"tensor 'M' must be torch.float32 of shape \(1, 8, 2, 2\)"),
        ({"C": bank.C.double()}, r"tensor 'C' must be torch.float32"),
        ({"gains": torch.full((1, 8), float("nan"))}, "'gains' holds non-finite values"),
        ({"_counts": -torch.ones(1, 8, dtype=torch.int64)}, "'counts' holds negative counts"),
        ({"K": 9}, r"tensor 'C' must be .* of shape \(8, 9\)"),
        ({"L": 0}, "must be positive ints"),
    ]:
        with pytest.raises(neuropil.FormatError, match=match):
            tampered(**change)
    state = bank.__getstate__()
    del state["gains"]
    with pytest.raises(neuropil.FormatError, match="state has no 'gains'"):
        MembraneBank.__new__(MembraneBank).__setstate__(state)
    h = HierarchicalMembraneBank(L=16, H=2, W=2, levels=2)
    state = h.__getstate__()
    state["offsets"] = [0, 3, 24]
    with pytest.raises(neuropil.FormatError, match="offsets must be"):
        HierarchicalMembraneBank.__new__(HierarchicalMembraneBank).__setstate__(state)


def test_finite_check_takes_huge_finite_values_and_names_the_culprit():
    # The fast test sums in float64; finite values whose sum overflows pass
    # through the element-wise test, NaN and Inf are named.
    from neuropil.membrane._checks import check_finite

    huge = torch.full((3, 2), 1e308, dtype=torch.float64)
    check_finite(huge, None)
    check_finite(huge, torch.ones(3, dtype=torch.float64))
    with pytest.raises(neuropil.ArgumentError, match="values must be finite; got 1 NaN"):
        check_finite(torch.tensor([1.0, float("nan"), 2.0]), None)
    with pytest.raises(neuropil.ArgumentError, match=r"alphas must be finite .*got \[inf\]"):
        check_finite(huge, torch.tensor([1.0, float("inf")], dtype=torch.float64))


# ---------------------------------------------------------------- review round: user journeys
def test_grow_keeps_custom_codes_as_given():
    # Custom codes are used as given (not normalised); grow used to normalise
    # the old columns, so every stored pattern read back at another scale.
    g = torch.Generator().manual_seed(0)
    C = torch.linalg.qr(torch.randn(8, 4, generator=g))[0] * torch.tensor([2.0, 0.5, 3.0, 1.0])
    bank = MembraneBank(8, 2, 2, codes=C.clone())
    bank.store(torch.rand(4, 2, 2, generator=g))
    before = bank.read()
    for K in (6, 12):  # orthonormal completion, then past L
        bank.grow(K)
        assert torch.equal(bank.C[:, :4], C)
        assert torch.equal(bank.read(range(4)), before)
    # learned codes stay learnable: the grown book is a leaf that requires grad
    learned = MembraneBank(8, 2, 2, codes=C.clone().requires_grad_(True))
    learned.grow(6)
    assert learned.C.is_leaf and learned.C.requires_grad


def test_psnr_of_infinite_or_extreme_errors():
    x = torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[3] = math.inf  # e.g. an overflowed float16 recall
    assert psnr(x, y, data_range=1.0) == -math.inf
    assert psnr(x, x.to(torch.float16).to(torch.float64).clone(), 1.0) > 60
    # data_range^2 underflows, or data_range^2 / mse does: the value is still finite
    assert psnr(x, x + 1.0, data_range=1e-200) == pytest.approx(-4000.0, rel=1e-9)
    big = x + 1e150
    assert psnr(x, big, data_range=1.0) == pytest.approx(-3000.0, rel=1e-9)


def test_hierarchical_store_takes_numpy_values_like_a_flat_bank():
    h = HierarchicalMembraneBank(L=16, H=2, W=2, levels=2)
    v = np.random.default_rng(0).random((3, 2, 2), dtype=np.float32)
    h.store(v, keys=[1, 17, 20])
    assert torch.allclose(h.read([1, 17, 20])[0], torch.from_numpy(v), atol=1e-6)


def test_hierarchical_persistence_ages_every_level_per_store():
    h = HierarchicalMembraneBank(L=16, H=2, W=2, levels=2, persistence=0.5)
    flat = MembraneBank(24, 2, 2, codes="dct", persistence=0.5)
    v = torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(0))
    for bank in (h, flat):
        bank.store(v, keys=[1, 17])  # both levels
        bank.store(v[:1], keys=[2])  # level 0 only: level 1 must age too
        bank.store(v[:1], keys=[18])  # level 1 only
    assert [b.steps for b in h.banks] == [3, 3]
    assert torch.allclose(h.read([1, 17, 2, 18]), flat.read([1, 17, 2, 18]), atol=1e-6)


def test_hierarchical_read_never_sees_a_store_half_done():
    import threading

    h = HierarchicalMembraneBank(L=16, H=2, W=2, levels=2)
    inside, release = threading.Event(), threading.Event()
    level1_store = h.banks[1].store

    def slow_store(*args, **kwargs):
        inside.set()
        release.wait(10)
        level1_store(*args, **kwargs)

    h.banks[1].store = slow_store
    v = torch.ones(2, 2, 2)
    writer = threading.Thread(target=h.store, args=(v, [0, 16]))
    writer.start()
    assert inside.wait(10)  # level 0 written, level 1 pending
    out = []
    reader = threading.Thread(target=lambda: out.append(h.read([0, 16])))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # waits for the store to finish
    release.set()
    writer.join(10)
    reader.join(10)
    assert torch.allclose(out[0][0], v)


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True, None])
def test_seed_must_be_a_non_negative_integer(seed):
    for codes in ("hadamard", "gaussian"):
        with pytest.raises(neuropil.ArgumentError, match="seed must be"):
            MembraneBank(8, 2, 2, codes=codes, seed=seed)
    for fn in (gaussian_codes, orthogonal_codes, generate_codes):
        with pytest.raises(neuropil.ArgumentError, match="seed must be a non-negative integer"):
            fn(8, 4, seed=seed)
    assert MembraneBank(8, 2, 2, codes="gaussian", seed=np.int64(3)).seed == 3


def test_coherence_stats_on_degenerate_code_books():
    with pytest.raises(neuropil.ShapeError, match=r"L >= 1; got \(0, 3\)"):
        coherence_stats(torch.zeros(0, 3))
    # a zero code has no direction: its coherence is undefined, not 0
    with pytest.raises(neuropil.ArgumentError, match=r"column\(s\) \[1\]"):
        coherence_stats(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(neuropil.ArgumentError, match="finite"):
        coherence_stats(torch.tensor([[1.0, math.nan], [0.0, 1.0]]))
    one_row = coherence_stats(torch.tensor([[1.0, -2.0, 3.0]]))  # L = 1: all collinear
    assert one_row["max"] == one_row["mean"] == 1.0 and one_row["welch_bound"] == 1.0
    c = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = c / c.norm(dim=0)
    g = (u.T @ u).abs()
    off = g[~torch.eye(7, dtype=torch.bool)]
    s = coherence_stats(c)  # K > L
    assert s["max"] == pytest.approx(float(off.max())) and s["rms"] >= s["welch_bound"]


def test_adaptive_persistence_on_a_state_that_requires_grad():
    # bank.decay handles a state that requires grad; AdaptivePersistence used to
    # raise ("a view of a leaf Variable ... in-place operation")
    bank = MembraneBank(8, 2, 2)
    bank.store(torch.ones(8, 2, 2))
    bank.M.requires_grad_(True)
    leaf = bank.M
    AdaptivePersistence(bank, base_lambda=0.5, max_lambda=0.5).step()
    bank.read()[0].sum().backward()
    assert torch.allclose(bank.read()[0], torch.full((8, 2, 2), 0.5))
    # read = C^T (M - 0.5 C C^T M) = 0.5 C^T M: the gradient of its sum is 0.5 C 1
    want = 0.5 * (bank.C @ torch.ones(8, 1)).reshape(1, 8, 1, 1).expand_as(leaf)
    assert torch.allclose(leaf.grad, want, atol=1e-6)


def test_hopfield_cleanup_takes_an_empty_batch_and_refuses_integer_y():
    hop = HopfieldCleanup(torch.rand(4, 3, 3))
    assert hop(torch.rand(0, 3, 3)).shape == (0, 3, 3)
    assert hop.similarity(torch.rand(2, 0, 3, 3)).shape == (2, 0, 4)
    assert hop.nearest(torch.rand(0, 3, 3)).shape == (0,)
    with pytest.raises(neuropil.DTypeError, match="y must be a floating"):
        hop(torch.ones(3, 3, dtype=torch.int64))


@pytest.mark.parametrize("K,keys", [(6, [0, 2, 3, 5]), (12, [1, 4, 7, 9, 11])])
def test_pinv_read_differentiates_through_the_dual_codes(K, keys):
    # y = D(C)^T M with D = pinv(C)^T: the gradient wrt learned codes runs
    # through D as well as M (it used to see only M, and none at all when the
    # state was written without grad).
    g = torch.Generator().manual_seed(0)
    C0 = torch.randn(8, K, generator=g, dtype=torch.float64)
    v = torch.rand(len(keys), 2, 2, generator=g, dtype=torch.float64)
    w = torch.randn(len(keys), 2, 2, generator=g, dtype=torch.float64)
    for store_grad in (False, True):
        C = C0.clone().requires_grad_(True)
        bank = MembraneBank(8, 2, 2, codes=C, dtype=torch.float64, readout="pinv")
        with torch.set_grad_enabled(store_grad):
            bank.store(v, keys=keys)
        (bank.read(keys)[0] * w).sum().backward()
        ref = C0.clone().requires_grad_(True)
        cs = ref[:, keys]
        m = (cs if store_grad else cs.detach()) @ v.reshape(len(keys), -1)
        # the dual of the whole book while K <= L, of the stored keys' codes past L
        y = (torch.linalg.pinv(ref)[keys] if K <= 8 else torch.linalg.pinv(cs)) @ m
        (y.reshape_as(w) * w).sum().backward()
        assert C.grad is not None
        assert torch.allclose(C.grad, ref.grad, atol=1e-9)
    with torch.no_grad():  # the cached, detached dual still serves no-grad reads
        assert torch.allclose(bank.read(keys)[0], v, atol=1e-9)


@pytest.mark.parametrize("codes,L", [("dct", 8), ("hadamard", 64)])
def test_store_of_values_that_view_the_state(codes, L):
    bank = MembraneBank(L, 2, 2, codes=codes)
    bank.store(torch.rand(L, 2, 2, generator=torch.Generator().manual_seed(0)))
    state = bank.M[0].reshape(L, -1).clone()
    bank.store(bank.M[0])  # values alias the state the GEMM writes
    want = state + bank.C @ state
    assert torch.allclose(bank.M[0].reshape(L, -1), want, atol=1e-5)


# ---------------------------------------------------------------- sizes refused before allocating
@pytest.mark.parametrize(
    "make,name",
    [
        # were torch's RuntimeError 'Storage size calculation overflowed' and
        # numpy's ValueError 'array is too big' (or np.block filling memory)
        (lambda: MembraneBank(8, 2**40, 2**40), "H"),
        (lambda: MembraneBank(8, 2**40, 2**40, device="meta"), "H"),  # past 2**63 bytes
        (lambda: MembraneBank(2**62, 1, 1, codes="gaussian"), "L"),
        (lambda: MembraneBank(2**40, 1, 1), "L"),  # Hadamard: an L x L matrix built
        (lambda: MembraneBank(4, 2, 2, batch=2**61), "batch"),
        (lambda: MembraneBank(4, 2, 2, codes="gaussian", K=2**58), "K"),
        (lambda: MembraneBank(4, 2**62, 1, codes=torch.eye(4)), "H"),
    ],
)
def test_banks_too_large_for_memory_are_refused_before_allocating(make, name):
    with pytest.raises(neuropil.ArgumentError, match=rf"^{name} must give a bank that fits") as e:
        make()
    assert "bytes" in str(e.value) and "would need" in str(e.value)


def test_bank_size_limit_is_the_devices_memory_and_the_message_gives_the_bytes(monkeypatch):
    from neuropil.membrane import _checks

    monkeypatch.setattr(_checks, "device_memory", lambda device: 1 << 20)
    # M 8*256*128*4 + C 8*8*4 + gains 8*4 + counters 2*8*8 + the float64
    # Hadamard matrix while built, twice over (16*8*8): 1050016 bytes; the
    # argument named is the largest extent
    with pytest.raises(neuropil.ArgumentError) as e:
        MembraneBank(8, 256, 128)
    msg = str(e.value)
    assert msg.startswith("H must give a bank that fits in the memory of cpu (1048576 bytes)")
    assert "L=8, H=256, W=128, batch=1, K=8" in msg and "would need 1050016 bytes" in msg
    MembraneBank(8, 255, 128)  # 8 KiB less: fits
    bank = MembraneBank(16, 4, 4)
    with pytest.raises(neuropil.ArgumentError, match="K must give a bank that fits"):
        bank.grow(2**20)
    assert bank.K == 16 and bank.C.shape == (16, 16)  # unchanged
    bank.grow(32)


def test_hopfield_cleanup_refuses_non_finite_patterns():
    p = torch.rand(4, 3, 3, generator=torch.Generator().manual_seed(0))
    for value in (float("nan"), float("inf")):
        bad = p.clone()
        bad[2, 1, 1] = value
        # were accepted: every decode and similarity was NaN
        with pytest.raises(
            neuropil.ArgumentError, match=r"patterns must be finite; got 1 NaN .*pattern 2"
        ):
            HopfieldCleanup(bad)
    with pytest.raises(neuropil.ArgumentError, match=r"patterns must be a floating .*got ndarray"):
        HopfieldCleanup(np.ones((3, 2, 2)))
    HopfieldCleanup(p)


@pytest.mark.parametrize("kind", ["meta", "xpu", "hpu", "mps", "privateuseone"])
def test_bank_size_on_devices_of_unknown_memory_is_only_bounded_by_overflow(kind):
    # (device_memory only inspects the device object: these need no such device)
    from neuropil.membrane import _checks

    device = torch.device(kind)
    assert _checks.device_memory(device) is None  # was the host's RAM (but for meta)
    host = _checks.device_memory(torch.device("cpu"))
    assert host is None or host > 0
    # a state of 2**52 bytes: past any host's RAM, maybe not an accelerator's
    dims = {"L": 2**20, "H": 2**20, "W": 2**10, "batch": 1, "K": 8}
    _checks.check_bank_size(dims, torch.float32, device, 0)  # was refused (host RAM)
    if host is not None:
        with pytest.raises(neuropil.ArgumentError, match=r"^L must give a bank that fits .* cpu"):
            _checks.check_bank_size(dims, torch.float32, torch.device("cpu"), 0)
    # past 2**63 bytes: refused everywhere
    dims["W"] = 2**22
    with pytest.raises(neuropil.ArgumentError, match=rf"fits in the memory of {kind}"):
        _checks.check_bank_size(dims, torch.float32, device, 0)
    # the CPU-side counters are still measured against the host
    if host is not None:
        dims = {"L": 4, "H": 2, "W": 2, "batch": 2**20, "K": 2**30}
        with pytest.raises(neuropil.ArgumentError, match=r"fits in the memory of cpu"):
            _checks.check_bank_size(dims, torch.float32, device, 0)


# ---------------------------------------------------------------- mutation-testing round
def test_read_all_recalls_every_key_with_the_readout_asked_for():
    bank = MembraneBank(8, 2, 3, batch=2, codes="gaussian", K=8)
    v = torch.rand(2, 8, 2, 3, generator=torch.Generator().manual_seed(0))
    bank.store(v)
    for readout in ("correlation", "pinv"):
        got = bank.read_all(readout=readout)
        assert got.shape == (2, 8, 2, 3)
        assert torch.equal(got, bank.read(range(8), readout=readout))
    assert torch.allclose(bank.read_all("pinv"), v, atol=1e-5)  # gaussian codes: pinv exact
    assert not torch.allclose(bank.read_all(), v, atol=1e-2)  # correlation: crosstalk


def test_step_without_argument_applies_one_persistence_step():
    bank = MembraneBank(8, 2, 2, codes="hadamard", persistence=0.5)
    v = torch.rand(8, 2, 2, generator=torch.Generator().manual_seed(0))
    bank.store(v)  # one step (decays the empty state), then the write
    assert bank.steps == 1
    bank.step()
    assert bank.steps == 2 and torch.allclose(bank.read()[0], v / 2, atol=1e-6)
    bank.step(0)
    assert bank.steps == 2


def test_repr_names_the_bank_settings():
    bank = MembraneBank(8, 2, 3, batch=2, codes="dct", K=6, dtype=torch.float64)
    assert repr(bank) == (
        "MembraneBank(L=8, H=2, W=3, batch=2, K=6, codes='dct', readout='correlation', "
        "dtype=torch.float64, device='cpu')"
    )


def test_a_one_layer_hadamard_bank_is_a_power_of_two_too():
    # L = 1 = 2**0: the Hadamard code book is [[1]], and a bank of one layer
    # stores and recalls one pattern exactly.
    assert torch.equal(hadamard_codes(1, 1), torch.ones(1, 1))
    assert torch.equal(generate_codes(1, 1), torch.ones(1, 1))
    bank = MembraneBank(1, 3, 3)
    v = torch.rand(1, 3, 3, generator=torch.Generator().manual_seed(0))
    bank.store(v)
    assert torch.equal(bank.read()[0], v)

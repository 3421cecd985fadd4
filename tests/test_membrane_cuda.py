"""The membrane bank on a CUDA device (skipped without one).

Needs only torch and pytest (no scikit-learn, no hypothesis), so it runs on a
GPU machine with the wheel installed: ``pytest tests/test_membrane_cuda.py``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import neuropil  # noqa: E402
from neuropil.membrane import HopfieldCleanup, MembraneBank, psnr  # noqa: E402

pytestmark = pytest.mark.cuda


def _patterns(k: int, h: int = 8, w: int = 8) -> torch.Tensor:
    return torch.rand(k, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "codes,readout", [("hadamard", "correlation"), ("dct", "correlation"), ("gaussian", "pinv")]
)
def test_cuda_bank_matches_cpu(codes, readout):
    v = _patterns(64)
    cpu = MembraneBank(64, 8, 8, codes=codes, readout=readout)
    gpu = MembraneBank(64, 8, 8, codes=codes, readout=readout, device="cuda")
    cpu.store(v)
    gpu.store(v.cuda())
    y = gpu.read()
    assert y.is_cuda and gpu.M.is_cuda and gpu.C.is_cuda
    assert torch.allclose(y.cpu(), cpu.read(), atol=1e-5)
    assert psnr(v, y[0].cpu(), data_range=1.0) >= 100


def test_cuda_batched_keys_alphas_and_persistence():
    g = torch.Generator().manual_seed(1)
    v = torch.rand(3, 5, 4, 4, generator=g)
    keys = torch.tensor([[0, 1, 2, 3, 4], [7, 6, 5, 4, 3], [2, 2, 9, 11, 15]])
    alphas = torch.rand(3, 5, generator=g)
    cpu = MembraneBank(16, 4, 4, batch=3, codes="gaussian", persistence=0.9)
    gpu = MembraneBank(16, 4, 4, batch=3, codes="gaussian", persistence=0.9, device="cuda")
    cpu.store(v, keys, alphas=alphas)
    gpu.store(v.cuda(), keys.cuda(), alphas=alphas.cuda())
    cpu.step(3)
    gpu.step(3)
    assert torch.allclose(gpu.M.cpu(), cpu.M, atol=1e-6)
    # cuBLAS and the CPU BLAS sum in different orders; `unscale` divides by the code
    # norms, so compare relatively (float32 round-off, not a different answer).
    torch.testing.assert_close(
        gpu.read(keys, unscale=True).cpu(), cpu.read(keys, unscale=True), rtol=1e-4, atol=1e-5
    )
    assert torch.equal(gpu.counts, cpu.counts)


def test_cuda_reduced_precision_save_load_and_sparse(tmp_path):
    v = torch.rand(4, 32, 16, 16, device="cuda")
    fp32 = MembraneBank(32, 16, 16, batch=4, device="cuda")
    tf32 = MembraneBank(32, 16, 16, batch=4, device="cuda", precision="tf32")
    bf16 = MembraneBank(32, 16, 16, batch=4, device="cuda", dtype=torch.bfloat16)
    before = torch.get_float32_matmul_precision()
    fp32.store(v)
    tf32.store(v)
    bf16.store(v.bfloat16())
    assert psnr(v, fp32.read(), data_range=1.0) >= 100
    assert psnr(v, tf32.read(), data_range=1.0) >= 40
    assert psnr(v, bf16.read().float(), data_range=1.0) >= 30
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(neuropil.ArgumentError, match="device"):
        fp32.store(v.cpu())
    with pytest.raises(neuropil.DTypeError, match="dtype"):
        bf16.store(v)
    fp32.save(tmp_path / "b.safetensors")
    back = MembraneBank.load(tmp_path / "b.safetensors", device="cuda")
    assert back.M.is_cuda and torch.equal(back.M, fp32.M)
    sp = (v[0] * (v[0] > 0.999)).to_sparse()  # ~0.1% non-zeros: the scatter path
    dense = MembraneBank(32, 16, 16, batch=4, device="cuda")
    dense.store(sp.to_dense())
    sparse = MembraneBank(32, 16, 16, batch=4, device="cuda")
    sparse.store(sp)
    assert torch.allclose(sparse.M, dense.M, atol=1e-6)


def test_cuda_cleanup_past_L_and_autograd():
    v = _patterns(128).cuda()
    mean = v.mean(0)
    bank = MembraneBank(64, 8, 8, codes="auto", K=128, device="cuda")
    bank.store(v - mean, alphas="adaptive")
    keys, nearest, cleaned = HopfieldCleanup(v, beta=1000.0).decode(bank, offset=mean)
    assert cleaned.is_cuda and float((nearest.cpu() == keys).float().mean()) >= 0.99
    w = torch.rand(16, 3, 3, device="cuda", requires_grad=True)
    b2 = MembraneBank(16, 3, 3, device="cuda")
    b2.store(w)
    b2.read()[0].sum().backward()
    assert torch.allclose(w.grad, torch.ones_like(w), atol=1e-5)

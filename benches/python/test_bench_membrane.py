"""pytest-benchmark suite of the membrane bank against plain torch einsum
(run: pytest benches/python --benchmark-only -k membrane)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from neuropil.membrane import MembraneBank  # noqa: E402

SIZES = {"L32-16x16-b64": (32, 16, 16, 64), "L256-128x128": (256, 128, 128, 1)}


@pytest.fixture(scope="module", params=list(SIZES))
def case(request):
    L, H, W, B = SIZES[request.param]
    v = torch.rand(B, L, H, W, generator=torch.Generator().manual_seed(0))
    bank = MembraneBank(L, H, W, batch=B, codes="hadamard")
    return request.param, bank, v, torch.zeros(B, L, H, W)


def test_store_neuropil(benchmark, case):
    name, bank, v, _ = case
    benchmark.group = f"membrane-store-{name}"
    benchmark(bank.store, v)


def test_store_einsum(benchmark, case):
    name, bank, v, m = case
    benchmark.group = f"membrane-store-{name}"
    benchmark(lambda: m.add_(torch.einsum("lk,bkhw->blhw", bank.C, v)))


def test_read_neuropil(benchmark, case):
    name, bank, _, _ = case
    benchmark.group = f"membrane-read-{name}"
    benchmark(bank.read)


def test_read_einsum(benchmark, case):
    name, bank, _, m = case
    benchmark.group = f"membrane-read-{name}"
    benchmark(lambda: torch.einsum("blhw,lk->bkhw", m, bank.C))

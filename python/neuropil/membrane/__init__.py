"""Membrane bank: a tensor associative memory with orthogonal codes (torch).

``import neuropil.membrane`` imports torch (``import neuropil`` does not).
A bank of shape ``(B, L, H, W)`` stores ``K`` patterns of ``H x W`` in
superposition under codes ``C[:, k]``; orthogonal codes (Hadamard, DCT) recall
exactly while ``K <= L``. See :class:`MembraneBank`.

Example:
    >>> import torch
    >>> from neuropil.membrane import MembraneBank, psnr
    >>> bank = MembraneBank(L=32, H=16, W=16, codes="hadamard")
    >>> v = torch.rand(32, 16, 16)
    >>> bank.store(v, keys=range(32))
    >>> psnr(v, bank.read(range(32))[0], data_range=1.0) > 100
    True
"""

from __future__ import annotations

from . import codes
from .bank import READOUTS, MembraneBank
from .codes import (
    coherence_stats,
    dct_codes,
    gaussian_codes,
    generate_codes,
    hadamard_codes,
    orthogonal_codes,
)
from .extras import AdaptivePersistence, HierarchicalMembraneBank, HopfieldCleanup
from .metrics import psnr, ssim

__all__ = [
    "READOUTS",
    "AdaptivePersistence",
    "HierarchicalMembraneBank",
    "HopfieldCleanup",
    "MembraneBank",
    "codes",
    "coherence_stats",
    "dct_codes",
    "gaussian_codes",
    "generate_codes",
    "hadamard_codes",
    "orthogonal_codes",
    "psnr",
    "ssim",
]

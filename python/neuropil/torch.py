"""torch integration of neuropil: nn modules and data utilities (imports torch).

Each capability keeps its torch code in its own module; this one re-exports it.
"""

from __future__ import annotations

from ._torch_quant import QuantizedLinear, load_quantized, quantize_model, save_quantized
from ._torch_sparse import SparseMLP, sparsify_mlp
from ._windows_torch import WindowBatch, WindowDataset

__all__ = [
    "QuantizedLinear",
    "SparseMLP",
    "WindowBatch",
    "WindowDataset",
    "load_quantized",
    "quantize_model",
    "save_quantized",
    "sparsify_mlp",
]

"""torch integration: ``nn.Module`` drop-ins backed by neuropil's kernels.

Importing this module imports torch; ``import neuropil`` does not.
"""

from ._torch_sparse import SparseMLP, sparsify_mlp  # noqa: F401  (neurons)

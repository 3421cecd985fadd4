"""torch integration of neuropil: nn modules and data utilities (imports torch).

Each capability keeps its torch code in its own module; this one re-exports it.
"""

from __future__ import annotations

from ._windows_torch import WindowBatch, WindowDataset

__all__ = ["WindowBatch", "WindowDataset"]

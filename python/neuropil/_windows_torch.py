"""torch interop of :mod:`neuropil.windows`: a ``Dataset`` with batched ``__getitems__``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from .windows import SlidingWindows

__all__ = ["WindowBatch", "WindowDataset"]


def _as_torch(v: Any) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.from_numpy(v)


class WindowBatch(Sequence):
    """A batch gathered in one call, seen as the sequence of its samples.

    ``DataLoader`` passes what ``__getitems__`` returns to its ``collate_fn``:
    :meth:`WindowDataset.collate` returns :attr:`batch` as is (no copy), while
    torch's ``default_collate`` still works (it stacks the samples: one more
    copy). Samples are views made on access.
    """

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __len__(self) -> int:
        return int(self.batch["frames"].shape[0])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return WindowBatch({k: v[i] for k, v in self.batch.items()})
        return {k: v[i] for k, v in self.batch.items()}


class WindowDataset(Dataset):
    """The windows of a :class:`~neuropil.windows.SlidingWindows` as a torch ``Dataset``.

    ``ds[i]`` is ``{"frames": (W, D) tensor, name: target}``;
    ``ds.__getitems__(indices)`` gathers the whole batch with one parallel Rust
    call (or one ``index_select`` for CUDA frames). Works with any sampler,
    ``DistributedSampler`` included::

        ds = sw.as_dataset()
        loader = DataLoader(ds, batch_size=256, sampler=DistributedSampler(ds),
                            collate_fn=ds.collate)

    ``num_workers=0`` is usually enough: the gather is already parallel and
    releases the GIL. Workers work too, with every start method (``"spawn"``,
    the default on macOS and Windows, and ``"forkserver"``, the default on
    Linux from Python 3.14, included): the dataset pickles through its
    :class:`~neuropil.windows.SlidingWindows` (rebuilt and validated by the
    constructor; numpy arrays by value, torch tensors shared by
    ``torch.multiprocessing``, an ``mmap=True``-loaded file as a reference to
    the file that each worker maps again) and yields the same batches. Each
    worker gathers with its own thread pool: set ``NEUROPIL_NUM_THREADS`` (or
    :func:`neuropil.set_num_threads` in ``worker_init_fn``) to share the cores.
    Out-of-range indices raise ``IndexError``.
    """

    def __init__(self, windows: SlidingWindows):
        self.windows = windows

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickles (and deep-copies) as ``WindowDataset(windows)``; see the class docstring."""
        return type(self), (self.windows,)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return WindowBatch(self.__getitems__([i]).batch)[0]

    def __getitems__(self, indices: Sequence[int]) -> WindowBatch:
        """Gathers windows ``indices`` (ints; floats and bools raise ``DTypeError``)."""
        # No cast to int64 here: a float index must be refused, never truncated.
        batch = self.windows.take(indices)
        return WindowBatch({k: _as_torch(v) for k, v in batch.items()})

    @staticmethod
    def collate(samples: Any) -> Any:
        """``collate_fn`` for ``DataLoader``: a gathered batch as is, else ``default_collate``."""
        if isinstance(samples, WindowBatch):
            return samples.batch
        return default_collate(samples)

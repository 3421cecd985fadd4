"""The batch iterator of :meth:`neuropil.windows.SlidingWindows.batches`.

One epoch of one rank: the order's start frames (int32, 4 bytes a window),
a ring of ``prefetch + 1`` reusable batch buffers, and a background thread that
gathers the next batches while the consumer trains (the Rust gather releases
the GIL). CUDA frames are gathered on their device without a thread.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .errors import ArgumentError
from .windows import _is_torch

if TYPE_CHECKING:
    from .windows import SlidingWindows

__all__ = ["WindowBatches"]


def _device(device: Any) -> Any:
    """``device`` as a ``torch.device`` that exists here, or ArgumentError naming it
    (torch's own errors, at the first batch, would not name the argument)."""
    import torch

    try:
        # (a concrete, available device: torch.device("cuda") alone succeeds
        # without a GPU, and the first copy to it would fail)
        return torch.empty(0, device=device).device
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ArgumentError(
            f"device must be None or an available torch device; got {device!r} ({e})"
        ) from None


class WindowBatches(Iterator[dict[str, Any]]):
    """One epoch of batches of one rank; see :meth:`SlidingWindows.batches`.

    Not picklable (it holds a prefetch thread, its queue and batch buffers):
    pickle the :class:`SlidingWindows` and call ``batches`` again.
    """

    def __init__(
        self,
        sw: SlidingWindows,
        batch_size: int,
        shuffle: bool,
        seed: int,
        epoch: int,
        drop_last: bool,
        rank: int,
        world_size: int,
        device: Any,
        prefetch: int,
        pin_memory: bool,
        reuse_buffers: bool,
    ):
        if seed >= 2**64:
            raise ArgumentError(f"seed must be in [0, 2**64); got {seed}")
        self.sw, self.batch_size, self.drop_last = sw, batch_size, drop_last
        # This rank's window starts in visiting order: int32 (4 bytes a window)
        # below 2**31 frames, else int64.
        self.order_starts = sw._layout.epoch_starts(
            shuffle, seed, epoch, rank, world_size, drop_last
        )
        per_rank = len(self.order_starts)
        self._n = per_rank // batch_size if drop_last else -(-per_rank // batch_size)
        self._k = 0
        self._cuda_frames = sw.device is not None and sw.device.type != "cpu"
        self._starts: Any = self.order_starts
        if self._cuda_frames:
            import torch

            self._starts = torch.from_numpy(self.order_starts).to(sw.device)
            prefetch = 0  # kernel launches are asynchronous already
        self.device = None
        if device is not None and not self._cuda_frames:
            self.device = _device(device)
            if self.device.type == "cpu":
                self.device = None
        pin = pin_memory and sw.torch and self.device is not None
        # No more buffers than batches, none larger than a batch can be: a
        # prefetch or batch size past the epoch (allowed: one batch of
        # everything) would otherwise allocate for windows that do not exist
        # (prefetch=2**62 built a list of 2**62 buffers: a hang).
        prefetch = min(prefetch, max(self._n - 1, 0))
        rows = min(batch_size, per_rank)
        self._ring = prefetch + 1
        self._reuse = reuse_buffers
        self._pin = pin
        self._slots = [sw._buffers(rows, pin) for _ in range(self._ring)] if reuse_buffers else []
        self._events: list[Any] = [None] * self._ring
        self._prefetch = prefetch
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue = queue.Queue()
        self._free = threading.Semaphore(self._ring)
        self._held = False
        self._stop = threading.Event()

    def __len__(self) -> int:
        return self._n

    def __reduce__(self) -> Any:
        raise TypeError(
            "cannot pickle a WindowBatches iterator (it holds a prefetch thread and "
            "buffers): pickle the SlidingWindows and call batches() again"
        )

    def __iter__(self) -> WindowBatches:
        return self

    def _make(self, k: int) -> tuple[int, dict[str, Any]]:
        lo = k * self.batch_size
        starts = self._starts[lo : lo + self.batch_size]
        slot = k % self._ring
        if self._reuse:
            event = self._events[slot]
            if event is not None:
                event.synchronize()  # the async copy out of this buffer is done
            buffers = self._slots[slot]
        else:
            buffers = self.sw._buffers(len(starts), self._pin)
        return slot, self.sw._fill(starts, buffers)

    @staticmethod
    def _produce(
        ref: weakref.ref, n: int, free: threading.Semaphore, q: queue.Queue, stop: threading.Event
    ) -> None:
        # Holds the iterator only by weak reference between batches, so an
        # iterator dropped mid-epoch (a `break`) is collected and stops this thread.
        try:
            for k in range(n):
                while not free.acquire(timeout=0.05):
                    if stop.is_set() or ref() is None:
                        return
                owner = ref()
                if stop.is_set() or owner is None:
                    return
                item = owner._make(k)
                del owner
                q.put(item)
        except BaseException as e:  # handed to the consumer
            q.put(e)

    def __next__(self) -> dict[str, Any]:
        if self._k >= self._n:
            self.close()
            raise StopIteration
        if self._prefetch == 0:
            slot, batch = self._make(self._k)
        else:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=WindowBatches._produce,
                    args=(weakref.ref(self), self._n, self._free, self._queue, self._stop),
                    name="neuropil-windows-prefetch",
                    daemon=True,
                )
                self._thread.start()
            if self._held:
                self._free.release()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            slot, batch = item
            self._held = True
        self._k += 1
        if self.device is not None:
            import torch

            batch = {
                k: (v if _is_torch(v) else torch.from_numpy(v)).to(
                    self.device, non_blocking=self._pin
                )
                for k, v in batch.items()
            }
            if self._pin and self._reuse and self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
                self._events[slot] = event
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (also done at the end of the epoch)."""
        self._stop.set()
        if self._held:
            self._free.release()
            self._held = False
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> WindowBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when __init__ failed
        if stop is not None:
            stop.set()

"""A process-wide setting changed for the length of a block, from any number of
threads.

torch's matmul precision flags (``torch.backends.cuda.matmul.allow_tf32``,
``torch.set_float32_matmul_precision``) are global. Saving the old value on
entry and writing it back on exit, in each thread on its own, loses the
user's value when two blocks overlap: the second saves the first's value, the
first restores the user's, the second then restores the first's, and the
process keeps it. Here the first block in saves and sets it and the last block
out restores it (a count under a lock).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Scoped:
    """``with scoped():`` runs the block with ``set(value)`` in effect.

    Args:
        get: Reads the setting.
        set: Writes it.
        value: The value inside the blocks.
    """

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None], value: Any) -> None:
        self._get, self._set, self._value = get, set, value
        self._lock = threading.Lock()
        self._inside = 0
        self._saved: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                self._saved = self._get()
                self._set(self._value)
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    self._set(self._saved)


def _get_tf32() -> bool:
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32)


def _set_tf32(on: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on


#: ``with no_tf32():`` runs float32 CUDA matmuls in full float32 (no TF32).
#: One object for every user of the flag (FlyHash, range search): two would
#: save each other's values.
no_tf32 = Scoped(_get_tf32, _set_tf32, False)

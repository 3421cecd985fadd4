"""How float32 CUDA matmuls run (full float32 or TF32), changed for the length
of a block, from any number of threads.

torch keeps this as one process-wide setting, and neuropil pulls it two ways:
exact range search and FlyHash need full float32 (``with no_tf32():``, so GPU
results equal the CPU's), a membrane bank with ``precision="tf32"`` asks for
TF32 (``with tf32():``, speed traded knowingly). One arbiter counts the blocks
of both modes under one lock:

- while any exact block is inside, matmuls run in full float32: correctness
  wins, so a bank's tf32 block beside an exact range or FlyHash block (another
  thread) runs in full float32 too; else, while any tf32 block is inside, TF32;
- the first block in saves the user's setting, the last out (of either mode)
  writes it back.

Saving on entry and restoring on exit in each block on its own loses the user's
value when blocks overlap (the second in saves the first's value and, leaving
last, keeps it); two such savers of settings torch links together restore each
other's values.

The mode is written with ``torch.set_float32_matmul_precision`` ("highest" or
"high"). Since torch 2.9 matmul precision has two APIs over linked state: the
legacy level (``set/get_float32_matmul_precision``, ``allow_tf32``) and the
per-backend values (``torch.backends.cuda.matmul.fp32_precision``, the oneDNN
``torch.backends.mkldnn.matmul.fp32_precision``). ``set_float32_matmul_precision``
is the one call that sets all of them to agree (oneDNN's CPU matmuls follow
the mode inside blocks too); ``allow_tf32`` leaves oneDNN's value and the new
setter leaves the legacy level, and where they contradict, the legacy getters
(read by user code from other threads, and by some torch versions' own CUDA
GEMMs) raise "mix of the legacy and new APIs". The user's setting is saved as those
three parts and written back the same way, so that afterwards every getter
reads what it read before (and raises only where it raised before). One
difference remains: torch's getters answer a backend's matmul value resolved
through its parents, so a value the user set to what the parent already said
(cuda matmul "tf32" under a generic "tf32") comes back unset, and follows a
later change of the parent. A change the user makes while a block is inside is
overwritten when the last one leaves.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

# set_float32_matmul_precision levels of the two modes
_EXACT, _TF32 = "highest", "high"

# (legacy level, cuda matmul value, oneDNN matmul value); the last two are None
# on torch < 2.9, where the level is the whole setting.
_Saved = tuple[str, str | None, str | None]


class _MatmulMode:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = {_EXACT: 0, _TF32: 0}
        self._mode: str | None = None  # the level in effect; None: the user's setting
        self._saved: _Saved | None = None

    @contextlib.contextmanager
    def block(self, mode: str) -> Iterator[None]:
        with self._lock:
            self._inside[mode] += 1
            try:
                self._apply()
            except BaseException:
                self._inside[mode] -= 1  # a failed entry must not hold the mode forever
                raise
        try:
            yield
        finally:
            with self._lock:
                self._inside[mode] -= 1
                self._apply()

    def _apply(self) -> None:
        """Writes the mode the blocks inside ask for, if it is not in effect."""
        want = _EXACT if self._inside[_EXACT] else _TF32 if self._inside[_TF32] else None
        if want == self._mode:
            return
        if self._mode is None:
            self._saved = _save()
        if want is None:
            assert self._saved is not None
            _restore(self._saved)
            self._saved = None
        else:
            import torch

            torch.set_float32_matmul_precision(want)
        self._mode = want


_MODE = _MatmulMode()


def no_tf32() -> contextlib.AbstractContextManager[None]:
    """``with no_tf32():`` runs float32 CUDA matmuls in full float32 (no TF32),
    also while tf32 blocks are inside in other threads."""
    return _MODE.block(_EXACT)


def tf32() -> contextlib.AbstractContextManager[None]:
    """``with tf32():`` lets float32 CUDA matmuls use TF32 tensor cores, unless
    a :func:`no_tf32` block is inside (then they run in full float32)."""
    return _MODE.block(_TF32)


def _new_api(torch: Any) -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9


def _save() -> _Saved:
    import torch

    if not _new_api(torch):
        return torch.get_float32_matmul_precision(), None, None
    b: Any = torch.backends  # the fp32_precision attributes are not in torch's stubs
    # cudnn.fp32_precision is the cuda backend's own ("all") value
    cuda = _own(b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision)
    mkldnn = _own(b.mkldnn.matmul.fp32_precision, b.mkldnn.fp32_precision)
    return _legacy_level(torch), cuda, mkldnn


def _own(matmul: str, inherited: str) -> str:
    """The matmul value to write back: the getter resolves an unset ("none")
    value to the backend's, then the generic one; "none" where it reads the
    same keeps a later change of those reaching the matmul."""
    return "none" if matmul == inherited else matmul


def _legacy_level(torch: Any) -> str:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        pass
    # The user's per-backend values contradict the legacy level, and torch
    # refuses to read it; the contradiction it checks tells which level it is.
    # allow_tf32 reads level != "highest", and raises where that differs from
    # cuda's value being "tf32".
    try:
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        tf32 = torch.backends.cuda.matmul.fp32_precision != "tf32"
    if not tf32:
        return "highest"
    # get_float32_matmul_precision raised at "high" or "medium": oneDNN's value
    # is the other level's ("bf16" is medium's, "tf32" high's).
    return "high" if torch.backends.mkldnn.matmul.fp32_precision == "bf16" else "medium"


def _restore(saved: _Saved) -> None:
    import torch

    level, cuda, mkldnn = saved
    # the level, with per-backend values that agree with it, then the user's
    # values (if those agree with the level, so does every step between)
    torch.set_float32_matmul_precision(level)
    if cuda is not None:
        b: Any = torch.backends
        b.cuda.matmul.fp32_precision = cuda
        b.mkldnn.matmul.fp32_precision = mkldnn

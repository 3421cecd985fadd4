# Type stubs of the Rust extension; CI checks them against the built module (mypy stubtest).
from collections.abc import Sequence
from typing import final

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = [
    "_RangeIndex",
    "__version__",
    "_input_info",
    "cpu_features",
    "dot",
    "get_num_threads",
    "set_num_threads",
    "simd_level",
    "simd_levels",
]

_ArrayLike = npt.NDArray[np.floating] | Sequence[float]

def simd_level() -> str: ...
def simd_levels() -> list[str]: ...
def cpu_features() -> list[str]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def dot(a: _ArrayLike, b: _ArrayLike, level: str | None = None) -> float: ...
def _input_info(x: _ArrayLike, checked: bool = False) -> tuple[int, bool]: ...

# ---- range: exact halfspace range search (neuropil.range) ----
_I64 = npt.NDArray[np.int64]
_F32 = npt.NDArray[np.float32]

@final
class _RangeIndex:
    def __new__(
        cls,
        keys: _ArrayLike,
        method: str = "auto",
        leaf: int = 64,
        branching: int = 8,
        rebuild_fraction: float = 0.25,
        rebuild_min: int = 256,
        seed: int = 0,
    ) -> _RangeIndex: ...
    def search(
        self, queries: _ArrayLike, thresholds: _ArrayLike, level: str | None = None
    ) -> tuple[_I64, _I64, _F32, _F32, _F32]: ...
    def topk(
        self, queries: _ArrayLike, k: int, level: str | None = None
    ) -> tuple[_I64, _F32, _F32]: ...
    def add(self, keys: _ArrayLike) -> None: ...
    def rebuild(self) -> None: ...
    def keys(self) -> _F32: ...
    def stats(self) -> dict[str, object]: ...
    @property
    def d(self) -> int: ...
    @property
    def method(self) -> str: ...
    def __len__(self) -> int: ...

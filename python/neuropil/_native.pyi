# Type stubs of the Rust extension; CI checks them against the built module (mypy stubtest).
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__version__: str
__all__ = [
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

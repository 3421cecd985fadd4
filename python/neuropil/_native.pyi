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
    "memory_read_bandwidth",
    "quant_check",
    "quant_dequantize",
    "quant_from_gguf",
    "quant_matvec",
    "quant_matvec_rows",
    "quant_quantize",
    "quant_to_gguf",
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

# ---- quant (packed quantization); scales/mins: uint16 float16 bits or float32
_Packed = tuple[npt.NDArray[np.uint8], npt.NDArray[np.generic], npt.NDArray[np.generic] | None]

def quant_quantize(
    w: _ArrayLike,
    bits: int,
    group_size: int,
    scheme: str,
    scale_dtype: str = "float16",
    search: bool = False,
) -> _Packed: ...
def quant_check(
    data: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.generic],
    mins: npt.NDArray[np.generic] | None,
    rows: int,
    cols: int,
    bits: int,
    group_size: int,
    scheme: str,
) -> None: ...
def quant_dequantize(
    data: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.generic],
    mins: npt.NDArray[np.generic] | None,
    rows: int,
    cols: int,
    bits: int,
    group_size: int,
    scheme: str,
) -> npt.NDArray[np.float32]: ...
def quant_matvec(
    data: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.generic],
    mins: npt.NDArray[np.generic] | None,
    rows: int,
    cols: int,
    bits: int,
    group_size: int,
    scheme: str,
    x: _ArrayLike,
    level: str | None = None,
) -> npt.NDArray[np.float32]: ...
def quant_matvec_rows(
    data: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.generic],
    mins: npt.NDArray[np.generic] | None,
    rows: int,
    cols: int,
    bits: int,
    group_size: int,
    scheme: str,
    x: _ArrayLike,
    index: npt.NDArray[np.int64],
    level: str | None = None,
) -> npt.NDArray[np.float32]: ...
def quant_to_gguf(
    data: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.generic],
    mins: npt.NDArray[np.generic] | None,
    rows: int,
    cols: int,
    bits: int,
    group_size: int,
    scheme: str,
) -> npt.NDArray[np.uint8]: ...
def quant_from_gguf(
    raw: npt.NDArray[np.uint8], scheme: str, rows: int, cols: int
) -> _Packed: ...
def memory_read_bandwidth(mib: int = 512, repeat: int = 5) -> float: ...

# Type stubs of the Rust extension; CI checks them against the built module (mypy stubtest).
from collections.abc import Sequence
from typing import final

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
    "spin_us",
]

_ArrayLike = npt.NDArray[np.floating] | Sequence[float]

def simd_level() -> str: ...
def simd_levels() -> list[str]: ...
def cpu_features() -> list[str]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def spin_us() -> int: ...
def dot(a: _ArrayLike, b: _ArrayLike, level: str | None = None) -> float: ...
def _input_info(x: _ArrayLike, checked: bool = False) -> tuple[int, bool]: ...

# ---------------------------------------------------------------- windows (neuropil.windows)
__all__ += ["WindowLayout", "windows_gather", "windows_permutation"]

@final
class WindowLayout:
    def __new__(
        cls,
        n_frames: int,
        window: int,
        stride: int = 1,
        lookahead: int = 0,
        episodes: npt.NDArray[np.int64] | None = None,
        kind: str = "offsets",
    ) -> WindowLayout: ...
    def __len__(self) -> int: ...
    @property
    def window(self) -> int: ...
    @property
    def stride(self) -> int: ...
    @property
    def lookahead(self) -> int: ...
    @property
    def n_frames(self) -> int: ...
    def offsets(self) -> npt.NDArray[np.int64]: ...
    def cumulative_counts(self) -> npt.NDArray[np.int64]: ...
    def start(self, index: int) -> int: ...
    def episode_of(self, index: int) -> int: ...
    def starts(self, indices: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]: ...
    def all_starts(self) -> npt.NDArray[np.int64]: ...
    def epoch_order(
        self,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> npt.NDArray[np.int64]: ...
    def epoch_starts(
        self,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> npt.NDArray[np.int32] | npt.NDArray[np.int64]: ...

def windows_permutation(n: int, seed: int, epoch: int) -> npt.NDArray[np.int64]: ...
def windows_gather(
    src: npt.NDArray[np.uint8],
    starts: npt.NDArray[np.int64] | npt.NDArray[np.int32],
    shift: int,
    rows: int,
    out: npt.NDArray[np.uint8],
    arg: str = "frames",
) -> None: ...

# ---------------------------------------------------------------- flyhash (neuropil.flyhash)
__all__ += ["BinaryIndex", "FlyHash", "popcount_kernel"]

from os import PathLike  # noqa: E402
from typing import Any, final  # noqa: E402

@final
class FlyHash:
    def __new__(
        cls,
        input_dim: int,
        expansion_ratio: float,
        active_fraction: float,
        seed: int,
        projection: str,
        connectivity: float,
        binary: bool,
    ) -> FlyHash: ...
    @property
    def input_dim(self) -> int: ...
    @property
    def output_dim(self) -> int: ...
    @property
    def active_bits(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def projection(self) -> str: ...
    @property
    def expansion_ratio(self) -> float: ...
    @property
    def active_fraction(self) -> float: ...
    @property
    def connectivity(self) -> float: ...
    @property
    def connections(self) -> int: ...
    @property
    def binary(self) -> bool: ...
    @property
    def memory_bytes(self) -> int: ...
    def check_rows(self, n: int, want: str) -> None: ...
    def encode(self, x: Any, level: str | None = None) -> npt.NDArray[np.float32]: ...
    def activations(self, x: Any, level: str | None = None) -> npt.NDArray[np.float32]: ...
    def encode_indices(self, x: Any, level: str | None = None) -> npt.NDArray[np.uint32]: ...
    def hash(self, x: Any, level: str | None = None) -> npt.NDArray[np.uint8]: ...
    def projection_arrays(self) -> list[tuple[str, npt.NDArray[Any]]]: ...
    def save(self, path: str | PathLike[str]) -> None: ...
    @staticmethod
    def load(path: str | PathLike[str]) -> FlyHash: ...

@final
class BinaryIndex:
    def __new__(cls, nbits: int) -> BinaryIndex: ...
    @property
    def nbits(self) -> int: ...
    @property
    def code_bytes(self) -> int: ...
    def __len__(self) -> int: ...
    def add(self, codes: Any, ids: Any = None) -> None: ...
    def remove(self, ids: Any) -> int: ...
    def search(
        self, queries: Any, k: int, metric: str = "hamming", level: str | None = None
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]: ...
    def range_search(
        self, queries: Any, max_distance: int, level: str | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.int64]]: ...
    def contents(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]: ...
    def save(self, path: str | PathLike[str]) -> None: ...
    @staticmethod
    def load(path: str | PathLike[str]) -> BinaryIndex: ...
    def to_bytes(self) -> bytes: ...
    @staticmethod
    def from_bytes(data: bytes, origin: str = "BinaryIndex state") -> BinaryIndex: ...

def popcount_kernel(level: str | None = None) -> str: ...

# ---------------------------------------------------------------- quant (neuropil.quant)
__all__ += [
    "memory_read_bandwidth",
    "quant_check",
    "quant_dequantize",
    "quant_from_gguf",
    "quant_matvec",
    "quant_matvec_rows",
    "quant_quantize",
    "quant_to_gguf",
]

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
def quant_from_gguf(raw: npt.NDArray[np.uint8], scheme: str, rows: int, cols: int) -> _Packed: ...
def memory_read_bandwidth(mib: int = 512, repeat: int = 5) -> float: ...

__all__ += ["_RangeIndex"]

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
    def copy(self) -> _RangeIndex: ...
    def rebuild(self) -> None: ...
    def keys(self) -> _F32: ...
    def state(self) -> tuple[_F32, int, int]: ...
    def stats(self) -> dict[str, object]: ...
    @property
    def d(self) -> int: ...
    @property
    def method(self) -> str: ...
    def __len__(self) -> int: ...

__all__ += ["_InputSparseFfn", "_NeuronCache", "_SparseFfn"]

# ---- neurons (neuropil.neurons wraps these)

@final
class _NeuronCache:
    def __new__(
        cls,
        num_neurons: int,
        capacity: int,
        bytes_per_neuron: int,
        policy_name: str,
        decay: float | None = None,
        window: int | None = None,
        hysteresis: float = 0.0,
        reclassify_every: int = 0,
    ) -> _NeuronCache: ...
    @property
    def num_neurons(self) -> int: ...
    def record_indices(self, ids: npt.NDArray[np.int64]) -> None: ...
    def record_batch(self, mask: npt.NDArray[np.uint8]) -> None: ...
    def reclassify(self) -> None: ...
    def set_hot(self, ids: npt.NDArray[np.int64]) -> None: ...
    def hot_neurons(self) -> npt.NDArray[np.uint32]: ...
    def cold_neurons(self) -> npt.NDArray[np.uint32]: ...
    def counts(self) -> npt.NDArray[np.uint64]: ...
    def activation_frequency(self, neuron: int) -> float: ...
    def stats(self) -> dict[str, int | float]: ...
    def reset_stats(self) -> None: ...
    def clear(self) -> None: ...
    def state(
        self,
    ) -> tuple[
        npt.NDArray[np.uint64],
        npt.NDArray[np.float32],
        npt.NDArray[np.uint64],
        npt.NDArray[np.uint32],
        list[int],
        bool,
    ]: ...
    def load_state(
        self,
        counts: npt.NDArray[np.uint64],
        scores: npt.NDArray[np.float32],
        last: npt.NDArray[np.uint64],
        hot: npt.NDArray[np.uint32],
        counters: list[int],
        classified: bool,
    ) -> None: ...

@final
class _SparseFfn:
    def __new__(
        cls,
        gate: _ArrayLike | None,
        up: _ArrayLike,
        down: _ArrayLike,
        activation: str,
        dtype: str,
        up_bias: _ArrayLike | None = None,
        down_bias: _ArrayLike | None = None,
    ) -> _SparseFfn: ...
    @property
    def num_neurons(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def gated(self) -> bool: ...
    @property
    def bytes_per_neuron(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    def forward(self, x: _ArrayLike, mode: str, value: float) -> npt.NDArray[np.float32]: ...
    def activations(self, x: _ArrayLike) -> npt.NDArray[np.float32]: ...
    def set_hot(self, ids: npt.NDArray[np.uint32]) -> None: ...
    def hot_neurons(self) -> npt.NDArray[np.uint32]: ...
    def stats(self) -> dict[str, int]: ...
    def reset_stats(self) -> None: ...
    def to_matrices(
        self,
    ) -> tuple[_F32 | None, _F32, _F32]: ...

@final
class _InputSparseFfn:
    def __new__(
        cls,
        gate: _ArrayLike | None,
        up: _ArrayLike,
        down: _ArrayLike,
        activation: str,
        dtype: str,
        up_bias: _ArrayLike | None = None,
        down_bias: _ArrayLike | None = None,
    ) -> _InputSparseFfn: ...
    @property
    def num_neurons(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def gated(self) -> bool: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    def forward(
        self, x: _ArrayLike, t_in: float | None = None, t_hidden: float | None = None
    ) -> _F32: ...
    def hidden(self, x: _ArrayLike, t_in: float | None = None) -> _F32: ...
    def stats(self) -> dict[str, int]: ...
    def reset_stats(self) -> None: ...
    def to_matrices(
        self,
    ) -> tuple[_F32 | None, _F32, _F32]: ...

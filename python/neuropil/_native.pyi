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

# ---------------------------------------------------------------- windows (neuropil.windows)
__all__ += ["WindowLayout", "windows_gather", "windows_permutation"]

from typing import final  # noqa: E402

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

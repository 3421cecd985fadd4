"""neuropil: memory-frugal building blocks for neural inference and neural memory.

The hot loops live in a Rust core (``neuropil._native``) with runtime-dispatched
SIMD and a rayon thread pool; this package is the Python face of it. Importing
``neuropil`` never imports torch or transformers: ``neuropil.torch`` and
``neuropil.hf`` do, when you use them.
"""

from __future__ import annotations

import builtins
import importlib.util
from typing import Any

import numpy as np

from . import _native
from .errors import ArgumentError, DTypeError, FormatError, NeuropilError, ShapeError, _shown

__version__: str = _native.__version__

__all__ = [
    "ArgumentError",
    "DTypeError",
    "FormatError",
    "NeuropilError",
    "ShapeError",
    "__version__",
    "dot",
    "get_num_threads",
    "info",
    "set_num_threads",
    "simd_level",
]


def set_num_threads(n: int) -> None:
    """Sets the number of threads every parallel neuropil call uses.

    The default is ``NEUROPIL_NUM_THREADS`` if set, else every core. Takes effect
    for the next call; calls already running finish with their threads.

    Short calls (a small FFN layer or quantized layer, tens of microseconds) run
    on the calling thread and pool threads that stay awake, spinning, for
    ``NEUROPIL_SPIN_US`` microseconds after each call (default 50; 0 sends such
    calls through the pool instead), as OpenMP runtimes do: a burst of calls
    then does not pay a thread wake-up each time. Where the spinning threads do
    not run beside the caller (a VM whose host does not run its vCPUs side by
    side), calls under 40 us run on the calling thread alone.

    Args:
        n: Thread count, 1 to 4096 (far past any CPU's cores: a bound on
            what a typo costs, since each thread takes time to start; the
            same bound applies to ``NEUROPIL_NUM_THREADS``).

    Raises:
        ArgumentError: ``n`` is not an integer in [1, 4096].
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise ArgumentError(f"n must be a positive integer at most 4096; got {_shown(n)}")
    _native.set_num_threads(int(n))  # (refuses 0, negative and past 4096 counts, 2**70 too)


def get_num_threads() -> int:
    """Returns the number of threads parallel neuropil calls use."""
    return _native.get_num_threads()


def simd_level() -> str:
    """Returns the SIMD level the kernels run at: ``scalar``, ``avx2``, ``avx512`` or ``neon``.

    The best level the CPU supports, unless ``NEUROPIL_KERNEL`` forces one.

    Raises:
        NeuropilError: ``NEUROPIL_KERNEL`` names an unknown level or one this CPU lacks.
    """
    return _native.simd_level()


def _float32_if_torch(x: Any) -> Any:
    """Converts a floating torch tensor the native kernels cannot borrow (bfloat16 or
    float16, on an accelerator, or requiring grad) to float32 on the CPU, once.

    Anything else, torch tensors of other dtypes included, passes through unchanged,
    so the native layer still reports it; torch is only touched when ``x`` is a
    torch object (``import neuropil`` stays torch-free).
    """
    if not type(x).__module__.startswith("torch"):
        return x
    import torch

    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        return x
    if x.dtype in (torch.bfloat16, torch.float16) or x.device.type != "cpu" or x.requires_grad:
        return x.detach().to(device="cpu", dtype=torch.float32)
    return x


def dot(a: Any, b: Any) -> float:
    """Dot product of two vectors with the dispatched SIMD kernel.

    Runs at :func:`simd_level`, in the thread pool for vectors over 64 Ki elements.
    Sums are float32, added in a fixed chunk order, so the result does not depend
    on the thread count. NaN and Inf propagate, as in numpy.

    Args:
        a: Vector of shape ``(n,)``: a numpy array, a torch tensor or a list of
            floats. A float32 C-contiguous numpy array or CPU torch tensor is read
            in place; other float dtypes (float64, float16, torch bfloat16) and
            non-contiguous views are converted to float32 once, as are torch
            tensors on an accelerator or requiring grad (copied to the CPU).
        b: Vector of shape ``(n,)``, the same length as ``a``; same input rules.

    Returns:
        ``sum(a * b)`` as a Python float.

    Raises:
        ShapeError: ``a`` or ``b`` is not 1-D or is empty, or ``b``'s length differs
            from ``a``'s (``b must have shape (4,) to match a; got (3,)``).
        DTypeError: ``a`` or ``b`` is not a float array (integer, bool, complex or
            string dtypes are refused, not cast).
    """
    return _native.dot(_float32_if_torch(a), _float32_if_torch(b))


def _setting(get: Any, key: str, errors: dict[str, str]) -> Any:
    """``get()``, or ``None`` with what is wrong with the environment variable it
    reads put in ``errors[key]``: a description must describe a bad setting,
    not fail on it (and a typed field must not turn into a message)."""
    try:
        return get()
    except NeuropilError as e:
        errors[key] = f"{type(e).__name__}: {e}"
        return None


def info(probe_torch: bool = True) -> dict[str, Any]:
    """Describes this installation.

    Args:
        probe_torch: Import torch (if installed) to report its version and CUDA.
            ``False`` only reports whether torch is installed.

    Returns:
        A dict with ``version``, ``simd_level``, ``simd_levels`` (all the CPU
        supports), ``cpu_features``, ``threads`` (int), ``spin_us`` (int: how
        long the short-call threads spin between calls, ``NEUROPIL_SPIN_US``),
        ``torch`` (version, None when not installed, or ``"installed, but
        unusable (...)"`` when importing it fails), ``cuda`` (bool),
        ``cuda_devices`` (names) and ``errors``: a malformed
        ``NEUROPIL_NUM_THREADS``, ``NEUROPIL_SPIN_US`` or ``NEUROPIL_KERNEL``
        makes ``threads``, ``spin_us`` or ``simd_level`` ``None`` and
        ``errors[field]`` the error every call that needs it raises
        (``"ArgumentError: ..."``); ``{}`` when nothing is wrong.
    """
    errors: dict[str, str] = {}
    out: dict[str, Any] = {
        "version": __version__,
        "simd_level": _setting(_native.simd_level, "simd_level", errors),
        "simd_levels": _native.simd_levels(),
        "cpu_features": _native.cpu_features(),
        "threads": _setting(_native.get_num_threads, "threads", errors),
        "spin_us": _setting(_native.spin_us, "spin_us", errors),
        "torch": None,
        "cuda": False,
        "cuda_devices": [],
        "errors": errors,
    }
    if importlib.util.find_spec("torch") is None:
        return out
    if not probe_torch:
        out["torch"] = "installed"
        return out
    try:
        import torch

        if torch.__version__ is None:
            raise ValueError("no version: torch.__version__ is None")
        out["torch"] = torch.__version__
        out["cuda"] = bool(torch.cuda.is_available())
        if out["cuda"]:
            out["cuda_devices"] = [
                # (builtins.range: once `neuropil.range` is imported, this module's
                # global `range` is that submodule)
                torch.cuda.get_device_name(i)
                for i in builtins.range(torch.cuda.device_count())
            ]
    except Exception as e:  # a broken install: say so rather than fail to describe it
        out.update(torch=f"installed, but unusable ({type(e).__name__}: {e})", cuda=False)
        out["cuda_devices"] = []
    return out

"""Neuron cache and sparse FFN: keep the neurons that fire in fast memory, and
compute only the active neurons of a feed-forward block.

``NeuronCache`` records which of a layer's neurons are active on each token
(index lists, boolean masks, or a whole ``(n, num_neurons)`` batch mask in one
call), keeps a hot set bounded by a capacity (neurons or bytes) chosen by a
policy (``frequency`` with optional exponential decay, ``window`` over the last
``k`` tokens, or a ``static`` calibrated set), with hysteresis, and reports
hit rates and bytes fetched.

``SparseFFN`` stores an FFN's weights neuron-major (each neuron's gate row, up
row and down column contiguous), computes the gate (or, ungated, the up
pre-activation) densely, keeps the neurons whose ``|activation|`` exceeds a
calibrated threshold (or the top-k), and reads the up rows and down columns of
those neurons only. Hot neurons are copied into a separate dense tier.

``InputSparseFFN`` (TEAL) masks the inputs of each projection instead: small
inputs skip their gate and up columns, small hidden values their down columns,
so sparsity ``s`` reads ``1 - s`` of the weights where ``SparseFFN`` must still
read the whole gate.

Example:
    >>> import numpy as np
    >>> from neuropil.neurons import SparseFFN
    >>> rng = np.random.default_rng(0)
    >>> gate, up = rng.standard_normal((2, 1536, 576), dtype=np.float32) * 0.05
    >>> down = rng.standard_normal((576, 1536), dtype=np.float32) * 0.05
    >>> ffn = SparseFFN(gate, up, down, activation="silu")
    >>> t = ffn.calibrate(rng.standard_normal((64, 576), dtype=np.float32), sparsity=0.5)
    >>> y = ffn(rng.standard_normal(576, dtype=np.float32))  # (576,), half the neurons
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _native, _safetensors
from .errors import (
    ArgumentError,
    DTypeError,
    FormatError,
    ShapeError,
    _check_format_version,
    _non_finite,
    _real,
    _shown,
)

__all__ = ["InputSparseFFN", "NeuronCache", "SparseFFN"]

FORMAT = "neuropil.neuron_cache"
FORMAT_VERSION = 1
_POLICIES = ("frequency", "window", "static")
_FFN_COUNTERS = ("calls", "rows", "active_pairs", "hot_fetches", "cold_fetches", "cold_bytes")


_U64_MAX = 2**64 - 1
_F32_MAX = float(np.finfo(np.float32).max)


def _int(name: str, v: Any, lo: int = 0, hi: int = _U64_MAX) -> int:
    # (the default bound is the bindings' u64: past it they raise a bare OverflowError)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < lo:
        raise ArgumentError(f"{name} must be an integer >= {lo}; got {_shown(v)}")
    if int(v) > hi:
        raise ArgumentError(f"{name} must be an integer in [{lo}, {hi}]; got {_shown(v)}")
    return int(v)


def _activation(v: Any) -> str:
    """``activation`` checked for type here (the core names the accepted values)."""
    if not isinstance(v, str):
        raise ArgumentError(f"activation must be one of 'silu', 'gelu', 'relu'; got {_shown(v)}")
    return v


def _weight_dtype(bits: Any, dtype: str) -> str:
    """The stored weight type for a ``bits`` / ``dtype`` pair (both FFN classes)."""
    if bits is not None:
        # (an int: 4.0 == 4, but a float where an integer is meant is refused)
        if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or bits not in (8, 4):
            raise ArgumentError(f"bits must be None, 8 or 4; got {_shown(bits)}")
        if dtype != "float32":
            raise ArgumentError(f"give bits or dtype, not both; got bits={bits}, dtype={dtype!r}")
        return "int8" if bits == 8 else "int4"
    if dtype not in ("float32", "float16"):
        raise ArgumentError(f"dtype must be 'float32' or 'float16'; got {dtype!r}")
    return dtype


#: The weight arguments of SparseFFN and InputSparseFFN, in order.
_WEIGHT_NAMES = ("gate", "up", "down", "up_bias", "down_bias")


def _as_numpy(x: Any, arg: str, want: str = "an array") -> np.ndarray:
    """numpy view of an array-like or a CPU torch tensor (CUDA tensors are copied to the host).
    A ragged nested list raises ShapeError: ``{arg} must be {want}; got a ragged sequence``."""
    if type(x).__module__.startswith("torch"):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype.is_floating_point and x.dtype.itemsize == 2:
            x = x.float()  # bfloat16 (no numpy dtype) and float16: read as float32
        return x.numpy()
    try:
        return np.asarray(x)
    except ValueError as e:  # ragged nested lists
        raise ShapeError(f"{arg} must be {want}; got a ragged sequence ({e})") from None


def _torch_path(x: Any) -> bool:
    """Whether a torch tensor must take the torch ops: it is on an accelerator,
    or gradients must flow back to it (the kernels' numpy output carries no
    autograd graph: a gradient through the FFN would be silently missing)."""
    if x.device.type != "cpu":
        return True
    if x.requires_grad:
        import torch

        return torch.is_grad_enabled()
    return False


def _check_torch_x(x: Any, d: int) -> None:
    """The checks the kernels make, for a tensor taking the torch path (CUDA, or
    requiring grad): torch's own errors there would name no argument, and a
    complex tensor would lose its imaginary part."""
    if not x.is_floating_point():
        raise DTypeError(f"x must be a floating-point tensor; got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != d:
        raise ShapeError(f"x must have shape (..., {d}); got {tuple(x.shape)}")


def _check_up_bias(gate: Any, up_bias: Any) -> None:
    """``up_bias`` belongs to an ungated FFN: with a gate the kernels would add
    it to the gate's pre-activation and the CUDA path would drop it, neither
    of which is ``act(gate x) * (up x + b)``."""
    if gate is not None and up_bias is not None:
        shape = np.shape(_as_numpy(up_bias, "up_bias"))
        raise ArgumentError(
            "up_bias must be None for a gated FFN (it is the bias of an ungated FFN's up "
            f"projection); got up_bias of shape {shape} with a gate"
        )


def _fraction(name: str, v: Any) -> float:
    """``v`` as a float in [0, 1), or ArgumentError naming ``name`` (a string
    such as ``"0.5"`` included: it is no number)."""
    f = _real(name, v, "in [0, 1)")
    if not 0.0 <= f < 1.0:
        raise ArgumentError(f"{name} must be in [0, 1); got {_shown(v)}")
    return f


def _samples(samples: Any, d: int) -> np.ndarray:
    """Calibration samples as (n, d) with n >= 1 and finite values; leading
    dimensions (hidden states ``(batch, tokens, d)``) are flattened."""
    x = _as_numpy(samples, "samples")
    if x.dtype.kind != "f":
        raise DTypeError(f"samples must be a float array or tensor; got dtype {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != d or x.size == 0:
        raise ShapeError(f"samples must have shape (n, {d}) (or (..., {d})), n >= 1; got {x.shape}")
    x = x.reshape(-1, d)
    if not np.isfinite(x).all():
        raise _non_finite("samples", x)
    return x


def _threshold(name: str, v: Any) -> float:
    """A threshold on ``|activation|``: a finite number >= 0 (not a string)."""
    t = _real(name, v, "a finite value >= 0")
    if not (t >= 0 and np.isfinite(t)):
        raise ArgumentError(f"{name} must be a finite value >= 0; got {_shown(v)}")
    return t


#: What a pickled SparseFFN / InputSparseFFN carries besides its own entries.
_FFN_STATE = ("gate", "up", "down", "activation", "dtype", "up_bias", "down_bias", "sparsity",
              "stats")  # fmt: skip
_DTYPE_BITS = {"float32": None, "float16": None, "int8": 8, "int4": 4}


def _ffn_state(ffn: Any, stats: dict[str, int]) -> dict[str, Any]:
    """The state every FFN class pickles: its weights (float32, dequantized:
    they quantize back to the same codes and scales), settings and counters."""
    gate, up, down = ffn._ffn.to_matrices()
    return {
        "gate": gate,
        "up": up,
        "down": down,
        "activation": ffn.activation,
        "dtype": ffn.dtype,
        "up_bias": None if ffn._bias_up is None else ffn._bias_up.copy(),
        "down_bias": None if ffn._bias_down is None else ffn._bias_down.copy(),
        "sparsity": float(ffn.sparsity),
        "stats": stats,
    }


def _ffn_args(state: Any, extra: tuple[str, ...], counters: tuple[str, ...], where: str) -> dict:
    """Checks a pickled FFN state (``_ffn_state`` plus ``extra`` entries) and
    returns the constructor's weight arguments; FormatError on anything off."""
    want = {*_FFN_STATE, *extra}
    if not isinstance(state, dict) or set(state) != want:
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise FormatError(f"{where}: must be a dict of keys {sorted(want)}; got {found}")
    for name, ndim in (("gate", 2), ("up", 2), ("down", 2), ("up_bias", 1), ("down_bias", 1)):
        a = state[name]
        if a is None and name not in ("up", "down"):
            continue
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == ndim):
            found = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise FormatError(f"{where}: {name} must be a {ndim}-D float32 array; got {found}")
    dtype, sparsity, stats = state["dtype"], state["sparsity"], state["stats"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise FormatError(f"{where}: dtype must be one of {list(_DTYPE_BITS)}; got {dtype!r}")
    if not isinstance(sparsity, float) or not 0.0 <= sparsity < 1.0:
        raise FormatError(f"{where}: sparsity must be a float in [0, 1); got {_shown(sparsity)}")
    if not (
        isinstance(stats, dict)
        and set(stats) == set(counters)
        and all(type(v) is int and 0 <= v < 2**64 for v in stats.values())
    ):
        raise FormatError(
            f"{where}: stats must map {list(counters)} to integers >= 0; got {stats!r:.200}"
        )
    bits = _DTYPE_BITS[dtype]
    return {
        "gate": state["gate"],
        "up": state["up"],
        "down": state["down"],
        "activation": state["activation"],
        "bits": bits,
        "dtype": "float32" if bits else dtype,
        "up_bias": state["up_bias"],
        "down_bias": state["down_bias"],
    }


def _decay(v: Any) -> float:
    """``decay`` in (0, 1] and still above 0 as the core's float32 (1e-50 is not)."""
    d = _real("decay", v, "a number in (0, 1]")
    if not 0.0 < d <= 1.0:
        raise ArgumentError(f"decay must be a number in (0, 1]; got {_shown(v)}")
    if np.float32(d) == 0:
        raise ArgumentError(
            f"decay must be a number in (0, 1] that float32 holds; got {_shown(v)} (0 as float32)"
        )
    return d


def _hysteresis(v: Any) -> float:
    """``hysteresis`` finite, >= 0 and within float32 (1e300 would reach the core as inf)."""
    h = _real("hysteresis", v, "a finite number >= 0")
    if not 0.0 <= h <= _F32_MAX:
        raise ArgumentError(f"hysteresis must be a finite number >= 0 (float32); got {_shown(v)}")
    return h


class NeuronCache:
    """Tracks which neurons of a layer fire and keeps a bounded hot set.

    Args:
        num_neurons: Neurons in the layer (e.g. 1536 for SmolLM2-135M's FFN).
        capacity: Most hot neurons (int). Default: 20% of ``num_neurons``.
        capacity_bytes: Alternatively a byte budget; needs ``bytes_per_neuron``.
        bytes_per_neuron: Bytes one neuron's weights take (for the byte figures).
        policy: ``"frequency"`` (most often active; ``decay`` in (0, 1] weighs a
            token ``t`` tokens old by ``decay**t``), ``"window"`` (active in the
            last ``window`` tokens, most recent first) or ``"static"`` (chosen
            once, at the first :meth:`reclassify` or by :meth:`set_hot`, then kept).
        decay: Per-token decay of the ``frequency`` policy (None: plain counts).
        window: Tokens of the ``window`` policy.
        hysteresis: A hot neuron's score counts ``1 + hysteresis`` times (for
            ``window``: ``hysteresis * window`` extra tokens), so neurons near
            the boundary don't flip on every reclassify.
        reclassify_every: Re-choose the hot set automatically every this many
            recorded tokens (0: only when :meth:`reclassify` is called). A batch
            is split at these points, so results do not depend on batching.

    Raises:
        ArgumentError: capacity above ``num_neurons``, unknown policy, decay
            outside (0, 1], a window of 0, negative hysteresis; ``window``
            missing for policy ``"window"``, ``decay`` given with a policy other
            than ``"frequency"``, or ``window`` with one other than ``"window"``.

    Pickles and deep-copies as what :meth:`save` writes (settings, counts, scores,
    recent tokens, hot set, counters), validated as :meth:`load` validates a file.
    """

    def __init__(
        self,
        num_neurons: int,
        capacity: int | None = None,
        *,
        capacity_bytes: int | None = None,
        bytes_per_neuron: int = 0,
        policy: str = "frequency",
        decay: float | None = None,
        window: int | None = None,
        hysteresis: float = 0.0,
        reclassify_every: int = 0,
    ) -> None:
        n = _int("num_neurons", num_neurons, 1)
        bpn = _int("bytes_per_neuron", bytes_per_neuron)
        if capacity is not None and capacity_bytes is not None:
            raise ArgumentError("give capacity or capacity_bytes, not both")
        if capacity_bytes is not None:
            if bpn == 0:
                raise ArgumentError("capacity_bytes needs bytes_per_neuron > 0; got 0")
            cap = _int("capacity_bytes", capacity_bytes) // bpn
        elif capacity is None:
            cap = n // 5
        else:
            cap = _int("capacity", capacity)
        if cap > n:
            raise ArgumentError(f"capacity must be at most num_neurons = {n}; got {cap}")
        if not isinstance(policy, str) or policy not in _POLICIES:
            raise ArgumentError(f"policy must be one of {_POLICIES}; got {policy!r}")
        self._args: dict[str, Any] = {
            "num_neurons": n,
            "capacity": cap,
            "bytes_per_neuron": bpn,
            "policy": policy,
            "decay": None if decay is None else _decay(decay),
            "window": None if window is None else _int("window", window, 1),
            "hysteresis": _hysteresis(hysteresis),
            "reclassify_every": _int("reclassify_every", reclassify_every),
        }
        a = self._args
        self._c = _native._NeuronCache(
            n, cap, bpn, policy, a["decay"], a["window"], a["hysteresis"], a["reclassify_every"]
        )

    @property
    def num_neurons(self) -> int:
        """Neurons in the layer."""
        return self._args["num_neurons"]

    @property
    def capacity(self) -> int:
        """Most hot neurons."""
        return self._args["capacity"]

    @property
    def policy(self) -> str:
        """The policy name."""
        return self._args["policy"]

    def record(self, active: Any) -> None:
        """Records activity.

        Args:
            active: One token's active neuron ids (list or integer array, shape
                (k,); a repeated id counts once, as in a mask: a neuron fires in
                a token or not); one token's boolean mask (bool, shape (num_neurons,)); or
                a batch of tokens (bool, shape (n, num_neurons)), recorded in one
                parallel pass. numpy arrays or torch tensors.

        Raises:
            IndexError: an id outside ``[0, num_neurons)`` (nothing is recorded).
            ShapeError: a mask whose width is not ``num_neurons``.
            DTypeError: floats or other non-integer, non-bool input.
        """
        a = _as_numpy(active, "active", "ids (k,) or a mask (num_neurons,) or (n, num_neurons)")
        if a.dtype == np.bool_:
            if a.ndim not in (1, 2) or a.shape[-1] != self.num_neurons:
                raise ShapeError(
                    f"active mask must have shape ({self.num_neurons},) or "
                    f"(n, {self.num_neurons}); got {a.shape}"
                )
            m = np.ascontiguousarray(a.reshape(-1, self.num_neurons)).view(np.uint8)
            self._c.record_batch(m)
            return
        if a.size == 0:
            a = a.astype(np.int64)
        if a.dtype.kind not in "iu":
            raise DTypeError(
                f"active must be neuron ids (integers) or a bool mask; got dtype {a.dtype}"
            )
        if a.ndim != 1:
            raise ShapeError(f"active ids must have shape (k,); got {a.shape}")
        if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
            raise IndexError(
                f"active index {int(a.max())} is out of range for length {self.num_neurons}"
            )
        self._c.record_indices(np.ascontiguousarray(a, dtype=np.int64))

    record_activations = record  # the seed's name

    def reclassify(self) -> None:
        """Re-chooses the hot set by the policy, in O(num_neurons)."""
        self._c.reclassify()

    def set_hot(self, ids: Any) -> None:
        """Makes ``ids`` the hot set (e.g. a calibrated static set).

        Raises:
            IndexError: an id out of range. ArgumentError: repeated ids or more than capacity.
            DTypeError: ids that are not integers.
        """
        a = np.asarray(_as_numpy(ids, "ids", "integer neuron ids of shape (k,)"))
        if a.size and a.dtype.kind not in "iu":
            raise DTypeError(f"ids must be integers; got dtype {a.dtype}")
        if a.ndim > 1:  # (a scalar is one id; a matrix is no list of ids)
            raise ShapeError(f"ids must have shape (k,); got {a.shape}")
        if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
            # (the int64 conversion below would wrap it to a negative id)
            raise IndexError(
                f"hot index {int(a.max())} is out of range for length {self.num_neurons}"
            )
        self._c.set_hot(np.ascontiguousarray(a.reshape(-1), dtype=np.int64))

    def hot_neurons(self) -> npt.NDArray[np.uint32]:
        """Hot neuron ids, ascending (uint32, shape (num_hot,))."""
        return self._c.hot_neurons()

    def cold_neurons(self) -> npt.NDArray[np.uint32]:
        """Cold neuron ids, ascending (uint32, shape (num_cold,))."""
        return self._c.cold_neurons()

    def activation_frequency(self, neuron: int | None = None) -> Any:
        """Fraction of recorded tokens in which ``neuron`` fired (float); with no
        argument, every neuron's (float64, shape (num_neurons,))."""
        if neuron is None:
            tokens = self._c.stats()["total_activations"]
            return self._c.counts() / max(tokens, 1)
        if isinstance(neuron, bool) or not isinstance(neuron, (int, np.integer)):
            raise ArgumentError(f"neuron must be an integer neuron id; got {_shown(neuron)}")
        if not 0 <= int(neuron) < self.num_neurons:
            # (checked here too: the native call takes an int64)
            raise IndexError(f"neuron index {neuron} is out of range for length {self.num_neurons}")
        return self._c.activation_frequency(int(neuron))

    def stats(self) -> dict[str, Any]:
        """``num_hot``, ``num_cold``, ``total_activations`` (tokens recorded),
        ``events`` (activations), ``hits``/``misses`` (activations recorded while
        a hot set existed, served by it or not), ``hot_ratio``, ``hit_rate``,
        ``bytes_fetched`` (misses x bytes_per_neuron), ``hot_bytes``."""
        return dict(self._c.stats())

    def reset_stats(self) -> None:
        """Zeroes hits and misses; keeps the activity and the hot set."""
        self._c.reset_stats()

    def clear(self) -> None:
        """Forgets everything recorded, and the hot set."""
        self._c.clear()

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The tensors and metadata :meth:`save` writes (read under the cache's lock)."""
        counts, scores, last, hot, counters, classified = self._c.state()
        meta = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "config": json.dumps(self._args),
            "counters": json.dumps([int(c) for c in counters]),
            "classified": json.dumps(bool(classified)),
        }
        return {"counts": counts, "scores": scores, "last": last, "hot": hot}, meta

    def save(self, path: str | os.PathLike) -> None:
        """Writes the cache (settings, counts, hot set) as safetensors + JSON metadata."""
        _safetensors.save(path, *self._state())

    def __getstate__(self) -> dict[str, Any]:
        tensors, meta = self._state()
        return {"tensors": tensors, "metadata": meta}

    def __setstate__(self, state: Any) -> None:
        where = "NeuronCache state"
        keys = ["metadata", "tensors"]
        if not isinstance(state, dict) or set(state) != set(keys):
            found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise FormatError(f"{where}: must be a dict of keys {keys}; got {found}")
        for k in keys:
            if not isinstance(state[k], dict):
                raise FormatError(f"{where}: {k} must be a dict; got {type(state[k]).__name__}")
        self._restore(state["tensors"], state["metadata"], where)

    @classmethod
    def load(cls, path: str | os.PathLike) -> NeuronCache:
        """Reads a cache written by :meth:`save`.

        Raises:
            OSError: the file cannot be read (``FileNotFoundError``...), as from ``open``.
            FormatError: not such a file, an unknown version, or any field
                missing, malformed or inconsistent.
        """
        tensors, meta = _safetensors.load(path)
        obj = cls.__new__(cls)
        obj._restore(tensors, meta, path)
        return obj

    def _restore(self, tensors: dict[str, Any], meta: dict[str, Any], path: Any) -> None:
        """Builds this cache from a file's (or a pickle's) tensors and metadata,
        checking every field; FormatError (naming ``path``) on anything wrong.

        The tensors' names, dtypes and the length of ``counts`` are checked
        against the config before the cache is built: its size comes from the
        metadata, and a tampered ``num_neurons`` must not allocate that much."""
        if meta.get("format") != FORMAT:
            raise FormatError(f"{path}: not a neuron cache file (format {meta.get('format')!r})")
        _check_format_version(path, meta.get("format_version"), FORMAT_VERSION)
        try:
            args = json.loads(meta["config"])
            counters = json.loads(meta["counters"])
            classified = json.loads(meta["classified"])
            keys = {"num_neurons", "capacity", "bytes_per_neuron", "policy", "decay", "window",
                    "hysteresis", "reclassify_every"}  # fmt: skip
            if not isinstance(args, dict) or set(args) != keys:
                raise ValueError(f"config keys must be {sorted(keys)}")
            if type(args["capacity"]) is not int:  # (None is the constructor's default: 20%)
                raise ValueError(f"config capacity must be an integer; got {args['capacity']!r}")
            if not isinstance(counters, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**64 for c in counters
            ):
                raise ValueError("counters must be non-negative integers")
            if not isinstance(classified, bool):
                raise ValueError("classified must be a bool")
        except (KeyError, ValueError, TypeError, RecursionError) as e:
            raise FormatError(f"{path}: invalid metadata ({e})") from e
        want = {"counts": np.uint64, "scores": np.float32, "last": np.uint64, "hot": np.uint32}
        if set(tensors) != set(want):
            unexpected = sorted(set(map(str, tensors)) - set(want))
            raise FormatError(
                f"{path}: tensors must be {sorted(want)}; got {sorted(map(str, tensors))}"
                + (f" (unexpected {', '.join(map(repr, unexpected))})" if unexpected else "")
            )
        for name, dt in want.items():
            t = tensors[name]
            if not isinstance(t, np.ndarray) or t.dtype != dt or t.ndim != 1:
                found = (
                    f"{t.dtype} of shape {t.shape}"
                    if isinstance(t, np.ndarray)
                    else type(t).__name__
                )
                raise FormatError(
                    f"{path}: tensor {name!r} must be a 1-D {np.dtype(dt)}; got {found}"
                )
        n = args["num_neurons"]
        if type(n) is int and len(tensors["counts"]) != n:
            # (before __init__, which allocates num_neurons-sized state)
            raise FormatError(
                f"{path}: tensor 'counts' must hold num_neurons = {n} values; "
                f"got {len(tensors['counts'])}"
            )
        try:
            self.__init__(**args)  # type: ignore[misc]
        except (ValueError, TypeError, ArgumentError) as e:
            raise FormatError(f"{path}: invalid metadata ({e})") from e
        n, policy, decay = self.num_neurons, self.policy, self._args["decay"]
        lengths = {  # (the core keeps scores for a decayed frequency, last for a window)
            "scores": (n if decay is not None else 0, f"policy {policy!r}, decay {decay!r}"),
            "last": (n if policy == "window" else 0, f"policy {policy!r}"),
        }
        for name, (length, why) in lengths.items():
            if len(tensors[name]) != length:
                raise FormatError(
                    f"{path}: tensor {name!r} must hold {length} values ({why}); "
                    f"got {len(tensors[name])}"
                )
        t = {k: np.ascontiguousarray(tensors[k]) for k in want}
        try:
            self._c.load_state(t["counts"], t["scores"], t["last"], t["hot"], counters, classified)
        except FormatError as e:  # the core's own checks (values, counters, hot set)
            raise FormatError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"NeuronCache({self.num_neurons} neurons, policy={self.policy!r}, "
            f"hot {s['num_hot']}/{self.capacity}, hit rate {s['hit_rate']:.3f})"
        )


class SparseFFN:
    """A feed-forward block that computes only its active neurons.

    Gated (Llama/SmolLM2 SwiGLU): ``y = down @ (act(gate @ x) * (up @ x))``;
    ungated (BERT): ``y = down @ act(up @ x + up_bias) + down_bias``. A neuron is
    active where ``|act(pre)| > threshold`` (per input row), ``pre`` being the
    gate (gated) or up (ungated) pre-activation; inactive neurons contribute
    exactly zero.

    Args:
        gate: (h, d) float array or tensor (torch ``nn.Linear.weight`` layout), or
            None for an ungated FFN.
        up: (h, d) float.
        down: (d, h) float.
        activation: ``"silu"``, ``"gelu"`` (exact erf form) or ``"relu"``.
        bits: None (store ``dtype``), 8 or 4: row-quantized weights (symmetric,
            one f32 scale per gate/up row and per down column; codes in
            [-127, 127] or [-7, 7], 4-bit packed two per byte, needs an even d).
        hot_capacity: Neurons kept in the dense hot tier after :meth:`calibrate`
            (the most frequently active on the calibration samples), and the most
            :meth:`set_hot` takes. None: no tier from :meth:`calibrate`, no bound.
        dtype: ``"float32"`` or ``"float16"`` weight storage.
        up_bias: (h,) float, ungated FFNs only (BERT's intermediate bias).
        down_bias: (d,) float.
        threshold: A known threshold (else :meth:`calibrate` sets one; none: dense).
        top_k: Keep the ``top_k`` neurons of largest ``|act(pre)|`` per row instead.

    Float inputs other than float32 are converted once; the weights are copied
    into the bundled layout (the originals are not kept).

    Pickles and deep-copies as plain data: the stored weights as float32 (8- and
    4-bit ones dequantized, which quantize back to the same codes and scales),
    biases, activation, threshold / top-k / sparsity, hot tier, calibration cache
    and counters; the copy is rebuilt through this constructor's checks.

    Threads may share one object: calls run side by side (the kernels only
    read the weights, the counters are atomic). A :meth:`set_threshold`,
    :meth:`calibrate`, :meth:`set_hot` or assignment to ``threshold`` /
    ``top_k`` from another thread gives each call the mode before it or
    after it, never a mix of the two.
    """

    def __init__(
        self,
        gate: Any,
        up: Any,
        down: Any,
        activation: str = "silu",
        bits: int | None = None,
        hot_capacity: int | None = None,
        *,
        dtype: str = "float32",
        up_bias: Any = None,
        down_bias: Any = None,
        threshold: float | None = None,
        top_k: int | None = None,
    ) -> None:
        dtype = _weight_dtype(bits, dtype)
        _check_up_bias(gate, up_bias)
        # (Any: a None up or down goes to the core too, whose DTypeError names it)
        conv: list[Any] = [
            None if a is None else _as_numpy(a, name)
            for a, name in zip((gate, up, down, up_bias, down_bias), _WEIGHT_NAMES, strict=True)
        ]
        self._ffn = _native._SparseFfn(
            conv[0], conv[1], conv[2], _activation(activation), dtype, conv[3], conv[4]
        )
        # (copies, taken after the core checked them: a string bias is a
        # DTypeError there, not float()'s ValueError here; the core keeps its
        # own, and a later change to the caller's array must not reach the
        # torch path either)
        self._bias_up = None if conv[3] is None else np.array(conv[3], np.float32)
        self._bias_down = None if conv[4] is None else np.array(conv[4], np.float32)
        #: Counters of the object this one was copied from, added to :meth:`stats`.
        self._stats_base = dict.fromkeys(_FFN_COUNTERS, 0)
        self.activation = activation
        h = self._ffn.num_neurons
        if hot_capacity is not None and _int("hot_capacity", hot_capacity) > h:
            raise ArgumentError(f"hot_capacity must be at most the {h} neurons; got {hot_capacity}")
        self.hot_capacity = hot_capacity
        self.cache: NeuronCache | None = None
        self.sparsity = 0.0
        # (threshold, top_k), replaced as one tuple: a call from another thread
        # reads the mode once, never a half-made change (see calibrate).
        self._mode: tuple[float | None, int | None] = (None, None)
        if threshold is not None:
            self.set_threshold(threshold)
        if top_k is not None:
            k = _int("top_k", top_k, 1)
            if k > h:
                raise ArgumentError(f"top_k must be in [1, {h}]; got {k}")
            self.top_k = k

    @property
    def num_neurons(self) -> int:
        """Hidden size h."""
        return self._ffn.num_neurons

    @property
    def dim(self) -> int:
        """Model size d."""
        return self._ffn.dim

    @property
    def gated(self) -> bool:
        """Whether there is a gate projection."""
        return self._ffn.gated

    @property
    def dtype(self) -> str:
        """Weight storage type: ``float32``, ``float16``, ``int8`` or ``int4``."""
        return self._ffn.dtype

    @property
    def bytes_per_neuron(self) -> int:
        """Bytes of one neuron's bundle (gate row, up row, down column)."""
        return self._ffn.bytes_per_neuron

    @property
    def threshold(self) -> float | None:
        """Keep neurons with ``|act(pre)|`` above it (None: dense, unless ``top_k``)."""
        return self._mode[0]

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        # Checked as set_threshold checks it: a NaN would otherwise be stored and
        # fail (or mask every neuron) only at the next call.
        self._mode = (None if value is None else _threshold("threshold", value), self._mode[1])

    @property
    def top_k(self) -> int | None:
        """Keep the ``top_k`` neurons of largest ``|act(pre)|`` per row (takes
        precedence over ``threshold``); None: the threshold decides."""
        return self._mode[1]

    @top_k.setter
    def top_k(self, value: int | None) -> None:
        # An integer in [1, h]: int(2.7) would silently keep 2, and a negative
        # or huge k reached the core clamped (its message then showed 0 or 2**64-1).
        if value is not None:
            h = self.num_neurons
            value = _int("top_k", value, 1)
            if value > h:
                raise ArgumentError(f"top_k must be in [1, {h}]; got {value}")
        self._mode = (self._mode[0], value)

    def set_threshold(self, threshold: float) -> None:
        """Keeps neurons with ``|act(pre)| > threshold`` from now on (and
        clears ``top_k``, in one step: a call running in another thread uses
        the old mode or the new one)."""
        self._mode = (_threshold("threshold", threshold), None)

    def activations(self, x: Any) -> npt.NDArray[np.float32]:
        """``act(pre)`` of every neuron: x (d,) or (n, d) -> (h,) or (n, h) float32
        (n may be 0)."""
        a, single = self._rows(x)
        out = self._ffn.activations(a)
        return out[0] if single else out

    def calibrate(self, samples: Any, sparsity: float) -> float:
        """Chooses the threshold that makes ``sparsity`` of the samples' neuron
        activations inactive (CATS-style), and fills the hot tier.

        Args:
            samples: (n, d) float inputs of this FFN (e.g. hidden states of real
                text; ``(..., d)`` is flattened to rows).
            sparsity: Target fraction of inactive (row, neuron) pairs, in [0, 1).

        Returns:
            The threshold (0.0 for sparsity 0, which computes every neuron).

        Raises:
            ArgumentError: sparsity outside [0, 1), samples not finite.
            ShapeError: samples empty or not of width d. DTypeError: not floats.
        """
        s = _fraction("sparsity", sparsity)
        acts = np.abs(self.activations(_samples(samples, self.dim)))
        t = float(np.quantile(acts, s)) if s > 0.0 else 0.0
        # One step (see _mode): calls in other threads use the old mode or this one.
        self._mode = (t if s > 0.0 else None, None)
        self.sparsity = s
        if self.hot_capacity:
            # Filled before it is published (another thread's calibrate makes its own).
            cache = NeuronCache(
                self.num_neurons, self.hot_capacity, bytes_per_neuron=self.bytes_per_neuron
            )
            cache.record(acts > t if s > 0 else np.ones_like(acts, dtype=bool))
            cache.reclassify()
            self.cache = cache
            self._ffn.set_hot(cache.hot_neurons())
        return t

    def set_hot(self, ids: Any) -> None:
        """Copies neurons ``ids`` into the hot tier (replacing it).

        Raises:
            IndexError: an id out of range. ArgumentError: ids not non-negative
                integers, or more than ``hot_capacity`` of them (when set).
        """
        a = np.asarray(_as_numpy(ids, "ids", "integer neuron ids of shape (k,)"))
        if a.ndim > 1:  # (a scalar is one id; a matrix is no list of ids)
            raise ShapeError(f"ids must have shape (k,); got {a.shape}")
        a = a.reshape(-1)
        cap = self.hot_capacity
        if cap is not None and a.size > cap:
            raise ArgumentError(f"ids must be at most hot_capacity = {cap} neurons; got {a.size}")
        if a.size and a.dtype.kind not in "iu":
            raise ArgumentError(f"ids must be non-negative integer neuron ids; got dtype {a.dtype}")
        if a.size and a.min() < 0:
            raise ArgumentError(
                f"ids must be non-negative integer neuron ids; got {_shown(a.min())}"
            )
        if a.size and a.max() >= self.num_neurons:
            raise IndexError(
                f"hot index {int(a.max())} is out of range for length {self.num_neurons}"
            )
        self._ffn.set_hot(np.ascontiguousarray(a, dtype=np.uint32))

    def hot_neurons(self) -> npt.NDArray[np.uint32]:
        """Neurons of the hot tier, ascending."""
        return self._ffn.hot_neurons()

    def stats(self) -> dict[str, Any]:
        """Counters since creation or :meth:`reset_stats`: ``calls``, ``rows``,
        ``active_pairs``, ``hot_fetches``/``cold_fetches`` (neurons read from the
        hot tier / the backing store), ``cold_bytes``, and ``density``
        (active_pairs / (rows x h))."""
        s: dict[str, float] = dict(self._ffn.stats())
        for k, v in self._stats_base.items():
            s[k] += v
        s["density"] = s["active_pairs"] / max(s["rows"] * self.num_neurons, 1)
        return s

    def reset_stats(self) -> None:
        """Zeroes the counters."""
        self._stats_base = dict.fromkeys(_FFN_COUNTERS, 0)
        self._ffn.reset_stats()

    def weights(self) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The stored weights in torch layout as float32 (dequantized): (gate or None, up, down)."""
        return self._ffn.to_matrices()

    def __getstate__(self) -> dict[str, Any]:
        stats = self.stats()
        threshold, top_k = self._mode
        return {
            **_ffn_state(self, {k: stats[k] for k in _FFN_COUNTERS}),
            "hot_capacity": self.hot_capacity,
            "threshold": threshold,
            "top_k": top_k,
            "hot": self.hot_neurons(),
            "cache": self.cache,
        }

    def __setstate__(self, state: Any) -> None:
        where = "SparseFFN state"
        extra = ("hot_capacity", "threshold", "top_k", "hot", "cache")
        args = _ffn_args(state, extra, _FFN_COUNTERS, where)
        hot, cache = state["hot"], state["cache"]
        if not (isinstance(hot, np.ndarray) and hot.dtype == np.uint32 and hot.ndim == 1):
            found = (
                f"{hot.dtype} {hot.shape}" if isinstance(hot, np.ndarray) else type(hot).__name__
            )
            raise FormatError(f"{where}: hot must be a 1-D uint32 array; got {found}")
        if cache is not None and not isinstance(cache, NeuronCache):
            found = type(cache).__name__
            raise FormatError(f"{where}: cache must be a NeuronCache or None; got {found}")
        try:
            self.__init__(  # type: ignore[misc]
                **args,
                hot_capacity=state["hot_capacity"],
                threshold=state["threshold"],
                top_k=state["top_k"],
            )
            h, cap = self.num_neurons, self.hot_capacity
            if cache is not None and cache.num_neurons != h:
                raise ArgumentError(
                    f"cache must have num_neurons {h} (the hidden size); got {cache.num_neurons}"
                )
            if cap is not None and len(hot) > cap:
                raise ArgumentError(
                    f"hot must hold at most hot_capacity = {cap} neurons; got {len(hot)}"
                )
            self.set_hot(hot)
        except (ArgumentError, ShapeError, DTypeError, IndexError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: {e}") from None
        self.sparsity = state["sparsity"]
        self.cache = cache
        self._stats_base = dict(state["stats"])

    def _rows(self, x: Any) -> tuple[Any, bool]:
        a = _as_numpy(x, "x")
        if a.ndim == 1:
            if a.shape[0] != self.dim:
                raise ShapeError(
                    f"x must have shape ({self.dim},) or (n, {self.dim}); got {a.shape}"
                )
            return a.reshape(1, -1), True
        return a, False

    def __call__(self, x: Any, *, dense: bool = False) -> Any:
        """The FFN output.

        Args:
            x: (d,) or (n, d) float (numpy or torch tensor); small n is the
                intended case (rows share one pass over the weights); n = 0 (an
                empty batch) gives a (0, d) result and leaves :meth:`stats`. A CUDA
                tensor, or one that requires grad (in grad mode), is computed
                with torch ops on its device (same masking; the stored weights
                are copied there once), so gradients reach ``x``; computed in
                ``x``'s dtype, returned as float32 on the CPU and in ``x``'s
                dtype on a GPU.
            dense: Compute every neuron (the dense FFN through the same kernel).

        Returns:
            (d,) or (n, d), numpy or torch like ``x`` (on its device); float32
            but on a GPU (``x``'s dtype).
        """
        is_torch = type(x).__module__.startswith("torch")
        if is_torch and _torch_path(x):
            _check_torch_x(x, self.dim)
            return self._torch_forward(x, dense, self._mode)
        a, single = self._rows(x)
        threshold, top_k = self._mode  # (one read: see set_threshold)
        if dense or (threshold is None and top_k is None):
            y = self._ffn.forward(a, "dense", 0.0)
        elif top_k is not None:
            y = self._ffn.forward(a, "topk", float(top_k))
        else:
            assert threshold is not None  # (both None went dense)
            y = self._ffn.forward(a, "threshold", float(threshold))
        out = y[0] if single else y
        if is_torch:
            import torch

            return torch.from_numpy(out)
        return out

    def _torch_forward(
        self, x: Any, dense: bool, mode: tuple[float | None, int | None] | None = None
    ) -> Any:
        """The same masked FFN with torch ops on ``x``'s device (CUDA), from the
        stored (dequantized) weights, copied to that device once; ``mode`` is
        the ``(threshold, top_k)`` the caller read (default: the current one)."""
        import torch
        import torch.nn.functional as F

        threshold, top_k = self._mode if mode is None else mode

        key = (str(x.device), x.dtype)
        # (key, weights) as one tuple: a thread calling with another device or
        # dtype replaces it whole, never under a call reading it.
        dev = self.__dict__.get("_dev")
        if dev is None or dev[0] != key:
            ws = self.weights()
            dev = self._dev = (
                key,
                [None if w is None else torch.from_numpy(w).to(x.device, x.dtype) for w in ws],
            )
        gate, up, down = dev[1]
        assert up is not None and down is not None  # (weights() gives both)
        fns: dict[str, Callable[[torch.Tensor], torch.Tensor]]
        fns = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
        acts = fns[self.activation]
        if self._bias_up is not None or self._bias_down is not None:
            ub, db = (
                None if b is None else torch.from_numpy(b).to(x.device, x.dtype)
                for b in (self._bias_up, self._bias_down)
            )
        else:
            ub = db = None
        a = acts(F.linear(x, gate) if gate is not None else F.linear(x, up, ub))
        if not dense and top_k is not None:
            kth = a.abs().topk(top_k, dim=-1).values[..., -1:]
            a = torch.where(a.abs() >= kth, a, torch.zeros_like(a))
        elif not dense and threshold is not None:
            a = torch.where(a.abs() > threshold, a, torch.zeros_like(a))
        if gate is not None:
            a = a * F.linear(x, up)
        y = F.linear(a, down, db)
        # On the CPU, float32 as the kernel path returns, so grad mode does not
        # change the dtype (the graph to x goes through the cast); on a GPU the
        # torch ops are the only path and keep x's dtype (float16 stays float16).
        return y.float() if y.device.type == "cpu" else y

    def __repr__(self) -> str:
        threshold, top_k = self._mode
        mode = (
            f"top_k={top_k}" if top_k else
            f"threshold={threshold:.4g}" if threshold is not None else "dense"
        )  # fmt: skip
        return (
            f"SparseFFN(h={self.num_neurons}, d={self.dim}, {self.activation}, {self.dtype}, "
            f"{mode}, hot tier {len(self.hot_neurons())})"
        )


from ._input_sparse import InputSparseFFN  # noqa: E402  (uses _as_numpy above)

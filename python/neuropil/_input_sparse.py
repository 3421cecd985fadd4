"""``InputSparseFFN``: an FFN whose projections skip their small inputs (TEAL).

Re-exported by :mod:`neuropil.neurons`; see :class:`InputSparseFFN`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _native
from .errors import ArgumentError, DTypeError, FormatError, ShapeError, _real, _shown

__all__ = ["InputSparseFFN"]

_NDARRAY = np.ndarray
_COUNTERS = ("calls", "rows", "kept_inputs", "kept_hidden")
# Native-order float32 (other byte orders take the converting path).
_F32 = np.dtype(np.float32)


def _threshold(name: str, v: Any) -> float | None:
    if v is None:
        return None
    t = _real(name, v, "a finite value >= 0 or None")
    if not (t >= 0 and np.isfinite(t)):
        raise ArgumentError(f"{name} must be a finite value >= 0 or None; got {_shown(v)}")
    return t


def _pair(thresholds: Any) -> tuple[Any, Any]:
    """``thresholds`` as its two items: a tuple or list, or a 1-D numpy array
    or torch tensor of length 2 (each item is checked by :func:`_threshold`)."""
    if isinstance(thresholds, (tuple, list)):
        if len(thresholds) == 2:
            return thresholds[0], thresholds[1]
        found = _shown(thresholds)
    elif isinstance(thresholds, np.ndarray) or type(thresholds).__module__.startswith("torch"):
        shape = tuple(getattr(thresholds, "shape", ()))
        if shape == (2,):
            return thresholds[0], thresholds[1]
        found = f"{type(thresholds).__name__} of shape {shape}"
    else:
        found = _shown(thresholds)
    raise ArgumentError(
        f"thresholds must be a pair (t_in, t_hidden) of numbers or None (a tuple, list, "
        f"or 1-D array or tensor of length 2); got {found}"
    )


def _check_shapes(conv: list[Any]) -> None:
    """``gate`` (h, d) and ``down`` (d, h) against ``up`` (h, d): the core gets
    flat buffers and checks only their lengths, so a transposed ``down`` (or a
    gate of another shape with as many values) would be read in the wrong
    layout: a wrong answer, not an error. (Ranks and dtypes are the core's.)"""
    gate, up, down = conv[:3]
    shape = getattr(up, "shape", None)
    if shape is None or len(shape) != 2:
        return  # the core's ShapeError names up
    h, d = shape
    for name, a, want in (("gate", gate, (h, d)), ("down", down, (d, h))):
        found = getattr(a, "shape", None)
        if a is not None and found is not None and len(found) == 2 and tuple(found) != want:
            raise ShapeError(f"{name} must have shape {want} to match up; got {tuple(found)}")


class InputSparseFFN:
    """A feed-forward block whose projections read only the weights of their
    large inputs (TEAL: Liu et al., "Training-Free Activation Sparsity in
    Large Language Models", ICLR 2025).

    Gated (Llama/SmolLM2 SwiGLU): ``y = down @ h`` with
    ``h = act(gate @ x') * (up @ x')``; ungated (BERT):
    ``h = act(up @ x' + up_bias)``. ``x'`` keeps the inputs with
    ``|x| > t_in`` (the others are 0, so their gate and up columns are never
    read), and the down projection keeps the hidden values with
    ``|h| > t_hidden`` (the others' down columns are never read). At sparsity
    ``s`` on both, a call reads ``1 - s`` of the weights; :class:`SparseFFN`
    (CATS: the mask on ``|act(gate x)|``) must read the whole gate first, so it
    reads ``1/3 + 2/3 (1 - s)`` of a SwiGLU block.

    Args:
        gate: (h, d) float array or tensor (``nn.Linear.weight`` layout), or
            None for an ungated FFN.
        up: (h, d) float.
        down: (d, h) float.
        activation: ``"silu"``, ``"gelu"`` (exact erf form) or ``"relu"``.
        bits: None (store ``dtype``), 8 or 4: quantized weights (symmetric,
            one f32 scale per input column slice of up to 512 neurons and per
            down column; 4-bit needs an even h and d).
        dtype: ``"float32"`` or ``"float16"`` weight storage.
        up_bias: (h,) float (ungated FFNs).
        down_bias: (d,) float.
        thresholds: ``(t_in, t_hidden)`` known thresholds, each a number or
            None (keep all), as a tuple, list or 1-D array/tensor of length 2
            (else :meth:`calibrate` sets them; None: dense).

    The weights are copied into the layout (input-major gate/up slices,
    neuron-major down columns); the originals are not kept.

    Pickles and deep-copies as plain data: the stored weights as float32 (8- and
    4-bit ones dequantized, which quantize back to the same codes and scales),
    biases, activation, thresholds, sparsity and counters; the copy is rebuilt
    through this constructor's checks.

    A call that reads fewer than about 512 K weights (10-20 us; e.g. a
    576x1536 FFN at 90% sparsity) keeps the GIL, as numpy does for small
    arrays: releasing and retaking it would cost ~3% of such a call. Longer
    calls release it, so other Python threads run meanwhile.

    Threads may share one object: calls run side by side (the weights are
    only read, the counters are atomic); :meth:`set_thresholds` or
    :meth:`calibrate` from another thread gives each call the old pair of
    thresholds or the new one, never one of each.

    Example:
        >>> import numpy as np
        >>> from neuropil.neurons import InputSparseFFN
        >>> rng = np.random.default_rng(0)
        >>> gate, up = rng.standard_normal((2, 1536, 576), dtype=np.float32) * 0.05
        >>> down = rng.standard_normal((576, 1536), dtype=np.float32) * 0.05
        >>> ffn = InputSparseFFN(gate, up, down, bits=4)
        >>> t_in, t_h = ffn.calibrate(rng.standard_normal((64, 576), dtype=np.float32), 0.5)
        >>> y = ffn(rng.standard_normal(576, dtype=np.float32))  # reads about half the weights
    """

    def __init__(
        self,
        gate: Any,
        up: Any,
        down: Any,
        activation: str = "silu",
        bits: int | None = None,
        *,
        dtype: str = "float32",
        up_bias: Any = None,
        down_bias: Any = None,
        thresholds: tuple[float | None, float | None] | None = None,
    ) -> None:
        from .neurons import _activation, _check_up_bias, _weight_dtype

        dtype = _weight_dtype(bits, dtype)
        _check_up_bias(gate, up_bias)
        # (Any: a None up or down goes to the core too, whose DTypeError names it)
        conv: list[Any] = [
            None if a is None else _as_numpy(a, name)
            for a, name in zip((gate, up, down, up_bias, down_bias), _WEIGHT_NAMES, strict=True)
        ]
        _check_shapes(conv)
        self._ffn = _native._InputSparseFfn(
            conv[0], conv[1], conv[2], _activation(activation), dtype, conv[3], conv[4]
        )
        # (copies, taken after the core checked them: a string bias is a
        # DTypeError there, not float()'s ValueError here; the core keeps its
        # own, and a later change to the caller's array must not reach the
        # torch path either)
        self._bias_up = None if conv[3] is None else np.array(conv[3], np.float32)
        self._bias_down = None if conv[4] is None else np.array(conv[4], np.float32)
        #: Counters of the object this one was copied from, added to :meth:`stats`.
        self._stats_base = dict.fromkeys(_COUNTERS, 0)
        # Bound once: the per-token call below skips the attribute chain.
        self._forward = self._ffn.forward
        self.activation = activation
        self.sparsity = 0.0
        # (t_in, t_hidden), replaced as one tuple: a call from another thread
        # reads the pair once, never one old and one new value.
        self._t: tuple[float | None, float | None] = (None, None)
        if thresholds is not None:
            self.set_thresholds(*_pair(thresholds))

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
    def memory_bytes(self) -> int:
        """Bytes of the stored weights and scales, as held: the padding of
        each tile of neurons to whole SIMD lanes included (a few bytes past
        ``weights x element size`` for small layers)."""
        return self._ffn.memory_bytes

    def set_thresholds(self, t_in: float | None, t_hidden: float | None) -> None:
        """Keeps inputs with ``|x| > t_in`` and hidden values with
        ``|h| > t_hidden`` from now on (None: keep all of them). Both change at
        once: a call running in another thread uses the old pair or the new one."""
        self._t = (_threshold("t_in", t_in), _threshold("t_hidden", t_hidden))

    @property
    def t_in(self) -> float | None:
        """Keep inputs with ``|x|`` above it (None: all)."""
        return self._t[0]

    @t_in.setter
    def t_in(self, value: float | None) -> None:
        self._t = (_threshold("t_in", value), self._t[1])

    @property
    def t_hidden(self) -> float | None:
        """Keep hidden values with ``|h|`` above it (None: all)."""
        return self._t[1]

    @t_hidden.setter
    def t_hidden(self, value: float | None) -> None:
        self._t = (self._t[0], _threshold("t_hidden", value))

    def _rows(self, x: Any) -> tuple[Any, bool]:
        a = _as_numpy(x, "x")
        if a.ndim == 1:
            return a.reshape(1, -1), True
        return a, False

    def hidden(self, x: Any, t_in: float | None = None) -> npt.NDArray[np.float32]:
        """The hidden values ``h`` before the hidden mask, inputs ``|x| <= t_in``
        dropped: x (d,) or (n, d) -> (h,) or (n, h) float32 (n may be 0)."""
        a, single = self._rows(x)
        out = self._ffn.hidden(a, _threshold("t_in", t_in))
        return out[0] if single else out

    def calibrate(
        self, samples: Any, sparsity: float, hidden_sparsity: float | None = None
    ) -> tuple[float, float]:
        """Chooses the thresholds that drop ``sparsity`` of the samples' input
        values and ``hidden_sparsity`` (default: the same) of their hidden
        values, measured with the inputs already masked (as TEAL calibrates).

        Args:
            samples: (n, d) float inputs of this FFN (hidden states of real text;
                ``(..., d)`` is flattened to rows).
            sparsity: Target fraction of dropped (row, input) pairs, in [0, 1).
            hidden_sparsity: Target fraction of dropped (row, neuron) pairs.

        Returns:
            ``(t_in, t_hidden)`` (0.0 for a sparsity of 0, which keeps everything).

        Raises:
            ArgumentError: a sparsity outside [0, 1), samples not finite.
            ShapeError: samples empty or not of width d. DTypeError: not floats.
        """
        from .neurons import _fraction, _samples

        s = _fraction("sparsity", sparsity)
        sh = s if hidden_sparsity is None else _fraction("hidden_sparsity", hidden_sparsity)
        x = _samples(samples, self.dim)
        t_in = float(np.quantile(np.abs(x), s)) if s > 0 else None
        t_h = float(np.quantile(np.abs(self.hidden(x, t_in)), sh)) if sh > 0 else None
        self.set_thresholds(t_in, t_h)
        self.sparsity = s
        return (t_in or 0.0, t_h or 0.0)

    def stats(self) -> dict[str, Any]:
        """Counters since creation or :meth:`reset_stats`: ``calls``, ``rows``,
        ``kept_inputs`` / ``kept_hidden`` ((row, input) and (row, neuron) pairs
        kept), and their densities ``input_density`` and ``hidden_density``."""
        s: dict[str, float] = dict(self._ffn.stats())
        for k, v in self._stats_base.items():
            s[k] += v
        s["input_density"] = s["kept_inputs"] / max(s["rows"] * self.dim, 1)
        s["hidden_density"] = s["kept_hidden"] / max(s["rows"] * self.num_neurons, 1)
        return s

    def reset_stats(self) -> None:
        """Zeroes the counters."""
        self._stats_base = dict.fromkeys(_COUNTERS, 0)
        self._ffn.reset_stats()

    def weights(self) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The stored weights in torch layout as float32 (dequantized): (gate or None, up, down)."""
        return self._ffn.to_matrices()

    def __getstate__(self) -> dict[str, Any]:
        from .neurons import _ffn_state

        stats = self.stats()
        state = _ffn_state(self, {k: stats[k] for k in _COUNTERS})
        t_in, t_hidden = self._t
        return {**state, "t_in": t_in, "t_hidden": t_hidden}

    def __setstate__(self, state: Any) -> None:
        from .neurons import _ffn_args

        where = "InputSparseFFN state"
        args = _ffn_args(state, ("t_in", "t_hidden"), _COUNTERS, where)
        try:
            self.__init__(**args, thresholds=(state["t_in"], state["t_hidden"]))  # type: ignore[misc]
        except (ArgumentError, ShapeError, DTypeError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: {e}") from None
        self.sparsity = state["sparsity"]
        self._stats_base = dict(state["stats"])

    def __call__(self, x: Any, *, dense: bool = False) -> Any:
        """The FFN output.

        Args:
            x: (d,) or (n, d) float (numpy or torch tensor); small n is the
                intended case; n = 0 (an empty batch) gives a (0, d) result and
                leaves :meth:`stats`. A CUDA tensor, or one that requires grad (in
                grad mode), is computed with torch ops on its device (same
                masking; the stored weights are copied there once), so
                gradients reach ``x``; computed in
                ``x``'s dtype, returned as float32 on the CPU and in ``x``'s
                dtype on a GPU.
            dense: Keep every input and hidden value (the dense FFN, same kernel).

        Returns:
            (d,) or (n, d), numpy or torch like ``x`` (on its device); float32
            but on a GPU (``x``'s dtype).
        """
        if type(x) is _NDARRAY and x.ndim == 1 and x.dtype is _F32:
            # The per-token call of a decoding model: nothing to convert, and
            # as few Python steps as possible (a call at 90% sparsity on
            # SmolLM2's FFN takes 7-10 us, and each 0.1 us is 1% of it).
            if dense:
                return self._forward(x, None, None)
            t = self._t  # (one read: see set_thresholds)
            return self._forward(x, t[0], t[1])
        t_in, t_h = (None, None) if dense else self._t
        is_torch = type(x).__module__.startswith("torch")
        if is_torch and _torch_path(x):
            _check_torch_x(x, self.dim)
            return self._torch_forward(x, t_in, t_h)
        a, single = self._rows(x)
        y = self._ffn.forward(a, t_in, t_h)
        out = y[0] if single else y
        if is_torch:
            import torch

            return torch.from_numpy(out)
        return out

    def _torch_forward(self, x: Any, t_in: float | None, t_h: float | None) -> Any:
        """The same masked FFN with torch ops on ``x``'s device (CUDA)."""
        import torch
        import torch.nn.functional as F

        key = (str(x.device), x.dtype)
        # (key, weights, biases) as one tuple: a thread calling with another
        # device or dtype replaces it whole, never under a call reading it.
        dev = self.__dict__.get("_dev")
        if dev is None or dev[0] != key:
            dev = self._dev = (
                key,
                [
                    None if w is None else torch.from_numpy(w).to(x.device, x.dtype)
                    for w in self.weights()
                ],
                [
                    None if b is None else torch.from_numpy(b).to(x.device, x.dtype)
                    for b in (self._bias_up, self._bias_down)
                ],
            )
        gate, up, down = dev[1]
        assert up is not None and down is not None  # (weights() gives both)
        ub, db = dev[2]
        fns: dict[str, Callable[[torch.Tensor], torch.Tensor]]
        fns = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
        act = fns[self.activation]
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        if t_in is not None:
            x = torch.where(x.abs() > t_in, x, zero)
        h = (
            act(F.linear(x, gate)) * F.linear(x, up)
            if gate is not None
            else act(F.linear(x, up, ub))
        )
        if t_h is not None:
            h = torch.where(h.abs() > t_h, h, zero)
        y = F.linear(h, down, db)
        # On the CPU, float32 as the kernel path returns, so grad mode does not
        # change the dtype (the graph to x goes through the cast); on a GPU the
        # torch ops are the only path and keep x's dtype (float16 stays float16).
        return y.float() if y.device.type == "cpu" else y

    def __repr__(self) -> str:
        t = (
            "dense" if self.t_in is None and self.t_hidden is None
            else f"t_in={self.t_in}, t_hidden={self.t_hidden}"
        )  # fmt: skip
        return (
            f"InputSparseFFN(h={self.num_neurons}, d={self.dim}, {self.activation}, "
            f"{self.dtype}, {t})"
        )


# Bound once, here at the end: neurons imports this module at its own end (it
# re-exports InputSparseFFN), so whichever of the two is imported first, the
# other finds the names it needs already defined.
from .neurons import _WEIGHT_NAMES, _as_numpy, _check_torch_x, _torch_path  # noqa: E402

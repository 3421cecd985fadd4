"""``sparsify_mlp``: activation-sparse FFNs for ``transformers`` models.

Each Llama-style MLP (``gate_proj``/``up_proj``/``down_proj``, e.g. SmolLM2) and
each BERT-style FFN (``intermediate.dense`` + ``output.dense``, e.g. MiniLM) is
replaced by a :class:`SparseMLP` with per-layer thresholds calibrated on real
inputs, by one of two methods:

- ``"cats"`` (CATS): neurons with ``|act(pre)| <= threshold`` contribute zero;
  the pre-activation (gate) is still computed densely.
- ``"teal"`` (TEAL): inputs with ``|x| <= t_in`` are dropped from the gate and
  up projections, and hidden values with ``|h| <= t_hidden`` from down, so a
  sparsity ``s`` skips ``s`` of every projection's weights.

Execution paths (same masking, same result up to float rounding):

- CPU, float32, at most ``rust_max_rows`` tokens (decoding): neuropil's Rust
  :class:`~neuropil.neurons.SparseFFN` (CATS: reads only the active neurons'
  up rows and down columns) or :class:`~neuropil.neurons.InputSparseFFN`
  (TEAL: reads only the kept inputs' columns and kept neurons' down columns).
- Otherwise (long prompts, CUDA tensors, other dtypes): torch ops on the
  tensor's own device: the dense pre-activation, the mask, then up/down.
  On CUDA this keeps the accuracy semantics; it does not skip work.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._torch_quant import _device_of
from .errors import ArgumentError, FormatError, _real, _shown

__all__ = ["SparseMLP", "sparsify_mlp"]
_METHODS = ("cats", "teal")
#: The buffer holding what calibration chose: ``[method, threshold, t_in]``
#: (method 0 = cats, 1 = teal; NaN = no threshold), float32.
_CONFIG = "sparse_config"

_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
}
# Values kept per layer for the calibration quantile (a strided subsample beyond).
_CALIB_VALUES = 1 << 22


class SparseMLP(nn.Module):
    """An FFN computing only neurons with ``|act(pre)| > threshold``.

    Gated: ``down(act(gate x) * up x)``; ungated (``gate=None``):
    ``down(act(up x))``, biases included. The linear layers are the model's
    own (shared, not copied), registered under the names they had (``names``),
    so the state dict keeps the model's keys, plus one buffer of this module,
    ``sparse_config`` (float32 ``[method, threshold, t_in]``: method 0 for
    ``"cats"``, 1 for ``"teal"``; NaN for no threshold), which carries the
    calibration through ``state_dict`` / ``load_state_dict``, ``torch.save``,
    ``save_pretrained`` and :func:`~neuropil.torch.save_quantized`. Loading a
    state without it (the dense model's own checkpoint) keeps the current
    calibration, even with ``strict=True``; a malformed one is not copied and
    ``load_state_dict`` raises its ``RuntimeError`` naming it, as for a shape
    mismatch (the state's other tensors are loaded, as torch does).
    ``threshold``, ``t_in`` and ``method`` read and write that buffer; an
    in-place write to it is seen too (except one to an inference tensor a
    caller put there, which tracks no version; under ``torch.compile``, once
    read outside the compiled code, e.g. by ``.threshold``: a compiled call
    uses the values last read, and the setters and state loads read them).
    Casts (``.half()``) leave it float32. The Rust kernel's copy of the
    weights is built on the first CPU call that uses it, and built again when
    a weight changes: a state load, a move or cast (of this module or of a
    layer alone), a parameter replaced (``p.data = w``, ``lin.weight =
    nn.Parameter(w)``), or an in-place update of a parameter (``p.add_``,
    ``p.copy_``, an optimizer step; an in-place write through ``p.data``,
    ``p.data.copy_(w)``, is not seen: torch counts no version for it). It is
    not pickled (nor deep-copied): a copy builds its own. Threads may call
    one module at once (a server decoding several requests): they share the
    Rust copy, which a call only reads (its thresholds go with the call); a
    change of the calibration, the method or a weight from another thread
    gives each call the configuration before or after it, and every call
    that starts after a change uses the new weights.

    Args:
        gate: ``nn.Linear`` (h <- d) or None.
        up: ``nn.Linear`` (h <- d).
        down: ``nn.Linear`` (d <- h).
        activation: ``"silu"``, ``"gelu"`` or ``"relu"``.
        threshold: Keep neurons with ``|act(pre)|`` above it (``"cats"``) or
            hidden values with ``|h|`` above it (``"teal"``); None: dense.
        rust_max_rows: Largest token count sent to the Rust kernel.
        method: ``"cats"`` or ``"teal"`` (see the module doc).
        t_in: ``"teal"`` only: keep inputs with ``|x|`` above it; None: all.
        names: The child names of ``gate``, ``up`` and ``down`` (default
            ``"gate"``, ``"up"``, ``"down"``); a None name leaves that layer
            unregistered here (BERT: ``down`` stays in ``output.dense``).
    """

    def __init__(
        self,
        gate: nn.Module | None,
        up: nn.Module,
        down: nn.Module,
        activation: str,
        threshold: float | None = None,
        rust_max_rows: int = 8,
        method: str = "cats",
        t_in: float | None = None,
        names: tuple[str | None, str | None, str | None] = ("gate", "up", "down"),
    ) -> None:
        super().__init__()
        if activation not in _ACTS:
            raise ArgumentError(
                f"activation must be one of {sorted(_ACTS)}; got {_shown(activation)}"
            )
        if method not in _METHODS:
            raise ArgumentError(f"method must be one of {list(_METHODS)}; got {_shown(method)}")
        self._calib_x: list[torch.Tensor] | None = None
        # The layers live under their model names when registered; the
        # unregistered ones (names[i] is None) are held outside the module tree.
        self._names = names
        self._held = [None if n else lin for n, lin in zip(names, (gate, up, down), strict=True)]
        for n, lin in zip(names, (gate, up, down), strict=True):
            if n and lin is not None:
                # (not add_module: the default names are also this class's
                # read-only properties, which add_module refuses)
                self._modules[n] = lin
        self.activation = "silu" if activation == "swish" else activation
        self.rust_max_rows = rust_max_rows
        # ``(key, ffn)``: the Rust copy and what it was built from (method,
        # layers, each held weight's storage, place and version: see
        # _weights; and a gated block's gate and up parameter dicts, whose
        # biases keep forward off the kernel), or None. One tuple, read
        # once per call and replaced whole, so a thread that rebuilds or drops it
        # (a weight update, a state load, a method change) never leaves another
        # thread's call with one half of the pair.
        self._rust: tuple[Any, Any] | None = None
        self._calib: list[torch.Tensor] | None = None
        self._calib_count = 0
        # The buffer is the truth; ``_cfg`` is its value as Python floats (what
        # each call uses), read again when ``_seen`` (the buffer object and its
        # version counter, with the values read from them: one tuple, so a call
        # never pairs a buffer check with another thread's values) no longer
        # matches.
        self._cfg: tuple[str, float | None, float | None] = ("cats", None, None)
        self._seen: tuple[Any, Any, Any] = (None, None, self._cfg)
        self.register_buffer(_CONFIG, torch.empty(3, device=_device_of(up)))
        self._set_config(method, threshold, t_in)

    # ------------------------------------------------------------ calibration state

    @property
    def method(self) -> str:
        """``"cats"`` or ``"teal"`` (see the module doc)."""
        return self._config()[0]

    @method.setter
    def method(self, value: str) -> None:
        _, t, t_in = self._config()
        self._set_config(value, t, t_in)

    @property
    def threshold(self) -> float | None:
        """Keep neurons (``"cats"``) or hidden values (``"teal"``) with ``|.|``
        above it; None: all. Stored as float32 (the kernels compare in float32)."""
        return self._config()[1]

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        m, _, t_in = self._config()
        self._set_config(m, value, t_in)

    @property
    def t_in(self) -> float | None:
        """``"teal"`` only: keep inputs with ``|x|`` above it; None: all."""
        return self._config()[2]

    @t_in.setter
    def t_in(self, value: float | None) -> None:
        m, t, _ = self._config()
        self._set_config(m, t, value)

    def _config(self) -> tuple[str, float | None, float | None]:
        """(method, threshold, t_in) of the buffer (see :meth:`_config_now`);
        while torch.compile or torch.export traces, the last values read."""
        if _compiling() or _exporting():
            return self._cfg
        return self._config_now()

    def _config_now(self) -> tuple[str, float | None, float | None]:
        """(method, threshold, t_in) of the buffer, outside tracing. Per call:
        one identity and one version check; the values are read (a device
        sync on CUDA) only after the buffer was replaced or written in place."""
        buf: Any = self._buffers[_CONFIG]
        seen = self._seen
        if buf is seen[0] and _version(buf) == seen[1]:
            return seen[2]
        return self._read_config(buf)

    def _read_config(self, buf: Any) -> tuple[str, float | None, float | None]:
        if buf.is_meta:  # (no values: the last ones stay)
            return self._cfg
        cfg = _parse_config(buf, _CONFIG, ArgumentError)
        if cfg[0] != self._cfg[0]:
            self._rust = None  # the kernel class follows the method
        self._cfg = cfg
        self._seen = (buf, _version(buf), cfg)
        return cfg

    def _set_config(self, method: str, threshold: float | None, t_in: float | None) -> None:
        """Validates and stores a calibration (a new buffer on the old one's device)."""
        if method not in _METHODS:
            raise ArgumentError(f"method must be one of {list(_METHODS)}; got {_shown(method)}")
        ts = []
        for name, v in (("threshold", threshold), ("t_in", t_in)):
            f = None if v is None else float(v)
            if f is not None and not (f >= 0 and math.isfinite(f)):
                raise ArgumentError(f"{name} must be None or a finite value >= 0; got {_shown(v)}")
            # (the float32 value: what a state dict carries, so a model loaded
            # from it computes the same)
            ts.append(None if f is None else float(np.float32(f)))
        cfg = (method, ts[0], ts[1])
        old: Any = self._buffers[_CONFIG]
        buf = _config_tensor(cfg, torch.float32, old.device)
        self._buffers[_CONFIG] = buf
        if method != self._cfg[0]:
            self._rust = None  # the kernel class follows the method
        self._cfg, self._seen = cfg, (buf, _version(buf), cfg)

    def _layer(self, i: int) -> Any:
        name = self._names[i]
        return self._modules.get(name) if name else self._held[i]

    def _layers(self) -> tuple[Any, Any, Any]:
        """``(gate, up, down)``: :meth:`_layer` of each, in one call."""
        (n0, n1, n2), mods, held = self._names, self._modules, self._held
        return (
            mods.get(n0) if n0 else held[0],
            mods.get(n1) if n1 else held[1],
            mods.get(n2) if n2 else held[2],
        )

    @property
    def gate(self) -> nn.Linear | None:
        return self._layer(0)

    @property
    def up(self) -> nn.Linear:
        return self._layer(1)

    @property
    def down(self) -> nn.Linear:
        return self._layer(2)

    @staticmethod
    def _slots(layers: tuple[Any, Any, Any]) -> tuple[tuple[dict[str, Any], str] | None, ...]:
        """Where the parameters the Rust copy of ``layers`` (gate, up, down)
        holds live, as (the layer's ``_parameters``, name), None where it
        holds none: the three weights, down's bias, an ungated up's bias. (A
        module keeps its one ``_parameters`` dict: replacing, adding or
        removing a parameter writes into it.)"""
        gate, up, down = layers
        return (
            None if gate is None else (gate._parameters, "weight"),
            (up._parameters, "weight"),
            (down._parameters, "weight"),
            (down._parameters, "bias"),
            None if gate is not None else (up._parameters, "bias"),
        )

    def _fresh(self, key: Any) -> bool:
        """Whether a Rust copy built at ``key`` still matches the weights: the
        same layers, holding parameters whose data is the very data the copy
        was read from (see :func:`_weights`), with no in-place write since.

        Run on every token of every layer, so inlined, and cheapest-first:
        for each weight its version (an in-place update), its address (a new
        tensor), then the identity of its storage (new data allocated where
        freed data was), its dtype, strides and shape (another view of the
        same storage): ~0.3 us a weight, each read 35-70 ns."""
        _, (g, u, d), weights, _ = key
        (n0, n1, n2), mods, held = self._names, self._modules, self._held
        if (
            (mods.get(n0) if n0 else held[0]) is not g
            or (mods.get(n1) if n1 else held[1]) is not u
            or (mods.get(n2) if n2 else held[2]) is not d
            or weights is None
        ):
            return False
        for params, name, ref, ptr, dtype, shape, stride, version in weights:
            p = params.get(name)
            if p is None or ref is None:
                if p is not None or ref is not None:
                    return False  # (a parameter added or removed)
                continue
            try:
                v = p._version
            except RuntimeError:  # (an inference tensor: see _version)
                v = None
            if (
                v != version
                or p.data_ptr() != ptr
                or p.untyped_storage() is not ref()
                or p.dtype is not dtype
                or p.stride() != stride
                or p.shape != shape
            ):
                return False
        return True

    def _apply(self, fn: Any, recurse: bool = True) -> SparseMLP:
        self._rust = None
        old: Any = self._buffers[_CONFIG]
        cfg = self._config()
        out = super()._apply(fn, recurse)
        new: Any = self._buffers[_CONFIG]
        if new.dtype != old.dtype or (old.is_meta and not new.is_meta) or new.is_inference():
            # A cast (``.half()``) would round the thresholds, and ``to_empty``
            # after ``to("meta")`` leaves garbage: the values stay those of the
            # last calibration, on the new device (and not an inference tensor,
            # as a move under torch.inference_mode makes: see _config_tensor).
            self._buffers[_CONFIG] = new = _config_tensor(cfg, old.dtype, new.device)
            self._seen = (new, _version(new), cfg)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # The Rust copy stays behind (its key holds weak references, which do
        # not pickle, and the copy would duplicate the weights in the file):
        # the unpickled or deep-copied module builds its own on its first call.
        state = super().__getstate__()
        state["_rust"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Whatever Rust copy a pickle holds is dropped: built again on the
        # next call. Earlier versions pickled theirs, keyed in their own way
        # (``torch.save`` of a whole model): ``_rust`` with a key of (method,
        # layers, parameters, versions), and before it ``_ffn``/``_ffn_key``
        # with a ``_seen`` pair, whose calibration is read again from the buffer.
        state = dict(state)
        if "_rust" not in state:
            state["_seen"] = (None, None, state.get("_cfg"))
        state.pop("_ffn", None)
        state.pop("_ffn_key", None)
        state["_rust"] = None
        super().__setstate__(state)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + _CONFIG
        if key in state_dict:
            try:
                _parse_config(state_dict[key], key, FormatError)
            except FormatError as e:
                # torch's way with a bad entry (as with a shape mismatch): the
                # entry is not copied, the rest of the state loads, and
                # load_state_dict raises its RuntimeError listing the message.
                error_msgs.append(str(e))
                state_dict = {k: v for k, v in state_dict.items() if k != key}
        self._rust = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in missing_keys:
            # The dense model's own checkpoint: its weights, this calibration.
            missing_keys.remove(key)
        # Read now, whatever the load did (copied in place, assigned, or
        # copied into a buffer whose version did not move): the next call may
        # be a compiled one, which keeps the values last read.
        try:
            self._read_config(self._buffers[_CONFIG])
        except ArgumentError:
            pass  # (written invalid in place before, and not loaded: the next call says so)

    def extra_repr(self) -> str:
        method, threshold, t_in = self._config()
        t = "dense" if threshold is None else f"threshold={threshold:.4g}"
        if method == "teal" and t_in is not None:
            t += f", t_in={t_in:.4g}"
        return f"{self.activation}, {method}, {t}"

    def _rust_ok(self, x: torch.Tensor, rows: int, threshold: float | None, export: bool) -> bool:
        return (
            threshold is not None
            and 0 < rows  # (an empty batch: torch gives the empty result)
            and x.is_cpu
            and x.dtype is torch.float32
            and rows <= self.rust_max_rows
            and not torch.is_grad_enabled()
            # torch.jit.trace would record the kernel's output as a constant,
            # and torch.export traces fake tensors numpy cannot read: both take
            # the torch ops. (torch.compile runs the kernel between graphs.)
            and not export
            and not _is_tracing()
            # (and no gate or up bias in a gated block: _rust_for(kernel=True)
            # checks it with the weights, on the layers that check looked up)
        )

    @staticmethod
    def _plain(layers: tuple[Any, Any, Any]) -> bool:
        """Whether every layer holds a float ``weight`` the Rust copy can take
        (not, say, a :class:`~neuropil.torch.QuantizedLinear` that
        ``quantize_model`` put in after ``sparsify_mlp``)."""
        return all(lin is None or "weight" in lin._parameters for lin in layers)

    @staticmethod
    def _biasless(layers: tuple[Any, Any, Any]) -> bool:
        """Whether a gated block has no gate/up bias (the Rust kernels take
        only an ungated up's). Read from the module dicts: attribute lookups
        through ``nn.Module`` cost ~1 us each per call."""
        gate, up, _ = layers
        return gate is None or (
            gate._parameters.get("bias") is None and up._parameters.get("bias") is None
        )

    def rust_ffn(self) -> Any:
        """The Rust :class:`~neuropil.neurons.SparseFFN` (or ``InputSparseFFN``) of
        these weights, built again when a weight changed (see the class doc);
        None while a layer holds no float ``weight`` (a
        :class:`~neuropil.torch.QuantizedLinear` put in by ``quantize_model``
        after ``sparsify_mlp``: calls then take the torch path). It is given
        the module's current thresholds here, so a direct call of it computes
        what :meth:`forward` does; :meth:`forward` passes them with each call
        instead and never changes it, so threads may share it."""
        method, t, t_in = self._config()
        ffn = self._rust_for(method)
        if ffn is not None:
            # (one tuple each, as their setters write: see SparseFFN._mode)
            if method == "teal":
                ffn.set_thresholds(t_in, t)
            else:
                ffn._mode = (t, None)
        return ffn

    def _rust_for(self, method: str, kernel: bool = False) -> Any:
        """:meth:`rust_ffn` for ``method`` (the one the calling forward read);
        ``kernel``: for :meth:`forward`'s kernel call, None (and no copy
        built) while the kernel cannot compute the block: a gated one with a
        gate or up bias (read from the layers the weights' check found, not
        looked up again).

        Threads calling at once may both build a copy (the last one stays);
        each call uses the copy it built or found, of its own method. The copy
        is read from the tensors the key describes, taken once (``detach``:
        the data a parameter holds at that moment, whatever another thread
        assigns to it later), so a replacement of a weight during a build
        cannot pair one weight's key with another's values; versions are
        read before the values, so an in-place write during a build makes the
        next call build again."""
        cur = self._rust
        if cur is not None and cur[0][0] == method and self._fresh(cur[0]):
            if kernel:
                for params in cur[0][3]:  # (the layers are the key's: their dicts)
                    if params.get("bias") is not None:
                        return None
            return cur[1]
        layers = self._layers()
        if kernel and not self._biasless(layers):
            return None  # (no copy built for calls that cannot use it)
        slots = self._slots(layers)
        params = [None if s is None else s[0].get(s[1]) for s in slots]
        data = [None if p is None else p.detach() for p in params]
        gate, up, _ = layers
        biases = () if gate is None else (gate._parameters, up._parameters)
        key = (method, layers, _weights(slots, data), biases)  # (before the values are read)
        ffn = None
        if self._plain(layers):
            from .neurons import InputSparseFFN, SparseFFN

            g, u, d, d_bias, u_bias = (None if t is None else t.float().cpu().numpy() for t in data)
            cls = InputSparseFFN if method == "teal" else SparseFFN
            ffn = cls(g, u, d, activation=self.activation, up_bias=u_bias, down_bias=d_bias)
        self._rust = (key, ffn)
        return ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (each tracing check once a call: the token path below is ~10 us)
        export = _exporting()
        if export or _compiling():
            # Tracers cannot guard on the buffer's version (a data-dependent
            # value); torch.compile guards on these Python values instead, and
            # the setters and state loads replace them, so it recompiles.
            method, threshold, t_in = self._cfg
        else:
            method, threshold, t_in = self._config_now()
        shape = x.shape
        rows = x.numel() // shape[-1] if len(shape) > 1 and shape[-1] else 1
        if self._calib is None and self._rust_ok(x, rows, threshold, export):
            # The per-token call of a decoding model: the kernel takes 7-20 us
            # on a small model's FFN, so this path stays as short as it can
            # (numpy views in and out; it cost 25 us a call through torch
            # reshapes and re-validation). The thresholds read above go to the
            # kernel with the call, so the Rust copy, shared by the threads
            # calling this module, is never written to here.
            ffn = self._rust_for(method, kernel=True)
            if ffn is not None:
                xn = x.detach().numpy()
                if method == "teal":
                    y = ffn._forward(xn.reshape(-1) if rows == 1 else xn.reshape(rows, shape[-1]),
                                     t_in, threshold)  # fmt: skip
                else:
                    y = ffn._ffn.forward(xn.reshape(rows, shape[-1]), "threshold", threshold)
                return torch.from_numpy(y.reshape(*shape[:-1], y.shape[-1]))
        if method == "teal":
            return self._teal(x, threshold, t_in)
        act = _ACTS[self.activation]
        a = act((self.gate or self.up)(x))
        if self._calib is not None:
            self._record(a)
        if threshold is not None:
            a = torch.where(a.abs() > threshold, a, torch.zeros_like(a))
        if self.gate is not None:
            a = a * self.up(x)
        return _linear(self.down, a)

    def _teal(self, x: torch.Tensor, threshold: float | None, t_in: float | None) -> torch.Tensor:
        """TEAL with torch ops: mask the inputs, then the hidden values."""
        if self._calib_x is not None:
            _keep(self._calib_x, x)
        if t_in is not None:
            x = torch.where(x.abs() > t_in, x, torch.zeros_like(x))
        act = _ACTS[self.activation]
        h = act(self.gate(x)) * self.up(x) if self.gate is not None else act(self.up(x))
        if self._calib is not None:
            self._record(h)
        if threshold is not None:
            h = torch.where(h.abs() > threshold, h, torch.zeros_like(h))
        return _linear(self.down, h)

    def _record(self, a: torch.Tensor) -> None:
        assert self._calib is not None
        self._calib_count += a.numel()
        _keep(self._calib, a)


_is_tracing = torch.jit.is_tracing
_compiling: Callable[[], bool] = torch.compiler.is_compiling
# (torch >= 2.6; torch.export of older versions finds the kernel call and stops)
_exporting: Callable[[], bool] = getattr(torch.compiler, "is_exporting", lambda: False)


def _version(t: Any) -> Any:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor tracks no version
        return None


def _config_tensor(cfg: tuple[str, float | None, float | None], dtype: Any, device: Any) -> Any:
    vals = [float(_METHODS.index(cfg[0]))] + [float("nan") if v is None else v for v in cfg[1:]]
    # Never an inference tensor (one made under torch.inference_mode, say by
    # sparsify_mlp called there): load_state_dict could not copy into it
    # outside that mode, and it tracks no version for _config_now to check.
    with torch.inference_mode(False):
        return torch.tensor(vals, dtype=dtype, device=device)


def _parse_config(
    t: Any, name: str, err: type[Exception]
) -> tuple[str, float | None, float | None]:
    """(method, threshold, t_in) of a ``sparse_config`` tensor; ``err`` naming
    ``name``, the expected and the found value when it is not one."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (3,) or not t.is_floating_point():
        found = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise err(f"{name} must be a float tensor of shape (3,) ([method, threshold, t_in]); "
                  f"got {found}")  # fmt: skip
    if t.is_meta:
        return ("cats", None, None)  # (shape only: a meta tensor has no values)
    m, *ts = t.detach().float().cpu().tolist()
    if m not in (0.0, 1.0) or any(not (math.isnan(v) or 0 <= v < math.inf) for v in ts):
        raise err(
            f"{name} must be [method 0 (cats) or 1 (teal), threshold, t_in] with each "
            f"threshold >= 0 and finite, or NaN for none; got {[m, *ts]}"
        )
    return (_METHODS[int(m)], *(None if math.isnan(v) else v for v in ts))  # type: ignore[return-value]


def _weights(
    slots: tuple[tuple[dict[str, Any], str] | None, ...], tensors: list[Any]
) -> tuple[tuple[Any, ...], ...] | None:
    """What identifies the values of the parameters in ``slots`` (see
    :meth:`SparseMLP._slots`) without reading them, for :meth:`SparseMLP._fresh`:
    for each slot, its place and, for the tensor it held (``tensors``: None
    where none), a weak reference to its storage, where in it the values are
    and how they are read (address, dtype, shape, strides), and its version.
    The version alone misses a replaced parameter (``p.data = w``, and
    ``module.to()`` / ``.half()``, which assign ``p.data``, keep ``p``'s
    version counter); an address alone misses new data allocated where freed
    data was (the weak reference dies with that storage, so a dead one never
    matches) and another view of the same storage. None, which never matches
    (built again on each call), when a tensor's storage cannot be had (a
    wrapper subclass)."""
    out: list[tuple[Any, ...]] = []
    for slot, t in zip(slots, tensors, strict=True):
        if slot is None:
            continue
        if t is None:
            out.append((*slot, None, None, None, None, None, None))
            continue
        try:
            ref = weakref.ref(t.untyped_storage())
        except (RuntimeError, NotImplementedError, TypeError):
            return None
        out.append((*slot, ref, t.data_ptr(), t.dtype, t.shape, t.stride(), _version(t)))
    return tuple(out)


def _linear(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)``; BERT's down, whose module in the model passes its input
    through, from its parameters."""
    if isinstance(lin, _AppliedLinear):
        return F.linear(x, lin.weight, lin.bias)
    return lin(x)


class _AppliedLinear(nn.Module):
    """BERT's ``output.dense`` after :func:`sparsify_mlp`: it keeps the layer's
    parameters (the same tensors, under the same state-dict keys), while the
    :class:`SparseMLP` in ``intermediate`` applies them, so its forward passes
    its input through."""

    bias: torch.Tensor | None  # (registered in __init__)

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = lin.weight
        self.register_parameter("bias", lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _keep(store: list[torch.Tensor], a: torch.Tensor) -> None:
    """Appends ``|a|`` to a calibration store, subsampled (strided) past 2^22 values."""
    store.append(a.detach().abs().reshape(-1).float().cpu())
    if sum(t.numel() for t in store) > 2 * _CALIB_VALUES:
        merged = torch.cat(store)
        store[:] = [merged[:: max(2, merged.numel() // _CALIB_VALUES)]]


def _act_name(model: nn.Module, default: str) -> str:
    cfg = getattr(model, "config", None)
    act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None)
    return act if isinstance(act, str) else default


def _find_mlps(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) for every FFN: kind 'llama', 'bert' or 'sparse' (already
    done). Llama-style projections may be ``QuantizedLinear`` layers (a model
    quantized first); BERT-style ones must be ``nn.Linear`` (see sparsify_mlp)."""
    from ._torch_quant import QuantizedLinear

    found: list[tuple[str, nn.Module, str]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, SparseMLP):
            found.append((name, mod, "sparse"))
        elif all(
            isinstance(getattr(mod, a, None), (nn.Linear, QuantizedLinear))
            for a in ("gate_proj", "up_proj", "down_proj")
        ):
            found.append((name, mod, "llama"))
        elif isinstance(getattr(mod, "intermediate", None), SparseMLP):
            continue
        else:
            pair = (
                getattr(getattr(mod, "intermediate", None), "dense", None),
                getattr(getattr(mod, "output", None), "dense", None),
            )
            if all(isinstance(d, nn.Linear) for d in pair):
                found.append((name, mod, "bert"))
            elif all(isinstance(d, (nn.Linear, QuantizedLinear)) for d in pair):
                raise ArgumentError(
                    f"{name or 'model'}: a BERT-style MLP with QuantizedLinear layers cannot be "
                    "sparsified (its SparseMLP applies output.dense's float parameters); "
                    "call sparsify_mlp before quantize_model"
                )
    return found


def _run_calibration(model: nn.Module, calibration: Any, tokenizer: Any) -> None:
    device = next(model.parameters()).device

    def one(item: Any) -> None:
        if isinstance(item, str):
            raise ArgumentError("calibration texts need tokenizer=...")
        if isinstance(item, torch.Tensor):
            model(item.to(device) if item.dim() == 2 else item.reshape(1, -1).to(device))
        elif isinstance(item, dict) or hasattr(item, "keys"):
            model(
                **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
            )
        else:
            raise ArgumentError(
                "calibration must be input ids (tensor), a tokenizer batch (dict), a list of "
                f"them, texts with tokenizer=..., or a callable; got {type(item).__name__}"
            )

    with torch.no_grad():
        if callable(calibration) and not isinstance(calibration, nn.Module):
            calibration()
        elif (
            isinstance(calibration, (list, tuple))
            and calibration
            and isinstance(calibration[0], str)
        ):
            if tokenizer is None:
                raise ArgumentError("calibration texts need tokenizer=...")
            for text in calibration:
                one(tokenizer(text, return_tensors="pt", truncation=True, max_length=512))
        elif isinstance(calibration, Iterable) and not isinstance(
            calibration, (torch.Tensor, dict)
        ):
            items = list(calibration)
            if not items:
                raise ArgumentError("calibration must not be empty")
            for item in items:
                one(item)
        else:
            one(calibration)


def sparsify_mlp(
    model: nn.Module,
    sparsity: float = 0.5,
    calibration: Any = None,
    *,
    tokenizer: Any = None,
    rust_max_rows: int = 8,
    method: str = "cats",
    hidden_sparsity: float | None = None,
) -> dict[str, float]:
    """Makes every FFN of ``model`` activation-sparse, in place.

    Llama-style MLPs (``gate_proj``/``up_proj``/``down_proj``, float or
    :class:`~neuropil.torch.QuantizedLinear`: quantizing first or last gives the
    same layers; quantized ones run their own kernels on the masked values, the
    torch path) are replaced by a :class:`SparseMLP`; in BERT-style layers
    ``intermediate`` becomes the :class:`SparseMLP` (ending with
    ``output.dense``) and ``output.dense`` passes its input through (it keeps
    its parameters; such layers must still be float). The model's state-dict keys
    stay, and each FFN adds one, ``<ffn>.sparse_config`` (the calibration), so
    ``state_dict`` / ``save_pretrained`` keep it: to restore it, sparsify the
    fresh model (``sparsity=0`` needs no calibration) and ``load_state_dict``
    the saved state (``from_pretrained`` alone drops those keys, as it builds
    the dense model). The dense model's own checkpoints still load strictly.
    Calling it again on a sparsified model recalibrates (sparsity 0 makes it
    dense again).

    Args:
        model: A ``transformers`` model (or any module holding such FFNs).
        sparsity: Target fraction of inactive neurons per layer (``"cats"``), or
            of dropped inputs and hidden values (``"teal"``), in [0, 1),
            measured on the calibration inputs.
        calibration: What to run the dense model on: input ids (tensor
            ``(b, t)``), a tokenizer batch (dict), a list of those, a list of
            texts (with ``tokenizer``), or a zero-argument callable that runs
            the model (e.g. ``lambda: st_model.encode(sentences)``).
        tokenizer: Tokenizes calibration texts.
        rust_max_rows: Token counts up to this go to the Rust kernel on CPU.
        method: ``"cats"`` (mask neurons on ``|act(gate x)|``; the gate is read
            densely) or ``"teal"`` (mask each projection's inputs; reads
            ``1 - sparsity`` of the weights). TEAL's hidden threshold is the
            quantile of the dense hidden values ``act(gate x) * (up x)``.
        hidden_sparsity: ``"teal"`` only: the fraction of hidden values to drop
            (the down projection's inputs), if not ``sparsity``. TEAL finds the
            down projection the most tolerant: on SmolLM2, inputs at 40% and
            hidden values at 70% (half the weights read, as with 50% on both)
            raised perplexity 44.5%, against 58.7% with 50% on both.

    Returns:
        The threshold chosen for each FFN, by module name (``"teal"``: the
        hidden threshold; each module's ``t_in`` holds the input one).

    Raises:
        ArgumentError: ``model`` is not an ``nn.Module``, sparsity or
            hidden_sparsity outside [0, 1), hidden_sparsity with ``"cats"``, no
            FFN found, an unsupported activation, or calibration missing or of
            an unknown kind.
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    s = _real("sparsity", sparsity, "in [0, 1)")
    if not 0.0 <= s < 1.0:
        raise ArgumentError(f"sparsity must be in [0, 1); got {_shown(sparsity)}")
    if method not in _METHODS:
        raise ArgumentError(f"method must be one of {list(_METHODS)}; got {_shown(method)}")
    hs = s if hidden_sparsity is None else _real("hidden_sparsity", hidden_sparsity, "in [0, 1)")
    if hidden_sparsity is not None and method != "teal":
        raise ArgumentError(f"hidden_sparsity applies to method='teal' only; got method={method!r}")
    if not 0.0 <= hs < 1.0:
        raise ArgumentError(f"hidden_sparsity must be in [0, 1); got {_shown(hidden_sparsity)}")
    if max(s, hs) > 0 and calibration is None:
        raise ArgumentError("calibration is required for sparsity > 0")
    found = _find_mlps(model)
    if not found:
        raise ArgumentError("model has no Llama-style (gate/up/down) or BERT-style MLP to sparsify")
    sparse: dict[str, SparseMLP] = {}
    for name, mod, kind in found:
        if kind == "sparse":
            assert isinstance(mod, SparseMLP)
            sparse[name] = mod
        elif kind == "llama":
            # (casts: _find_mlps checked them, nn.Linear or QuantizedLinear modules)
            sm = SparseMLP(cast(nn.Module, mod.gate_proj), cast(nn.Module, mod.up_proj),
                           cast(nn.Module, mod.down_proj), _act_name(model, "silu"),
                           rust_max_rows=rust_max_rows, method=method,
                           names=("gate_proj", "up_proj", "down_proj"))  # fmt: skip
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, sm)
            sparse[name] = sm
        else:
            # (casts: _find_mlps checked intermediate.dense and output.dense, nn.Linear)
            inter, output = cast(nn.Module, mod.intermediate), cast(nn.Module, mod.output)
            down = _AppliedLinear(cast(nn.Linear, output.dense))
            sm = SparseMLP(None, cast(nn.Linear, inter.dense), down, _act_name(model, "gelu"),
                           rust_max_rows=rust_max_rows, method=method,
                           names=(None, "dense", None))  # fmt: skip
            mod.intermediate = sm
            output.dense = down
            sparse[f"{name}.intermediate" if name else "intermediate"] = sm
    for sm in sparse.values():
        sm._set_config(method, None, None)
        sm._rust = None
    if s == 0.0 and hs == 0.0:
        return dict.fromkeys(sparse, 0.0)
    for sm in sparse.values():
        sm._calib, sm._calib_count = [], 0
        sm._calib_x = [] if method == "teal" else None
    try:
        _run_calibration(model, calibration, tokenizer)
        out: dict[str, float] = {}
        t_in: dict[str, float] = {}
        for name, sm in sparse.items():
            if not sm._calib:
                raise ArgumentError(f"calibration did not run FFN {name!r}")
            out[name] = float(np.quantile(torch.cat(sm._calib).numpy(), hs)) if hs > 0 else 0.0
            if sm._calib_x and s > 0:
                t_in[name] = float(np.quantile(torch.cat(sm._calib_x).numpy(), s))
    finally:
        for sm in sparse.values():
            sm._calib = sm._calib_x = None
    for name, sm in sparse.items():
        sm._set_config(method, out[name] if hs > 0 else None, t_in.get(name))
        # (the stored, float32 value: what the model applies and a state dict carries)
        out[name] = sm.threshold or 0.0
    return out

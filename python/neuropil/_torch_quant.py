"""``QuantizedLinear`` and ``quantize_model``: packed weights inside torch models.

The module keeps the packed codes, scales and mins as buffers (so ``state_dict``,
``.to(device)`` and safetensors files carry them packed). On the CPU, forward
hands those buffers to the Rust kernels without copying (``Tensor.numpy()``
shares memory); on a CUDA device a torch path unpacks one layer's codes on
the device right before ``F.linear`` (the packed buffers stay resident; the
float weight lives only for that call).
"""

from __future__ import annotations

import glob
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _native, _safetensors
from .errors import ArgumentError, DTypeError, FormatError, NeuropilError, ShapeError
from .quant import (
    QuantizedWeights,
    ScaleDType,
    _check_skip,
    _load_entries,
    _resolve,
    _skip_patterns,
    _skipped,
    quantize,
    save_file,
)

__all__ = ["QuantizedLinear", "load_quantized", "quantize_model", "save_quantized"]

_EXTRA_VERSION = 1


def _row_bytes(cols: int, bits: int, group_size: int) -> int:
    return -(-cols // group_size) * group_size * bits // 8


def unpack_codes(qdata: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Unpacks codes (rows, row_bytes) uint8 to (rows, groups, group_size) uint8, on any device."""
    rows = qdata.shape[0]
    g = group_size
    b = qdata.reshape(rows, -1, g * bits // 8)
    if bits == 8:
        return b
    if bits == 4:
        return torch.cat([b & 15, b >> 4], dim=-1)
    if bits == 2:
        return torch.cat([(b >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
    low = b[..., : g // 4]
    high = b[..., g // 4 :]
    lo = torch.cat([(low >> s) & 3 for s in (0, 2, 4, 6)], dim=-1)
    hi = torch.cat([(high >> k) & 1 for k in range(8)], dim=-1)
    return lo | (hi << 2)


def _dequantize(qdata, scales, mins, bits: int, group_size: int, cols: int, dtype) -> torch.Tensor:
    """The float weight (rows, cols) from packed buffers, with torch on their device."""
    u = unpack_codes(qdata, bits, group_size).to(dtype)
    s = scales.to(dtype).unsqueeze(-1)
    m = mins.to(dtype).unsqueeze(-1) if mins.numel() else s * -float(1 << (bits - 1))
    return (u * s + m).reshape(qdata.shape[0], -1)[:, :cols]


def _torch_linear(x, qdata, scales, mins, bias, bits: int, group_size: int) -> torch.Tensor:
    """Dequantize on the buffers' device, then ``F.linear`` in x's float precision."""
    dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = _dequantize(qdata, scales, mins, bits, group_size, x.shape[-1], dtype)
    b = None if bias is None else bias.to(dtype)
    return F.linear(x.to(dtype), w, b).to(x.dtype)


@torch.library.custom_op("neuropil::quant_linear", mutates_args=())
def _quant_linear(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    scheme: str,
) -> torch.Tensor:
    """``QuantizedLinear``'s CPU forward as a torch operator, for ``torch.compile``:
    an opaque call in the graph instead of a graph break at the numpy views."""
    if x.numel() == 0:
        return _torch_linear(x, qdata, scales, mins, bias, bits, group_size)
    fmt = (qdata.shape[0], x.shape[-1], bits, group_size, scheme)
    return _cpu_linear(
        x,
        _kernel_views(qdata, scales, mins),
        bias,
        fmt,
        lambda: _torch_linear(x, qdata, scales, mins, bias, bits, group_size),
    )


def _kernel_views(q: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> tuple[Any, Any, Any]:
    """numpy views of packed CPU buffers as the kernel takes them (float16
    scales and mins as their uint16 bits; no mins: None)."""
    scales = s.numpy()
    mins = m.numpy() if m.numel() else None
    if scales.dtype == np.float16:  # the core takes float16 as its uint16 bits
        scales = scales.view(np.uint16)
        mins = None if mins is None else mins.view(np.uint16)
    return q.numpy(), scales, mins


def _cpu_linear(
    x: torch.Tensor,
    views: tuple[Any, Any, Any],
    bias: torch.Tensor | None,
    fmt: tuple[int, int, int, int, str],
    fallback: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """The Rust kernel on ``views`` (``fmt``: rows, cols, bits, group size,
    scheme) for a non-empty CPU ``x``; ``fallback()`` where ``x`` holds NaN or
    Inf, which the kernels refuse and ``nn.Linear`` lets through to the rows
    they touch."""
    rows, cols = fmt[0], fmt[1]
    xn = x.detach().to(torch.float32).numpy().reshape(-1, cols)
    try:
        # (one star: mypy cannot line two fixed-length star arguments up with the parameters)
        y = _native.quant_matvec(*(views + fmt), xn[0] if xn.shape[0] == 1 else xn)
    except ArgumentError:
        if bool(torch.isfinite(x).all()):
            raise
        return fallback()
    out = torch.from_numpy(y.reshape(*x.shape[:-1], rows))
    if bias is not None:
        out = out + bias
    return out if x.dtype is torch.float32 else out.to(x.dtype)


@_quant_linear.register_fake
def _(x, qdata, scales, mins, bias, bits, group_size, scheme):
    return x.new_empty((*x.shape[:-1], qdata.shape[0]))


class QuantizedLinear(nn.Module):
    """A drop-in ``nn.Linear`` with packed group-wise quantized weights (inference only).

    Buffers: ``qdata`` uint8 (out_features, row_bytes), ``scales`` float16/float32
    (out_features, groups), ``mins`` (same, or empty for symmetric schemes);
    ``bias`` is a float32 parameter or ``None``. Input of any shape (..., in_features),
    float dtype; output (..., out_features) in the input's dtype and device.

    ``torch.compile`` (``fullgraph=True`` included) traces it without a graph
    break: on the CPU the Rust kernel is the custom operator
    ``torch.ops.neuropil.quant_linear``; on other devices the unpacking and
    ``F.linear`` are traced and fused by the compiler.

    The constructor builds zeroed buffers of one format (what ``load_state_dict``
    then fills); its ``scale_dtype`` is the name ``"float16"`` or ``"float32"``.
    :meth:`from_linear` and :func:`quantize_model` also take a numpy or torch dtype.
    """

    # The buffers (registered in __init__; nn.Module's __getattr__ is typed Tensor | Module).
    qdata: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 64,
        scheme: str = "asym",
        scale_dtype: str = "float16",
        device: Any = None,
    ) -> None:
        super().__init__()
        self.bits, self.group_size, self.scheme = _resolve(bits, group_size, scheme)
        if scale_dtype not in ("float16", "float32"):
            raise ArgumentError(f"scale_dtype must be float16 or float32; got {scale_dtype!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        groups = -(-self.in_features // self.group_size)
        sdt = getattr(torch, scale_dtype)
        rb = _row_bytes(self.in_features, self.bits, self.group_size)
        has_min = self.scheme in ("asym", "q4_1")
        self.register_buffer(
            "qdata", torch.zeros(out_features, rb, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=sdt, device=device))
        self.register_buffer(
            "mins", torch.zeros(out_features if has_min else 0, groups, dtype=sdt, device=device)
        )
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.zeros(out_features, dtype=torch.float32, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeights, bias: torch.Tensor | None = None
    ) -> QuantizedLinear:
        rows, cols = qw.shape
        m = cls(cols, rows, bias is not None, qw.bits, qw.group_size, qw.scheme, qw.scale_dtype)
        m.qdata = torch.from_numpy(np.ascontiguousarray(qw.data))
        m.scales = torch.from_numpy(np.ascontiguousarray(qw.scales))
        if qw.mins is not None:
            m.mins = torch.from_numpy(np.ascontiguousarray(qw.mins))
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().float().cpu().clone(), requires_grad=False)
        return m

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int | None = None,
        group_size: int | None = None,
        scheme: str = "asym",
        *,
        scale_dtype: ScaleDType = "float16",
        search: bool = False,
    ) -> QuantizedLinear:
        """Quantizes an ``nn.Linear`` (any device; the result lands on the same device).

        ``bits``, ``group_size``, ``scheme``, ``scale_dtype`` (a name, a numpy
        dtype or scalar type, or a torch dtype) and ``search`` are as
        :func:`neuropil.quant.quantize` takes them.

        Raises:
            ArgumentError: ``linear`` is not a module with a ``weight`` tensor
                (an ``nn.Linear``), its bias holds NaN (every output would be
                NaN; an infinite bias, e.g. a -inf one banning tokens, is kept), or an argument
                :func:`~neuropil.quant.quantize` refuses.
            ShapeError, DTypeError: the weight is not a 2-D float tensor.
        """
        weight = getattr(linear, "weight", None)
        if not isinstance(linear, nn.Module) or not isinstance(weight, torch.Tensor):
            raise ArgumentError(
                "linear must be an nn.Linear (a module with a weight tensor); "
                f"got {type(linear).__name__}"
            )
        bias = getattr(linear, "bias", None)
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise ArgumentError(f"bias must be a tensor or None; got {type(bias).__name__}")
        # NaN is refused (every output would be NaN); +-Inf is kept: a -inf
        # bias is how an lm_head bans tokens, and forward gives what nn.Linear does.
        if bias is not None and bias.is_floating_point() and bool(torch.isnan(bias.detach()).any()):
            nan = torch.isnan(bias.detach().reshape(-1)).nonzero().reshape(-1)
            raise ArgumentError(
                f"bias must not hold NaN; got NaN at index {int(nan[0])} ({nan.numel()} of "
                f"{bias.numel()} values) in {type(linear).__name__}.bias"
            )
        qw = quantize(weight, bits, group_size, scheme, scale_dtype=scale_dtype, search=search)
        return cls.from_quantized(qw, bias).to(weight.device)

    def quantized(self) -> QuantizedWeights:
        """The weights as :class:`~neuropil.quant.QuantizedWeights` (CPU buffers shared)."""
        mins = self.mins.cpu().numpy() if self.mins.numel() else None
        return QuantizedWeights(
            self.qdata.cpu().numpy(),
            self.scales.cpu().numpy(),
            mins,
            (self.out_features, self.in_features),
            self.bits,
            self.group_size,
            self.scheme,
        )

    @property
    def memory_bytes(self) -> int:
        """Bytes of the packed weight (codes, scales, mins), without the bias."""
        return sum(t.numel() * t.element_size() for t in (self.qdata, self.scales, self.mins))

    # ----------------------------------------------------------------- state
    def _format_state(self) -> dict[str, Any]:
        return {
            "format_version": _EXTRA_VERSION,
            "bits": self.bits,
            "group_size": self.group_size,
            "scheme": self.scheme,
            "in_features": self.in_features,
            "out_features": self.out_features,
        }

    def get_extra_state(self) -> torch.Tensor:
        """The layer's format (``format_version``, ``bits``, ``group_size``,
        ``scheme``, ``in_features``, ``out_features``) as UTF-8 JSON in a 1-D
        ``uint8`` tensor: a tensor, so safetensors writers (``save_pretrained``)
        store it with the buffers."""
        blob = json.dumps(self._format_state(), sort_keys=True).encode()
        return torch.tensor(list(blob), dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        """Checks a saved format against this layer's: the tensor of
        :meth:`get_extra_state`, or the dict that state dicts saved before held.

        Raises:
            FormatError: malformed, another ``format_version``, or another format.
        """
        if isinstance(state, torch.Tensor):
            state = _decode_extra_state(state)
        if not isinstance(state, dict) or state.get("format_version") != _EXTRA_VERSION:
            raise FormatError(f"QuantizedLinear state must have format_version 1; got {state!r}")
        want = self._format_state()
        if any(state.get(k) != want[k] for k in want):
            raise FormatError(f"QuantizedLinear state {state} does not match this module's {want}")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}, "
            f"scheme={self.scheme!r}"
        )

    # --------------------------------------------------------------- forward
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out, in), computed with torch on the buffers' device."""
        return _dequantize(
            self.qdata, self.scales, self.mins, self.bits, self.group_size, self.in_features, dtype
        )

    def _torch_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """Dequantize on the buffers' device, then ``F.linear`` (any device)."""
        return _torch_linear(
            x,
            self.qdata,
            self.scales,
            self.mins,
            self.bias if bias else None,
            self.bits,
            self.group_size,
        )

    def forward(self, x: torch.Tensor, force_torch: bool = False) -> torch.Tensor:
        """``x @ W.T + bias`` for ``x`` (..., in_features).

        CPU: the Rust kernels on the packed buffers, as
        :meth:`~neuropil.quant.QuantizedWeights.matvec` (up to 3 tokens stream the
        codes; more run the int16 kernel for 4-bit weights on AVX-512 VNNI, else
        dequantize cache-sized tiles). CUDA: batch 1 with 4-bit
        weights runs a Triton kernel on the packed codes when Triton is available;
        otherwise (and with ``force_torch``) the weight is dequantized on the
        device for this call and ``F.linear`` runs. The packed weights are
        frozen; where a gradient is wanted (grad mode on and ``x`` or a trainable
        bias requiring it: adapters trained over a quantized model), the call
        takes that differentiable torch path, so gradients reach ``x``.
        NaN and Inf in ``x`` reach the outputs they touch, as in ``nn.Linear``.
        Under ``torch.autocast`` the output has the autocast dtype, as
        ``nn.Linear``'s has (the kernels still take float32 activations).
        """
        out = self._forward(x, force_torch)
        if x.is_cpu:  # (x.device costs ~0.2 us a call)
            dev, on = "cpu", torch.is_autocast_enabled("cpu")
        else:
            dev = x.device.type
            try:
                on = torch.is_autocast_enabled(dev)
            except RuntimeError:  # a device type autocast does not know ("meta")
                on = False
        if on and x.dtype is not torch.float64:
            return out.to(torch.get_autocast_dtype(dev))
        return out

    def _forward(self, x: torch.Tensor, force_torch: bool) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise DTypeError(f"x must be a torch.Tensor (as for nn.Linear); got {type(x).__name__}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(f"x must have shape (..., {self.in_features}); got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise DTypeError(f"x must be a floating-point tensor (as for nn.Linear); got {x.dtype}")
        lead = x.shape[:-1]
        if torch.is_grad_enabled() and (
            x.requires_grad or (self.bias is not None and self.bias.requires_grad)
        ):
            # The kernels' outputs carry no autograd graph: a gradient through
            # them would silently be missing.
            force_torch = True
        if x.numel() == 0:  # an empty batch, as nn.Linear returns it
            out = x.new_zeros(*lead, self.out_features)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        if torch.compiler.is_compiling():
            # Under torch.compile the CPU kernel is the opaque custom op below
            # (no graph break, fullgraph=True works); elsewhere the torch path
            # is traced and the compiler fuses the unpacking into the matmul.
            if x.is_cpu and self.qdata.is_cpu and not force_torch:
                return torch.ops.neuropil.quant_linear(
                    x,
                    self.qdata,
                    self.scales,
                    self.mins,
                    self.bias,
                    self.bits,
                    self.group_size,
                    self.scheme,
                )
            return self._torch_forward(x)
        # (torch.jit.trace records torch ops only: through the kernel, the traced
        # graph would hold this call's output as a constant)
        cpu = x.is_cpu and not force_torch and not torch.jit.is_tracing()
        views = self._cpu_views() if cpu else None
        if views is not None:
            # The CPU path, kept short: a decoding step calls it for every
            # Linear of the model, and a small layer's kernel takes 10-25 us.
            fmt = (self.out_features, self.in_features, self.bits, self.group_size, self.scheme)
            return _cpu_linear(x, views, self.bias, fmt, lambda: self._torch_forward(x))
        if (
            x.device.type == "cuda"
            and self.qdata.device == x.device
            and not force_torch
            and not torch.jit.is_tracing()  # (Triton writes what the tracer cannot see)
        ):
            if x.numel() == self.in_features:  # batch 1: Triton reads the packed codes
                from ._triton_quant import gemv4

                y = gemv4(self, x, lambda: self._torch_forward(x))
                if y is not None:  # bias added, in x's dtype
                    return y.reshape(*lead, self.out_features)
        return self._torch_forward(x)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # `.to()`, `.cuda()`, `.half()`...: the cached views would keep the
        # old buffers alive. The scales and mins are part of the packed format
        # (float16 or float32, as quantized): a device move applies to them, a
        # cast does not (`model.half()` would turn large float32 scales into
        # inf, `model.to(torch.bfloat16)` give scales no kernel reads).
        self.__dict__.pop("_views", None)
        # (_buffers' values are typed Tensor | None; these two are always tensors)
        packed = cast("dict[str, torch.Tensor]", {n: self._buffers[n] for n in ("scales", "mins")})
        for n in packed:
            self._buffers[n] = None  # (None buffers are skipped by the cast)
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(packed)  # a failed move leaves them in place
        for n, t in packed.items():
            moved = fn(t)
            self._buffers[n] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        self.__dict__.pop("_views", None)
        for n in ("scales", "mins"):
            t = state_dict.get(prefix + n)
            mine = cast(torch.Tensor, self._buffers[n])  # (always a tensor, never None)
            if isinstance(t, torch.Tensor) and t.dtype != mine.dtype and t.numel():
                # copy_ would cast silently; a float32 -> float16 cast rounds or
                # overflows the scales.
                raise FormatError(
                    f"{prefix}{n} must be {mine.dtype} (this layer's scale dtype); got {t.dtype}"
                )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def __getstate__(self) -> dict[str, Any]:
        # Pickling (torch.save of the module, deepcopy) leaves the cached
        # views out: they alias the buffers, which are saved anyway.
        state = super().__getstate__()
        state.pop("_views", None)
        return state

    def _cpu_views(self) -> tuple[Any, Any, Any] | None:
        """numpy views of the CPU buffers as the kernel takes them (float16
        scales and mins as their uint16 bits), or None off the CPU. Cached
        while the buffers are the same tensors on the same memory (``.to()``,
        ``load_state_dict`` with ``assign=True`` or a reassignment replace
        them; an in-place ``load_state_dict`` writes through the views)."""
        b = cast("dict[str, torch.Tensor]", self._buffers)  # (these three: never None)
        key = tuple((id(t), t.data_ptr()) for t in (b["qdata"], b["scales"], b["mins"]))
        cached = self.__dict__.get("_views")
        if cached is not None and cached[0] == key:
            return cached[1]
        q, s, m = b["qdata"], b["scales"], b["mins"]
        if not (q.is_cpu and s.is_cpu and m.is_cpu):
            self.__dict__.pop("_views", None)
            return None
        views = _kernel_views(q, s, m)
        # Held with the tensors it was made from, so their ids stay theirs.
        self.__dict__["_views"] = (key, views, (q, s, m))
        return views


def _decode_extra_state(t: torch.Tensor) -> Any:
    """The dict a :meth:`QuantizedLinear.get_extra_state` tensor holds."""
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() > 4096:
        raise FormatError(
            "QuantizedLinear state must be a 1-D uint8 tensor of JSON (at most 4096 bytes); "
            f"got {t.dtype} of shape {tuple(t.shape)}"
        )
    try:
        return json.loads(t.detach().cpu().numpy().tobytes().decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"QuantizedLinear state is not valid JSON: {e}") from None


def _is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (without importing transformers)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__ == "transformers.modeling_utils"
        for c in type(model).__mro__
    )


def _mark_transformers_model(model: nn.Module) -> None:
    """On a transformers model: registers the ``"neuropil"`` quantization method
    and sets what ``save_pretrained`` needs (see :mod:`neuropil._hf_quant`)."""
    if not _is_transformers_model(model):
        return
    try:
        from ._hf_quant import mark_quantized  # imports transformers (already imported)

        mark_quantized(model)
    except Exception as e:
        # The model is quantized and usable either way; only save_pretrained
        # depends on the marking, so a transformers it does not fit warns.
        warnings.warn(
            f"the model is quantized, but could not be marked for save_pretrained "
            f"({type(e).__name__}: {e}); use neuropil.torch.save_quantized instead",
            stacklevel=3,
        )


def quantize_model(
    model: nn.Module,
    bits: int | None = None,
    group_size: int | None = None,
    scheme: str = "asym",
    skip: str | Iterable[str] | None = (),
    *,
    scale_dtype: ScaleDType = "float16",
    search: bool = False,
) -> nn.Module:
    """Replaces every ``nn.Linear`` of ``model`` in place by a :class:`QuantizedLinear`.

    On a ``transformers`` model (``PreTrainedModel``) it also registers the
    quantization method ``"neuropil"`` with transformers and marks the model as
    transformers' quantizers do (``model.config.quantization_config``, a
    :class:`neuropil.hf.NeuropilConfig` recording each layer's format and the
    layers kept in float; ``model.hf_quantizer``), so
    ``model.save_pretrained(dir)`` writes the packed weights and
    ``AutoModel*.from_pretrained(dir)`` after ``import neuropil.hf`` rebuilds the
    same layers. ``model.half()``, ``.float()`` and ``.to(dtype)`` keep working
    (the packed layers keep their format). If that marking fails (a transformers
    version it does not fit), the call warns and the model stays quantized.

    Args:
        model: any module; it is modified and returned.
        bits, group_size, scheme, scale_dtype, search: as :func:`neuropil.quant.quantize`
            (``scale_dtype`` a name, a numpy dtype or scalar type, or a torch dtype).
        skip: module names to keep in float: glob patterns on the full name
            (``"lm_head"``, ``"*.attn.*"``) or on the name of an enclosing
            module (``"model.layers.0"`` keeps every layer of block 0), or
            exact name components; one string is one pattern, ``None`` (as
            the default ``()``) keeps none. A pattern that matches no module
            is an error (a typo would quantize the layer it meant to keep).

    Returns:
        ``model``.

    Raises:
        ArgumentError: ``model`` is not an ``nn.Module`` (or is an
            ``nn.Linear`` itself: see :meth:`QuantizedLinear.from_linear`), ``skip`` is not a
            string, an iterable of strings or None, a ``skip`` pattern that
            matches no module, or a bad ``bits``/``group_size``/``scheme``
            (the model is left as it was).
        ArgumentError, ShapeError, DTypeError: a layer that
            :meth:`QuantizedLinear.from_linear` refuses (a NaN bias, non-finite
            weights...): its error, the layer's name added (the model is left
            as it was).

    Example::

        model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
        quantize_model(model, bits=4, group_size=32, skip=["lm_head"])
        model.save_pretrained("smollm2-q4")
        import neuropil.hf
        again = AutoModelForCausalLM.from_pretrained("smollm2-q4")
    """
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        # (in place is impossible: it would become its own child named "")
        raise ArgumentError(
            "model must hold the Linear layers to replace; got an nn.Linear itself "
            "(use QuantizedLinear.from_linear(layer, ...) for one layer)"
        )
    skip = _skip_patterns(skip)
    # A pattern that matches nothing is a typo that would quantize the layer it
    # was meant to keep (as `neuropil quantize --skip`).
    _check_skip([n for n, _ in model.named_modules(remove_duplicate=False) if n], skip)
    targets = [
        (name, mod)
        for name, mod in model.named_modules(remove_duplicate=False)
        if isinstance(mod, nn.Linear) and not _skipped(name, skip)
    ]
    # Every layer is quantized before any is replaced, so a layer that cannot
    # be (non-finite weights, a shape the scheme refuses) leaves the model as
    # it was; a Linear shared under several names gets one QuantizedLinear.
    done: dict[int, QuantizedLinear] = {}
    if targets:
        # The arguments first, on a stand-in row (256 columns: every group
        # size divides it), so an error they cause is not blamed on a layer.
        quantize(
            np.zeros((1, 256), np.float32),
            bits,
            group_size,
            scheme,
            scale_dtype=scale_dtype,
            search=search,
        )
    for name, mod in targets:
        if id(mod) not in done:
            try:
                done[id(mod)] = QuantizedLinear.from_linear(
                    mod, bits, group_size, scheme, scale_dtype=scale_dtype, search=search
                )
            except NeuropilError as e:
                # Which layer: from_linear's message names only its argument
                # (hint as `neuropil quantize --skip`).
                hint = glob.escape(name)
                raise type(e)(f"layer {name!r}: {e} (keep it in float with skip=[{hint!r}])") from e
    for name, mod in targets:
        _replace(model, name, done[id(mod)])
    _mark_transformers_model(model)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Writes a model's quantized layers and every other tensor of its state to one
    safetensors file (the format of ``neuropil quantize``).

    A bfloat16 tensor (a bf16 model's norms, embeddings, layers kept in float
    and their biases; a quantized layer keeps its bias in float32) is stored as
    the safetensors dtype ``BF16``, bit for bit, from its
    own bytes (no float32 copy); every other tensor (float16, float32,
    float64, integer, bool; on any device) in its own dtype.
    """
    entries: dict[str, Any] = {}
    covered: set[str] = set()
    aliases: list[str] = []
    packed: set[int] = set()
    # A layer shared under several names is written once, under its first name;
    # its other names are left out (load_quantized replaces the layer under
    # every name it has in the model), not written again as plain tensors.
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, QuantizedLinear):
            if id(mod) in packed:
                aliases.append(f"{name}.")
                continue
            packed.add(id(mod))
            entries[f"{name}.weight"] = mod.quantized()
            covered.update(f"{name}.{b}" for b in ("qdata", "scales", "mins", "_extra_state"))
    for key, t in model.state_dict().items():
        alias = key.startswith(tuple(aliases))
        if key not in covered and not alias and isinstance(t, torch.Tensor):
            # save_file keeps the dtype (bfloat16 as BF16 bits) and copies
            # a device tensor to the host
            entries[key] = t
    save_file(path, entries)


def load_quantized(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Loads a file of ``neuropil quantize`` / :func:`save_quantized` into ``model``:
    each quantized ``<name>.weight`` replaces the ``nn.Linear`` ``<name>``, other
    tensors load as state. A ``transformers`` model is then marked as quantized,
    as by :func:`quantize_model` (``save_pretrained`` / ``from_pretrained`` work).
    A quantized entry whose module is not a linear layer (an embedding table,
    which ``neuropil quantize`` packs like any large matrix) is dequantized into
    that module's float weight: packed in the file, not in memory (``--skip
    embed_tokens`` keeps it in float in the file too).

    A tensor is cast to the dtype of the model's tensor it fills, as
    ``load_state_dict`` casts: ``BF16`` ones are read as bfloat16 (into a
    bfloat16 model bit for bit, into a float32 one widened exactly, without a
    float32 copy of the file's tensor first); float32 ones of a bfloat16 model
    (files saved while bfloat16 was widened to float32) round back to the
    same bfloat16 values.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError``...), as from ``open``.
        FormatError: the file is malformed (a tensor whose shape differs from
            the model's, a malformed ``sparse_config`` of a
            :class:`~neuropil.torch.SparseMLP`...) or names a quantized layer
            the model lacks, or (``strict``) the other tensors of the file and
            the model differ: found before the model changes (a file whose
            tensors contradict each other, e.g. a shared layer's two copies,
            can still fail in the final ``load_state_dict``). A tensor
            naming a buffer the model does not save (BERT's ``position_ids``,
            kept from older checkpoints) is skipped, as transformers skips it.
    """
    entries = _load_entries(path, bf16_bits=True)
    plain: dict[str, torch.Tensor] = {}
    layers: dict[str, QuantizedLinear] = {}
    for key, v in entries.items():
        if isinstance(v, _safetensors.BF16):  # the file's bits, viewed as bfloat16
            plain[key] = torch.from_numpy(v.bits.view(np.int16)).view(torch.bfloat16)
            continue
        if not isinstance(v, QuantizedWeights):
            plain[key] = torch.from_numpy(np.ascontiguousarray(v))
            continue
        name = key.removesuffix(".weight")
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            if strict:
                raise FormatError(f"{path}: model has no layer {name!r}") from e
            continue
        weight = getattr(old, "weight", None)
        if not isinstance(old, (nn.Linear, QuantizedLinear)) and isinstance(weight, torch.Tensor):
            # A quantized table of another module (an embedding): its weight
            # takes the dequantized values (checked with the plain tensors).
            plain[key] = torch.from_numpy(v.dequantize())
            continue
        want = (getattr(old, "out_features", None), getattr(old, "in_features", None))
        if not isinstance(old, (nn.Linear, QuantizedLinear)) or want != tuple(v.shape):
            raise FormatError(
                f"{path}: layer {name!r} is {v.shape[0]}x{v.shape[1]} in the file; the model's "
                f"{name!r} is a {type(old).__name__} of (out, in) {want}"
            )
        bias = getattr(old, "bias", None)
        layers[name] = QuantizedLinear.from_quantized(
            v, bias if isinstance(bias, torch.Tensor) else None
        ).to(_device_of(old))
    # Checked before anything changes: the plain tensors' shapes too, and the
    # calibrations of sparsified FFNs (load_state_dict would refuse a bad one
    # after the layers were replaced).
    from ._torch_sparse import _CONFIG, SparseMLP, _parse_config

    # Every name a replaced layer goes by (a module shared by two attributes,
    # as save_quantized writes it: packed once, its other name's tensors plain).
    every = list(model.named_modules(remove_duplicate=False))
    for name, new in list(layers.items()):
        old = model.get_submodule(name)
        layers.update({n: new for n, m in every if m is old and n not in layers})
    own = model.state_dict(keep_vars=True)
    state = _state_after(own, layers)
    for key, t in plain.items():
        mine = state.get(key)
        if isinstance(mine, torch.Tensor) and tuple(mine.shape) != tuple(t.shape):
            raise FormatError(
                f"{path}: {key!r} has shape {tuple(t.shape)} in the file; "
                f"the model's is {tuple(state[key].shape)}"
            )
        owner, _, leaf = key.rpartition(".")
        if leaf == _CONFIG and key in state:
            if isinstance(model.get_submodule(owner), SparseMLP):
                _parse_config(t, f"{path}: {key}", FormatError)
    # A buffer the model does not save (BERT's position_ids, which older
    # checkpoints carry and `neuropil quantize` keeps) is skipped, as
    # transformers' own loading skips it.
    transient = {n for n, _ in model.named_buffers() if n not in own}
    plain = {k: t for k, t in plain.items() if k not in transient}
    if strict:
        unexpected, missing = _strict_mismatch(state, plain, layers)
        if unexpected or missing:
            raise FormatError(
                f"{path}: tensors the model lacks: {unexpected[:5]}; "
                f"model tensors the file lacks: {missing[:5]}"
            )
    if not strict and not layers and any(isinstance(v, QuantizedWeights) for v in entries.values()):
        warnings.warn(
            f"{path}: no quantized layer of the file matched a layer of the model "
            "(different names?); the model keeps its float layers",
            stacklevel=2,
        )
    for name, new in layers.items():
        _replace(model, name, new)
    model.load_state_dict(plain, strict=False)
    _mark_transformers_model(model)
    return model


def _state_after(own: dict[str, Any], layers: dict[str, QuantizedLinear]) -> dict[str, Any]:
    """A model's state (``own``) once each ``layers[name]`` replaces the layer ``name``
    (and everything under it: a parametrized weight's ``parametrizations.*``)."""

    def replaced(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))

    state = {k: t for k, t in own.items() if not replaced(k)}
    for name, new in layers.items():
        state.update({f"{name}.{k}": t for k, t in new.state_dict(keep_vars=True).items()})
    return state


def _strict_mismatch(
    state: dict[str, Any], plain: dict[str, torch.Tensor], layers: dict[str, QuantizedLinear]
) -> tuple[list[str], list[str]]:
    """The file's tensors the model lacks, and the model's the file lacks, in
    the model's ``state`` after the quantized ``layers`` replace theirs (whose
    packed tensors the file's quantized entries fill)."""
    covered = {f"{n}.{b}" for n in layers for b in ("qdata", "scales", "mins", "_extra_state")}
    # A tied tensor (lm_head sharing the embeddings) is loaded through its twin.
    # (a module's extra state need not be a tensor: save_quantized writes none
    # of those, so none is looked for)
    tensors = {k: t for k, t in state.items() if isinstance(t, torch.Tensor)}
    loaded = {tensors[k].data_ptr() for k in plain if k in tensors} - {0}
    unexpected = [k for k in plain if k not in state]
    missing = [
        k
        for k, t in tensors.items()
        if k not in plain and k not in covered and t.data_ptr() not in loaded
    ]
    return unexpected, missing


def _device_of(mod: nn.Module) -> torch.device:
    """The device of a module's first parameter, else first buffer (CPU for none)."""
    t: torch.Tensor | None = next(iter(mod.parameters()), None)
    if t is None:
        t = next(iter(mod.buffers()), None)
    return torch.device("cpu") if t is None else t.device

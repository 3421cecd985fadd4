"""``transformers`` integration of :class:`~neuropil.torch.QuantizedLinear`: the
quantization method ``"neuropil"`` (imports transformers).

A ``transformers`` model quantized with :func:`neuropil.torch.quantize_model` (or
filled by :func:`neuropil.torch.load_quantized`) is marked as quantized the way
transformers' own quantizers mark one (``model.hf_quantizer``,
``model.config.quantization_config``), so
``model.save_pretrained(dir)`` writes safetensors with the packed buffers and a
``config.json`` whose ``quantization_config`` is a :class:`NeuropilConfig`::

    import neuropil.hf  # registers "neuropil" with transformers
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(dir)  # QuantizedLinear layers again

:class:`NeuropilHfQuantizer` loads such checkpoints only (``requires_calibration``):
before the weights load it replaces each ``nn.Linear`` the config names by an
empty :class:`~neuropil.torch.QuantizedLinear` of the recorded format, into which
the checkpoint's ``qdata``, ``scales``, ``mins``, ``bias`` and ``_extra_state``
then load. Quantizing a float checkpoint is :func:`~neuropil.torch.quantize_model`'s
job, after loading it.

Each quantized layer also gets a zero-size ``<layer>.weight`` entry in the
checkpoint: transformers without neuropil skips an unknown quantization method
with a warning and would load the model in float with random weights where the
packed layers are; the placeholder's shape (0,) makes that load stop with a
size-mismatch error instead.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers import auto as _auto
from transformers.utils.quantization_config import QuantizationConfigMixin

from ._torch_quant import QuantizedLinear, _replace
from .errors import ArgumentError, FormatError
from .quant import _GGUF, SCHEMES, _skipped

__all__ = ["QUANT_METHOD", "NeuropilConfig", "NeuropilHfQuantizer", "mark_quantized", "register"]

#: The ``quant_method`` of neuropil's ``quantization_config``.
QUANT_METHOD = "neuropil"
_FORMAT = ("bits", "group_size", "scheme", "scale_dtype")


def _check_format(fmt: dict[str, Any], where: str) -> dict[str, Any]:
    """``fmt`` (bits, group_size, scheme, scale_dtype) checked, as a plain dict."""
    if not isinstance(fmt, dict) or set(fmt) != set(_FORMAT):
        raise FormatError(f"{where} must have the fields {', '.join(_FORMAT)}; got {fmt!r}")
    bits, g, scheme, sdt = (fmt[k] for k in _FORMAT)
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
        raise FormatError(f"{where}: bits must be one of 2, 3, 4, 8; got {bits!r}")
    if isinstance(g, bool) or g not in (32, 64, 128, 256):
        raise FormatError(f"{where}: group_size must be one of 32, 64, 128, 256; got {g!r}")
    if scheme not in SCHEMES:
        raise FormatError(f"{where}: scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    if scheme in _GGUF and (bits, g) != _GGUF[scheme]:
        raise FormatError(
            f"{where}: scheme {scheme!r} has bits, group_size {_GGUF[scheme]}; got {(bits, g)}"
        )
    if sdt not in ("float16", "float32"):
        raise FormatError(f"{where}: scale_dtype must be float16 or float32; got {sdt!r}")
    return {"bits": int(bits), "group_size": int(g), "scheme": scheme, "scale_dtype": sdt}


def _format_of(mod: QuantizedLinear) -> dict[str, Any]:
    sdt = str(mod.scales.dtype).removeprefix("torch.")
    return dict(zip(_FORMAT, (mod.bits, mod.group_size, mod.scheme, sdt), strict=True))


class NeuropilConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a model with :class:`~neuropil.torch.QuantizedLinear`
    layers (``quant_method="neuropil"``), as ``config.json`` carries it.

    :func:`~neuropil.torch.quantize_model` and :func:`~neuropil.torch.load_quantized`
    build it from the model (:meth:`from_model`); ``from_pretrained`` reads it back
    and :class:`NeuropilHfQuantizer` builds the layers it describes.

    Args:
        bits: code width of the quantized layers (2, 3, 4 or 8).
        group_size: weights per scale (32, 64, 128 or 256).
        scheme: ``asym``, ``sym``, ``q4_0``, ``q4_1`` or ``q8_0``
            (see :mod:`neuropil.quant`).
        scale_dtype: ``float16`` or ``float32`` scales and mins.
        modules_to_not_convert: ``nn.Linear`` modules kept in float: full module
            names or patterns matched as ``quantize_model``'s ``skip`` (a glob on
            the full name or on the name of an enclosing module, so
            ``"model.layers.0"`` keeps every layer of block 0, or one name
            component, e.g. ``"lm_head"``). Names are also tried with and
            without the model's ``base_model_prefix``.
        overrides: ``{module name: {bits, group_size, scheme, scale_dtype}}`` for
            layers whose format differs from the one above (a GGUF file loaded
            with ``load_quantized`` can mix formats).
        exact_names: ``modules_to_not_convert`` holds full module names only,
            matched exactly (what :meth:`from_model` records: a float layer
            called ``proj`` must not keep every ``*.proj`` in float).

    Raises:
        FormatError: a field is out of its domain.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        scheme: str = "asym",
        scale_dtype: str = "float16",
        modules_to_not_convert: list[str] | None = None,
        overrides: dict[str, dict[str, Any]] | None = None,
        exact_names: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # a registered name
        fmt = _check_format(
            {"bits": bits, "group_size": group_size, "scheme": scheme, "scale_dtype": scale_dtype},
            "neuropil quantization_config",
        )
        self.bits, self.group_size = fmt["bits"], fmt["group_size"]
        self.scheme, self.scale_dtype = fmt["scheme"], fmt["scale_dtype"]
        skip = [] if modules_to_not_convert is None else modules_to_not_convert
        if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
            raise FormatError(
                "modules_to_not_convert must be a list of module names; "
                f"got {modules_to_not_convert!r}"
            )
        self.modules_to_not_convert = list(skip)
        if not isinstance(exact_names, bool):
            raise FormatError(f"exact_names must be true or false; got {exact_names!r}")
        self.exact_names = exact_names
        if overrides is not None and not isinstance(overrides, dict):
            raise FormatError(f"overrides must map module names to formats; got {overrides!r}")
        self.overrides = {
            str(k): _check_format(v, f"overrides[{k!r}]") for k, v in (overrides or {}).items()
        }
        for k, v in kwargs.items():  # fields of a later version, kept for the round trip
            setattr(self, k, v)

    @property
    def default_format(self) -> dict[str, Any]:
        """The format of every quantized layer not in :attr:`overrides`."""
        return {k: getattr(self, k) for k in _FORMAT}

    def format_for(self, name: str, prefix: str = "") -> dict[str, Any] | None:
        """The format of the ``nn.Linear`` called ``name``, or ``None`` where it stays
        in float; ``prefix``: the model's ``base_model_prefix`` (names are tried
        with and without it, so a checkpoint of ``...ForCausalLM`` loads into the
        base model and back)."""
        names = _aliases(name, prefix)
        floats = self.modules_to_not_convert
        if self.exact_names:
            if any(n in floats for n in names):
                return None
        elif any(_skipped(n, floats) for n in names):
            return None
        for n in names:
            if n in self.overrides:
                return dict(self.overrides[n])
        return self.default_format

    @classmethod
    def from_model(cls, model: nn.Module) -> NeuropilConfig | None:
        """The config of ``model`` as it is: the most common format of its
        :class:`~neuropil.torch.QuantizedLinear` layers, the others as
        ``overrides``, its float ``nn.Linear`` layers as ``modules_to_not_convert``;
        ``None`` when it has no quantized layer."""
        quantized: dict[str, dict[str, Any]] = {}
        floats: list[str] = []
        for name, mod in model.named_modules(remove_duplicate=False):
            if isinstance(mod, QuantizedLinear):
                quantized[name] = _format_of(mod)
            elif isinstance(mod, nn.Linear):
                floats.append(name)
        if not quantized:
            return None
        counts = Counter(tuple(f[k] for k in _FORMAT) for f in quantized.values())
        default = dict(zip(_FORMAT, counts.most_common(1)[0][0], strict=True))
        overrides = {n: f for n, f in quantized.items() if f != default}
        return cls(**default, modules_to_not_convert=floats, overrides=overrides, exact_names=True)


class NeuropilHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``quant_method="neuropil"``: loads checkpoints
    written by ``save_pretrained`` of a model quantized with
    :func:`~neuropil.torch.quantize_model` (pre-quantized only).

    Before the weights load, each ``nn.Linear`` that the :class:`NeuropilConfig`
    does not keep in float becomes an empty
    :class:`~neuropil.torch.QuantizedLinear` of its recorded format; the
    checkpoint's packed buffers then load into it. Serializable, not trainable,
    compilable (``torch.compile`` sees the CPU kernel as one operator).

    Raises:
        ArgumentError: built for a float checkpoint (``from_pretrained(float_dir,
            quantization_config=NeuropilConfig(...))``): quantize after loading.
    """

    requires_calibration = True
    quantization_config: NeuropilConfig

    def __init__(self, quantization_config: NeuropilConfig, **kwargs: Any) -> None:
        if not kwargs.get("pre_quantized", True):
            raise ArgumentError(
                "the neuropil quantization method loads pre-quantized checkpoints only (saved with "
                "save_pretrained after neuropil.torch.quantize_model); to quantize a float model, "
                "load it without quantization_config and call "
                "neuropil.torch.quantize_model(model, bits=..., group_size=..., skip=[...])"
            )
        super().__init__(quantization_config, **kwargs)

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        cfg = self.quantization_config
        prefix = getattr(model, "base_model_prefix", "") or ""
        # The checkpoint's packed layers (read from the safetensors headers): a
        # Linear the checkpoint lacks (a new head, e.g. a classifier on a
        # quantized encoder) stays a float nn.Linear, initialized as usual.
        packed = _packed_layers(kwargs.get("checkpoint_files"))
        if packed is not None and not packed:
            raise FormatError(
                "config.json names the neuropil quantization method, but the checkpoint holds "
                "no packed layer (no '<layer>.qdata' tensor): a float checkpoint? Load it without "
                "that quantization_config and call neuropil.torch.quantize_model(model, ...)"
            )
        targets = []
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            fmt = cfg.format_for(name, prefix)
            in_file = packed is None or not packed.isdisjoint(_aliases(name, prefix))
            if fmt is not None and in_file:
                targets.append((name, mod, fmt))
        for name, mod, fmt in targets:
            new = QuantizedLinear(
                mod.in_features,
                mod.out_features,
                mod.bias is not None,
                device=mod.weight.device,
                **fmt,
            )
            new.requires_grad_(False)
            _replace(model, name, new)
        if not targets:
            warnings.warn(
                "the neuropil quantization_config converts none of this model's nn.Linear layers",
                stacklevel=2,
            )
        _drop_ties(model)
        # The checkpoint's zero-size `<layer>.weight` placeholders (see the module
        # docstring) are expected: no "unexpected keys" report for them.
        stems = {name.removeprefix(prefix + ".") if prefix else name for name, _, _ in targets}
        if stems:
            pattern = r"(^|\.)(" + "|".join(sorted(map(re.escape, stems))) + r")\.weight$"
            ignore = set(model._keys_to_ignore_on_load_unexpected or ())
            model._keys_to_ignore_on_load_unexpected = ignore | {pattern}
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        # transformers sets `is_quantized` only to refuse `.half()` and `.float()`,
        # which QuantizedLinear supports: a loaded model casts as a quantized one does.
        model.is_quantized = False
        missing = []
        for name, mod in model.named_modules():
            if not isinstance(mod, QuantizedLinear):
                continue
            if mod.bias is not None:
                mod.bias.requires_grad_(False)
            q = mod.qdata
            if q.device.type != "meta" and not getattr(q, "_is_hf_initialized", False):
                missing.append(name)
        if missing:
            raise FormatError(
                f"the checkpoint has no packed weights (qdata) for {len(missing)} layer(s) the "
                f"neuropil quantization_config quantizes, e.g. {missing[:3]}: the config and the "
                "weights disagree"
            )
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, Any], dict[str, str]]:
        """The model's state plus a zero-size ``<layer>.weight`` per quantized layer
        (a float loader stops at it; see the module docstring)."""
        state = model.state_dict()
        for name, mod in model.named_modules():
            if isinstance(mod, QuantizedLinear):
                state[f"{name}.weight" if name else "weight"] = torch.empty(0, dtype=torch.uint8)
        return state, {}

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        """``model.dequantize()``: every QuantizedLinear back to an ``nn.Linear``
        holding its dequantized weight (in ``dtype``, float32 by default)."""
        if isinstance(dtype, str):  # config.dtype may be a name
            dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            dtype = torch.float32
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, QuantizedLinear):
                continue
            lin = nn.Linear(
                mod.in_features,
                mod.out_features,
                mod.bias is not None,
                device=mod.qdata.device,
                dtype=dtype,
            )
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight(dtype))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            _replace(model, name, lin)
        return model


def _aliases(name: str, prefix: str) -> list[str]:
    """``name`` with and without the model's ``base_model_prefix`` (a checkpoint
    of ``...ForCausalLM`` loads into the base model and back)."""
    if not prefix:
        return [name]
    return [name, f"{prefix}.{name}", name.removeprefix(prefix + ".")]


def _packed_layers(files: Any) -> set[str] | None:
    """The layers with a ``qdata`` tensor in the safetensors checkpoint ``files``
    (headers only), or ``None`` where they cannot be listed (no files, another format)."""
    if not files or not all(str(f).endswith(".safetensors") for f in files):
        return None
    from safetensors import SafetensorError, safe_open

    out: set[str] = set()
    try:
        for f in files:
            with safe_open(f, framework="pt") as fh:
                out.update(k.removesuffix(".qdata") for k in fh.keys() if k.endswith(".qdata"))
    except (OSError, SafetensorError):
        return None  # transformers' loader reports the file itself
    return out


def _drop_ties(model: nn.Module) -> None:
    """Forgets the weight ties (``lm_head`` to the embeddings) whose tied module
    is a QuantizedLinear now: it has no ``weight`` to tie, and its packed
    buffers are saved and loaded as its own."""
    for sub in model.modules():
        tied = getattr(sub, "all_tied_weights_keys", None)
        if not isinstance(tied, dict):
            continue
        for target, source in list(tied.items()):
            for key in (target, source):
                owner = key.rpartition(".")[0]
                try:
                    mod = sub.get_submodule(owner) if owner else sub
                except AttributeError:
                    continue
                if isinstance(mod, QuantizedLinear):
                    tied.pop(target, None)


def _holds_float_weights(quantizer: HfQuantizer) -> bool:
    """Whether a model loaded by ``quantizer`` holds plain float weights: a GGUF
    file unpacked at load (transformers' legacy GGUF loader, or ``dequantize``)
    keeps a GGUF quantizer that makes ``save_pretrained`` refuse the model."""
    cfg = quantizer.quantization_config
    method = getattr(cfg, "quant_method", None)
    if getattr(method, "value", method) != "gguf":
        return False
    return bool(getattr(cfg, "dequantize", False)) or not getattr(quantizer, "packed_modules", None)


def mark_quantized(model: Any) -> None:
    """Marks a transformers ``PreTrainedModel`` with QuantizedLinear layers as
    quantized by neuropil, as ``from_pretrained`` marks a model its quantizer
    loaded: ``model.config.quantization_config`` (a :class:`NeuropilConfig` of the
    layers as they are now), ``model.hf_quantizer``,
    ``model.quantization_method`` (not ``model.is_quantized``, with which
    transformers refuses ``.half()`` and ``.float()``: QuantizedLinear supports
    them). A model without QuantizedLinear layers, or one quantized by another
    method, is left as it is (a GGUF file unpacked to float at load, as
    transformers' GGUF loader leaves it, is not: its GGUF marking, which
    ``save_pretrained`` refuses, gives way)."""
    cfg = NeuropilConfig.from_model(model)
    if cfg is None:
        return
    other = getattr(model, "hf_quantizer", None)
    if other is not None and not isinstance(other, NeuropilHfQuantizer):
        if not _holds_float_weights(other):
            method = getattr(other.quantization_config, "quant_method", "?")
            warnings.warn(
                f"the model is quantized with {getattr(method, 'value', method)!s} too: its "
                "quantization_config stays, and from_pretrained will not rebuild neuropil's layers",
                stacklevel=4,
            )
            return
        other.remove_quantization_config(model)
    model.config.quantization_config = cfg
    model.hf_quantizer = NeuropilHfQuantizer(cfg, pre_quantized=True)
    # Not `model.is_quantized`: transformers reads it only to refuse `.half()`
    # and `.float()`, which QuantizedLinear supports (its packed format is kept).
    model.quantization_method = QUANT_METHOD
    for sub in model.modules():  # as transformers' quantizers mark every sub-model's config
        if isinstance(sub, PreTrainedModel):
            sub.config._is_quantized = True
    _drop_ties(model)


def register() -> None:
    """Registers :class:`NeuropilConfig` and :class:`NeuropilHfQuantizer` as
    transformers' quantization method ``"neuropil"`` (idempotent)."""
    if _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not NeuropilConfig:
        _auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(NeuropilConfig)
    if _auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not NeuropilHfQuantizer:
        _auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(NeuropilHfQuantizer)


register()

"""Sparse decode attention for ``transformers`` (>= 5), on exact range search.

Usage::

    from neuropil import hf
    model.set_attn_implementation(hf.ATTENTION)  # or from_pretrained(attn_implementation=...)
    cache = hf.SparseCache(model, strategy="top_p", top_p=0.99)
    out = model.generate(**inputs, **hf.cache_kwargs(model, cache), max_new_tokens=50)
    print(cache.summary())                            # fraction of keys read, dropped-mass bound

:class:`SparseCache` is a ``transformers.Cache`` made of :class:`SparseLayer`
layers (``CacheLayerMixin``). Each layer keeps one :class:`~neuropil.range.RangeIndex`
per batch row and kv head, built at the first decode step and extended as tokens
append (beam search carries them along with their rows). The
attention function registered as :data:`ATTENTION` (with a matching mask
function) runs prefill densely (sdpa) and, at each decode step, reads only the
keys the strategy selects, plus the attention sinks and a recent window:

- ``"threshold"``: keys with logit ``scaling * q.k >= threshold``;
- ``"top_k"``: the ``top_k`` keys of highest logit;
- ``"top_p"``: every key whose logit is within ``log(n / (1 - top_p))`` of the
  best one: the keys left out then hold at most ``1 - top_p`` of the softmax
  mass (certified: ``n_dropped * exp(z_t) <= (1 - top_p) * exp(z_max)``);
- ``None``: every key (dense sdpa; reproduces ``DynamicCache`` exactly).

Each step records, per layer, batch row and query head, the fraction of keys
read and an upper bound on the softmax mass dropped:
``n_dropped e^{z_t} / (S + n_dropped e^{z_t})`` with ``S`` the selected mass and
``z_t`` a logit no dropped key reaches. CUDA tensors take a torch path
(:func:`sparse_decode_attention`) that stays on the device.

Importing this module also registers the quantization method ``"neuropil"``
(:class:`NeuropilConfig`, :class:`NeuropilHfQuantizer`), so ``from_pretrained``
loads what ``save_pretrained`` wrote for a model quantized with
:func:`neuropil.torch.quantize_model`::

    import neuropil.hf
    model = AutoModelForCausalLM.from_pretrained("smollm2-q4")  # QuantizedLinear layers
"""

from __future__ import annotations

import math
import threading
from typing import Any, cast

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ._hf_quant import NeuropilConfig, NeuropilHfQuantizer
from .errors import ArgumentError, DTypeError, NeuropilError, ShapeError, _shown
from .range import METHODS, RangeIndex

__all__ = [
    "ATTENTION",
    "STRATEGIES",
    "NeuropilConfig",
    "NeuropilHfQuantizer",
    "SparseCache",
    "SparseLayer",
    "cache_kwargs",
    "sparse_decode_attention",
]

#: Name of the attention function (and mask function) registered in transformers.
ATTENTION = "neuropil_sparse"
STRATEGIES = (None, "threshold", "top_k", "top_p")


class SparseLayer(DynamicLayer):
    """One layer's keys and values (``(batch, kv_heads, n, head_dim)``) plus a
    range index per batch row and kv head."""

    def __init__(self, cache: SparseCache | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cache = cache
        self.indexes: list[list[RangeIndex]] = []
        # Held while index() builds or extends the indexes: two threads reading
        # one layer would otherwise both append the new keys (ids past the end).
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # (copy.deepcopy of a prefilled cache, pickling: a lock copies as a new one)
        # (object.__getstate__ is Python 3.11+, as transformers >= 5 is; mypy checks for 3.10)
        state = dict(super().__getstate__())  # type: ignore[misc]
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        # The indexes are built, or extended by the new keys, when a decode step
        # first reads them (index()): a verification pass of assisted decoding,
        # cropped right after, costs no build.
        keys._neuropil_layer = self  # the attention function finds its layer here
        return keys, values

    def _build(self) -> None:
        assert self.cache is not None and self.keys is not None
        k = self.keys.detach().to(torch.float32)
        self.indexes = [
            [RangeIndex(k[b, h].numpy(), self.cache.method) for h in range(k.shape[1])]
            for b in range(k.shape[0])
        ]

    def index(self, b: int, h: int) -> RangeIndex:
        """The index of batch row ``b``, kv head ``h``, brought up to date."""
        assert self.keys is not None
        with self._lock:
            if not self.indexes:
                self._build()
            ix = self.indexes[b][h]
            n = self.keys.shape[-2]
            if len(ix) < n:
                ix.add(self.keys[b, h, len(ix) : n].detach().to(torch.float32).numpy())
        return ix

    def reset(self) -> None:
        super().reset()
        self.indexes = []

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        # An index of no key past the new end stays valid: assisted decoding crops the
        # rejected candidates, which only a dense verification pass has seen.
        n = self.get_seq_length()
        if any(len(ix) > n for row in self.indexes for ix in row):
            self.indexes = []

    def _take_rows(self, rows: list[int]) -> None:
        """Keeps the indexes of batch rows ``rows``, in that order, as the keys
        were: a row taken once keeps its index, each further time it gets a
        copy (cloned, not rebuilt: beam search reorders at every step)."""
        taken: set[int] = set()
        new = []
        for r in rows:
            new.append([ix._copy() for ix in self.indexes[r]] if r in taken else self.indexes[r])
            taken.add(r)
        self.indexes = new

    def _rows(self, indices) -> list[int]:
        # Whatever indexes the batch dimension of the keys (ids, a bool mask...).
        return torch.arange(len(self.indexes))[torch.as_tensor(indices).cpu()].tolist()

    def reorder_cache(self, beam_idx) -> None:
        super().reorder_cache(beam_idx)
        if self.indexes:
            self._take_rows(self._rows(beam_idx))

    def batch_select_indices(self, indices) -> None:
        super().batch_select_indices(indices)
        if self.indexes:
            self._take_rows(self._rows(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.indexes:
            self._take_rows([r for r in range(len(self.indexes)) for _ in range(repeats)])


class SparseCache(Cache):
    """A ``transformers`` cache whose decode steps read only the keys that matter.

    Args:
        model: The model (or its config). Must be a decoder with full attention
            in every layer and ``attn_implementation`` set to :data:`ATTENTION`
            (``model.set_attn_implementation(neuropil.hf.ATTENTION)``).
        strategy: ``"top_p"`` (default), ``"top_k"``, ``"threshold"`` or ``None``
            (all keys).
        top_p: Softmax mass kept, in (0, 1).
        top_k: Key budget per query head (besides sinks and window).
        threshold: Logit threshold (``scaling * q.k``) for ``"threshold"``.
        sinks: First keys of each row always read (attention sinks): its first
            unmasked keys, so under left padding its first real tokens.
        window: Most recent keys always read (the current token's own key is
            read even with ``window=0``).
        method: :class:`~neuropil.range.RangeIndex` method.

    Raises:
        ArgumentError: bad strategy parameters.
        NeuropilError: an unsupported model (what it lacks is named).
    """

    def __init__(
        self,
        model: Any,
        strategy: str | None = "top_p",
        *,
        top_p: float = 0.99,
        top_k: int = 256,
        threshold: float | None = None,
        sinks: int = 4,
        window: int = 32,
        method: str = "auto",
    ) -> None:
        config = getattr(model, "config", model)
        _check_model(model, config)
        strategy, top_p, top_k, threshold, sinks, window = _check_strategy(
            strategy, top_p, top_k, threshold, sinks, window
        )
        if not isinstance(method, str) or method not in METHODS:
            raise ArgumentError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        self.strategy, self.top_p, self.top_k, self.threshold = strategy, top_p, top_k, threshold
        self.sinks, self.window, self.method = sinks, window, method
        n_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[SparseLayer(self) for _ in range(n_layers)])
        #: One dict per decode step: ``fraction_read`` (mean over layers, rows,
        #: heads), ``dropped_bound`` (max), ``keys`` (n).
        self.steps: list[dict[str, float]] = []
        self._current: list[tuple[float, float]] = []
        self._step_layer = -1

    # Per-step bookkeeping, called by the attention function.
    def _record(self, layer_idx: int, n: int, fractions: list[float], bounds: list[float]) -> None:
        if layer_idx <= self._step_layer:
            self._flush()
        self._step_layer = layer_idx
        self._n = n
        self._current.extend(zip(fractions, bounds, strict=True))

    def _flush(self) -> None:
        if self._current:
            f = [x[0] for x in self._current]
            b = [x[1] for x in self._current]
            self.steps.append(
                {
                    "fraction_read": float(np.mean(f)),
                    "dropped_bound": float(max(b)),
                    "keys": self._n,
                }
            )
        self._current = []
        self._step_layer = -1

    def reset(self) -> None:
        """Empties the cache for a new generation, its statistics included."""
        super().reset()
        self.steps = []
        self._current = []
        self._step_layer = -1

    def summary(self) -> dict[str, float]:
        """``steps`` (decode steps since the cache was made or reset), the mean
        ``fraction_read`` of keys and the largest ``dropped_bound`` over them
        (1.0 and 0.0 before any step)."""
        self._flush()
        if not self.steps:
            return {"steps": 0, "fraction_read": 1.0, "dropped_bound": 0.0}
        return {
            "steps": len(self.steps),
            "fraction_read": float(np.mean([s["fraction_read"] for s in self.steps])),
            "dropped_bound": float(max(s["dropped_bound"] for s in self.steps)),
        }


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)`` and ``model.generate(...)``, under the name
    the model takes: ``cache`` from transformers 5.24, ``past_key_values`` before
    (5.24 still accepts the old name, with a FutureWarning, until its removal).

    Example: ``model.generate(**inputs, **hf.cache_kwargs(model, cache))``.
    """
    import inspect

    forward = getattr(model, "forward", None)
    if not callable(forward):
        raise ArgumentError(
            "model must be a transformers model (with a forward method); "
            f"got {type(model).__name__}"
        )
    params = inspect.signature(forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def _check_strategy(
    strategy: Any, top_p: Any, top_k: Any, threshold: Any, sinks: Any, window: Any
) -> tuple[str | None, float, int, float | None, int, int]:
    """Validates the strategy parameters (those the strategy uses, plus sinks
    and window) and returns them as Python numbers."""
    if not (strategy is None or isinstance(strategy, str)) or strategy not in STRATEGIES:
        raise ArgumentError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    if strategy == "top_p":
        if not _is_real(top_p) or not 0.0 < float(top_p) < 1.0:
            raise ArgumentError(f"top_p must be a number in (0, 1); got {_shown(top_p)}")
        top_p = float(top_p)
    if strategy == "top_k":
        if not _is_int(top_k) or top_k < 1:
            raise ArgumentError(f"top_k must be a positive integer; got {_shown(top_k)}")
        top_k = int(top_k)
    if strategy == "threshold":
        if not _is_real(threshold) or not math.isfinite(float(threshold)):
            raise ArgumentError(
                f"threshold must be a finite logit (a number); got {_shown(threshold)}"
            )
        threshold = float(threshold)
    for name, v in (("sinks", sinks), ("window", window)):
        if not _is_int(v) or v < 0:
            raise ArgumentError(f"{name} must be an integer >= 0; got {_shown(v)}")
    return strategy, top_p, top_k, threshold, int(sinks), int(window)


_F32_MAX = float(np.finfo(np.float32).max)


def _f32(v: float) -> float:
    """``v`` clipped to the finite float32 range: a float32 logit never exceeds it, so
    a threshold beyond it selects the same keys as the bound (and stays finite)."""
    return min(max(v, -_F32_MAX), _F32_MAX)


def _check_tensors(query: Any, key: Any, value: Any) -> None:
    """``query``, ``key``, ``value`` must be floating torch tensors: numpy arrays
    or lists would fail deep inside with errors naming no argument, and an
    integer or complex tensor would be cast (a complex one losing its imaginary part)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise DTypeError(f"{name} must be a floating-point tensor; got {t.dtype}")


def _check_mask(mask: Any, bsz: int, n: int) -> None:
    """``attention_mask``: ``(batch, 1, q, >= n)`` bool or float (transformers' 4-D masks)."""
    if not isinstance(mask, torch.Tensor):
        raise DTypeError(
            f"attention_mask must be a torch.Tensor or None; got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise DTypeError(
            f"attention_mask must be bool (True = attend) or an additive float mask; "
            f"got {mask.dtype}"
        )
    if mask.ndim != 4 or mask.shape[0] != bsz or mask.shape[1] != 1 or mask.shape[3] < n:
        raise ShapeError(
            f"attention_mask must have shape ({bsz}, 1, q, >= {n}) to match query and key; "
            f"got {tuple(mask.shape)}"
        )


def _check_model(model: Any, config: Any) -> None:
    if not hasattr(config, "get_text_config"):
        raise ArgumentError(
            "model must be a transformers model or config (SparseCache reads its text config); "
            f"got {type(model).__name__}"
        )
    text = config.get_text_config(decoder=True)
    missing = [
        a
        for a in ("num_hidden_layers", "num_attention_heads", "hidden_size")
        if getattr(text, a, None) is None
    ]
    if missing:
        raise NeuropilError(
            f"SparseCache does not support model type {getattr(text, 'model_type', '?')!r}: "
            f"its config lacks {', '.join(missing)}"
        )
    model_type = getattr(text, "model_type", "?")
    if getattr(text, "kv_lora_rank", None):
        # The cache would hold the latents, and the attention gets keys expanded from them.
        raise NeuropilError(
            f"SparseCache does not support multi-head latent attention (model type "
            f"{model_type!r}, kv_lora_rank={text.kv_lora_rank}): its cache holds latents, not keys"
        )
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        # The layers' own types decide (a config may carry a sliding_window that no layer uses).
        other = sorted({t for t in layer_types if t != "full_attention"})
    elif getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        other = ["sliding_attention"]  # no layer_types (Mistral): the window is in every layer
    else:
        other = []
    if other:
        raise NeuropilError(
            f"SparseCache supports full attention in every layer; model type "
            f"{model_type!r} has {other} layers"
        )
    impl = getattr(config, "_attn_implementation", None)
    if model is not config and impl != ATTENTION:
        raise NeuropilError(
            f"model attn_implementation must be {ATTENTION!r} for SparseCache; got {impl!r} "
            f"(call model.set_attn_implementation(neuropil.hf.ATTENTION))"
        )


# ----------------------------------------------------------------- attention
def _select_cpu(
    layer: SparseLayer,
    cache: SparseCache,
    q: np.ndarray,
    b: int,
    h: int,
    n: int,
    scaling: float,
    allowed: np.ndarray | None,
    n_ok: int,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Selected key ids per query row of kv head ``h`` and the logit no
    dropped key reaches (per row). ``allowed`` (bool, ``(n,)``) masks keys out
    (padding): ``top_k`` then picks the best ``top_k`` allowed keys, as the
    torch path does. ``n_ok``: how many keys ``allowed`` keeps (``n`` for
    None), counted once per batch row by the caller, not per kv head."""
    ix = layer.index(b, h)
    rows = q.shape[0]
    n_masked = n - n_ok
    if cache.strategy == "top_k":
        # Among the best top_k + n_masked keys are the best top_k allowed ones.
        ids, scores = ix.topk(q, min(cache.top_k + n_masked, n))
        if n_masked == 0:
            return [ids[r] for r in range(rows)], scores[:, -1].astype(np.float64) * scaling
        assert allowed is not None
        sel, z_t = [], np.full(rows, -np.inf)
        for r in range(rows):
            keep = allowed[ids[r]]
            sel.append(ids[r][keep][: cache.top_k])
            kept = scores[r][keep][: cache.top_k]
            if len(kept):
                z_t[r] = float(kept[-1]) * scaling
        return sel, z_t
    if cache.strategy == "threshold":
        # Within float32 (a logit threshold past it selects what +-F32_MAX does:
        # nothing or everything), so the search never gets an infinite one.
        # (a cast: _check_strategy gave the "threshold" strategy a float threshold)
        t = np.full(rows, _f32(cast(float, cache.threshold) / scaling), dtype=np.float32)
    else:  # top_p
        # Only the allowed keys can be dropped, so they alone count in the margin (as in the
        # torch path): padding does not widen a row's selection.
        _, best = ix.topk(q, 1)
        margin = math.log1p(-cache.top_p) - math.log(n_ok)
        t = best[:, 0].astype(np.float64) + margin / scaling
        t = t.astype(np.float32)
    lims, ids, _ = ix.search(q, t)
    return [ids[lims[r] : lims[r + 1]] for r in range(rows)], t.astype(np.float64) * scaling


def _gather(key, value, query, b, h, groups, r, sel, forced, allowed, scaling):
    ids = np.union1d(sel, forced)
    if allowed is not None:
        ids = ids[allowed[ids]]
    idt = torch.from_numpy(ids)
    ks, vs = key[b, h].index_select(0, idt), value[b, h].index_select(0, idt)
    z = (ks.float() @ query[b, h * groups + r, 0].float()) * scaling
    return ids, z, float(z.max()), vs


#: Attention arguments some models pass that change the scores: neither the sparse decode
#: path nor (for sinks) sdpa applies them, so they are refused rather than dropped.
_UNSUPPORTED = (
    ("s_aux", "learned attention sinks"),
    ("softcap", "logit soft-capping"),
    ("position_bias", "an additive position bias"),
)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(key, "_neuropil_layer", None)
    if layer is None or layer.cache is None:
        raise NeuropilError(
            f"attn_implementation={ATTENTION!r} needs a neuropil.hf.SparseCache as the model's "
            "cache (hf.cache_kwargs(model, cache); use_cache=True); got keys from another "
            "cache or none"
        )
    cache: SparseCache = layer.cache
    for name, what in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise NeuropilError(
                f"attn_implementation={ATTENTION!r} does not support {what} "
                f"({name}, passed by {type(module).__name__}); use the model's own attention"
            )
    if query.shape[2] != 1 or cache.strategy is None:
        if query.shape[2] == 1:
            cache._record(module.layer_idx, key.shape[2], [1.0], [0.0])
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scaling = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if query.device.type != "cpu":
        out, info = sparse_decode_attention(
            query,
            key,
            value,
            scaling,
            strategy=cache.strategy,
            top_p=cache.top_p,
            top_k=cache.top_k,
            threshold=cache.threshold,
            sinks=cache.sinks,
            window=cache.window,
            attention_mask=attention_mask,
        )
        cache._record(
            module.layer_idx, key.shape[2], [info["fraction_read"]], [info["dropped_bound"]]
        )
        return out, None
    bsz, n_heads, _, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    groups = n_heads // kv_heads
    out = torch.empty(bsz, 1, n_heads, d, dtype=query.dtype)
    fractions, bounds = [], []
    # The current token is always read, so no query with an allowed key attends to nothing.
    recent = np.arange(max(0, n - max(cache.window, 1)), n)
    for b in range(bsz):
        allowed = None
        if attention_mask is not None:
            m = attention_mask[b, 0, -1, :n]
            allowed = (m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2).numpy()
        n_ok = n if allowed is None else int(allowed.sum())
        if n_ok == 0:
            # Every key masked (an all-padding row): zeros, as sdpa and the torch path give;
            # the row has no fraction to report.
            out[b] = 0
            continue
        # The sinks are the row's first allowed keys: under left padding, its first real
        # tokens (not padding), so a padded row reads what it would read unpadded.
        first = 0 if allowed is None else int(allowed.argmax())
        forced = np.union1d(np.arange(first, min(first + cache.sinks, n)), recent)
        for h in range(kv_heads):
            q = query[b, h * groups : (h + 1) * groups, 0].detach().to(torch.float32).numpy()
            sel, z_t = _select_cpu(layer, cache, q, b, h, n, scaling, allowed, n_ok)
            for r in range(groups):
                ids, z, zmax, vs = _gather(
                    key, value, query, b, h, groups, r, sel[r], forced, allowed, scaling
                )
                if cache.strategy == "top_p" and allowed is not None:
                    # The best key may be masked (padding): certify against the best allowed one.
                    t2 = zmax + math.log1p(-cache.top_p) - math.log(n_ok)
                    if t2 < z_t[r]:
                        z_t[r] = t2
                        _, more, _ = layer.index(b, h).search(q[r : r + 1], t2 / scaling)
                        ids, z, zmax, vs = _gather(
                            key, value, query, b, h, groups, r, more, forced, allowed, scaling
                        )
                w = torch.softmax(z, dim=0)
                # float32 accumulation, one rounding: a bfloat16 (or float16) vector-matrix
                # product on the CPU is ~40x slower than the float32 one, and no more exact.
                out[b, 0, h * groups + r] = (w @ vs.float()).to(query.dtype)
                n_drop = n_ok - len(ids)
                s_sel = float(torch.exp(z - zmax).sum())
                e = n_drop * math.exp(min(float(z_t[r]) - zmax, 0.0)) if n_drop > 0 else 0.0
                fractions.append(len(ids) / n_ok)
                bounds.append(e / (s_sel + e))
    if not fractions:  # every row fully masked: 0.0, as the torch path reports
        fractions, bounds = [0.0], [0.0]
    cache._record(module.layer_idx, n, fractions, bounds)
    return out, None


def sparse_decode_attention(
    query,
    key,
    value,
    scaling: float,
    *,
    strategy: str | None = "top_p",
    top_p: float = 0.99,
    top_k: int = 256,
    threshold: float | None = None,
    sinks: int = 4,
    window: int = 32,
    attention_mask=None,
):
    """Decode attention over the selected keys only, in torch (any device).

    Args:
        query: ``(batch, heads, 1, d)``.
        key, value: ``(batch, kv_heads, n, d)``; ``heads`` a multiple of ``kv_heads``.
        scaling: Logit scale (usually ``d ** -0.5``).
        strategy, top_p, top_k, threshold, sinks, window: as :class:`SparseCache`.
        attention_mask: Optional ``(batch, 1, 1, n)`` bool (True = attend) or additive float mask.

    Returns:
        ``(out, info)``: ``out`` ``(batch, 1, heads, d)``; ``info`` with
        ``fraction_read`` (mean over rows that have an allowed key) and
        ``dropped_bound`` (max over heads). A row whose keys are all masked
        gives zeros, as torch's ``scaled_dot_product_attention`` does.

    An empty batch gives an empty ``out``; ``sinks`` and ``window`` past ``n``
    read every key; a ``threshold`` beyond float32 selects what the largest
    float32 logit of its sign would.

    Raises:
        ArgumentError: an unknown strategy or a parameter out of its domain.
        ShapeError: inconsistent query, key, value and attention_mask shapes.
        DTypeError: query, key or value is not a floating-point torch tensor, or
            attention_mask is neither a bool nor a float tensor.
    """
    strategy, top_p, top_k, threshold, sinks, window = _check_strategy(
        strategy, top_p, top_k, threshold, sinks, window
    )
    if not _is_real(scaling) or not math.isfinite(float(scaling)):
        raise ArgumentError(f"scaling must be a finite number; got {_shown(scaling)}")
    _check_tensors(query, key, value)
    if query.ndim != 4 or query.shape[2] != 1:
        raise ShapeError(f"query must have shape (batch, heads, 1, d); got {tuple(query.shape)}")
    bsz, n_heads, _, d = query.shape
    if key.ndim != 4 or key.shape[0] != bsz or key.shape[3] != d or 0 in key.shape[1:3]:
        raise ShapeError(
            f"key must have shape ({bsz}, kv_heads >= 1, n >= 1, {d}) to match the query; "
            f"got {tuple(key.shape)}"
        )
    if n_heads % key.shape[1]:
        raise ShapeError(
            f"query heads must be a multiple of the key's kv heads ({key.shape[1]}); got {n_heads}"
        )
    if tuple(value.shape) != tuple(key.shape):
        raise ShapeError(
            f"value must have the key's shape {tuple(key.shape)}; got {tuple(value.shape)}"
        )
    kv, n = key.shape[1], key.shape[2]
    if attention_mask is not None:
        _check_mask(attention_mask, bsz, n)
    if bsz == 0:
        # An empty batch: an empty output, as sdpa gives (the reductions
        # below have no rows); nothing read, nothing dropped.
        return query.new_empty(0, 1, n_heads, d), {"fraction_read": 0.0, "dropped_bound": 0.0}
    # Past n, sinks and window read every key: the same selection, and no
    # Python int too large for the tensors below (2**70 overflowed them).
    sinks, window = min(sinks, n), min(window, n)
    g = n_heads // kv
    q = query.reshape(bsz, kv, g, d).float()
    z = torch.einsum("bkgd,bknd->bkgn", q, key.float()) * scaling  # (b, kv, g, n)
    ok = torch.ones(bsz, 1, 1, n, dtype=torch.bool, device=z.device)
    if attention_mask is not None:
        m = attention_mask[:, :, -1:, :n]
        ok = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        ok = ok.reshape(bsz, 1, 1, n)
    z = z.masked_fill(~ok, float("-inf"))
    n_ok = ok.sum(-1, keepdim=True).float()
    zmax = z.amax(-1, keepdim=True)
    if strategy is None:
        zt = torch.full_like(zmax, float("-inf"))
    elif strategy == "top_k":
        zt = z.topk(min(top_k, n), dim=-1).values[..., -1:]
    elif strategy == "threshold":
        assert threshold is not None  # (_check_strategy: "threshold" has one)
        zt = torch.full_like(zmax, _f32(float(threshold)))
    else:
        zt = zmax + math.log1p(-top_p) - torch.log(n_ok)
    pos = torch.arange(n, device=z.device)
    # The sinks are each row's first allowed keys (its first real tokens under left padding).
    first = ok.to(torch.int32).argmax(-1, keepdim=True)  # (b, 1, 1, 1)
    forced = ((pos >= first) & (pos < first + sinks)) | (pos >= n - max(window, 1))
    sel = ((z >= zt) | forced) & ok
    count = sel.sum(-1)  # (b, kv, g)
    c = int(count.max())
    zs = z.masked_fill(~sel, float("-inf"))
    top_z, idx = zs.topk(c, dim=-1)  # the selected keys (and -inf padding)
    vsel = torch.gather(
        value.float()[:, :, None].expand(bsz, kv, g, n, d),
        3,
        idx[..., None].expand(-1, -1, -1, -1, d),
    )
    # (a row with nothing selected would be softmax over -inf only: nan; two
    # small kernels and no device sync to zero it)
    w = torch.softmax(top_z, dim=-1).masked_fill(count[..., None] == 0, 0.0)
    out = (w[..., None] * vsel).sum(-2).reshape(bsz, n_heads, d)[:, None].to(query.dtype)
    s_sel = torch.exp(top_z - zmax).sum(-1, keepdim=True)
    n_drop = n_ok - count[..., None].float()
    e = n_drop * torch.exp(torch.clamp(zt - zmax, max=0.0))
    bound = torch.where(n_drop > 0, e / (s_sel + e), torch.zeros_like(e))
    # A row whose keys are all masked reads none and returns zeros, as torch's
    # sdpa does; it has no fraction to report, so the mean skips it (0.0 if
    # every row is such a row, never nan).
    fraction = float((count[..., None].float() / n_ok).mean())
    if math.isnan(fraction):
        # Some row may attend to nothing (0 / 0): the mean skips such rows, and
        # is 0.0 if every row is one (never nan). Rare, so the common case pays
        # no extra kernels.
        frac = count[..., None].float() / n_ok.clamp(min=1)
        rows = int((n_ok > 0).expand_as(frac).sum())
        fraction = float(frac.sum()) / rows if rows else 0.0
    # (detached where it requires grad: a statistic, so such a query gives no
    # "converting a tensor with requires_grad" warning; detach costs a call)
    if bound.requires_grad:
        bound = bound.detach()
    info = {"fraction_read": fraction, "dropped_bound": float(bound.max())}
    return out, info


AttentionInterface.register(ATTENTION, _attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)

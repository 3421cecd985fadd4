"""The input side of ``neuropil quantize``: a safetensors or GGUF file read as
memory-mapped views, tensor by tensor (:func:`read_any`).

Arrays and GGUF blocks are read-only views of a memory map of the file, read
from disk when first used; what cannot be a view (a Llama GGUF's q and k rows
put back in the order transformers uses, block types other than
``Q4_0``/``Q4_1``/``Q8_0`` dequantized) is a :class:`Lazy` tensor, made when it
is converted, so a model is never copied whole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from . import _safetensors
from .errors import FormatError, NeuropilError
from .quant import FORMAT as QUANT_FORMAT

#: GGUF block types neuropil reads, and the scheme that keeps each one's bytes.
_GGUF_SCHEMES = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0"}
# GGUF tensor types read as they are stored (the gguf reader gives them typed):
# copied in their dtype, never dequantized.
_GGUF_PLAIN = ("F32", "F16", "F64", "I8", "I16", "I32", "I64")


class Lazy:
    """A tensor of :attr:`Source.entries` made when it is converted (GGUF q/k
    rows put in order, other GGUF block types dequantized): a copy, so it is
    made for one tensor at a time, not for the whole file as it is read.

    Attributes:
        shape: the tensor's shape.
        floating: whether its values are floats (bfloat16 bits included).
        load: makes it (raises :class:`FormatError` for a bad file).
    """

    __slots__ = ("floating", "load", "shape")

    def __init__(self, shape: tuple[int, ...], floating: bool, load: Callable[[], Any]) -> None:
        self.shape, self.floating, self.load = shape, floating, load


class Source(NamedTuple):
    """What :func:`read_any` read.

    Attributes:
        entries: name -> (value, bytes in the file); a value is a numpy array
            (any dtype, as stored), :class:`_safetensors.BF16` bits, GGUF
            ``Q4_0``/``Q4_1``/``Q8_0`` blocks as ``(scheme, raw blocks, shape)``,
            or a :class:`Lazy` one of these (other GGUF block types are
            dequantized to float32). Arrays and raw blocks are read-only views
            of the file, mapped into memory: read from disk when used, they
            take no memory of their own, so a model larger than the RAM can be
            read (the file must not change meanwhile).
        kinds: name -> the tensor's type in the file (``"F16"``, ``"BF16"``,
            ``"Q4_1"``...).
        gguf_names: name -> the GGUF file's own name, for tensors renamed to
            ``transformers``' names (a Llama GGUF); empty otherwise.
        dequantized: names of GGUF tensors stored as quantized blocks, whose
            float values are dequantized ones.
    """

    entries: dict[str, tuple[Any, int]]
    kinds: dict[str, str]
    gguf_names: dict[str, str]
    dequantized: frozenset[str] = frozenset()


def _read_safetensors(path: Path) -> Source:
    tensors, meta, dtypes = _safetensors.read(path, mapped=True)
    if meta.get("format") == QUANT_FORMAT:
        raise FormatError(
            f"{path}: input is already quantized (format {QUANT_FORMAT!r}); "
            "quantize the original float weights instead"
        )
    out: dict[str, tuple[Any, int]] = {}
    for name, arr in tensors.items():
        out[name] = (_safetensors.BF16(arr) if dtypes[name] == "BF16" else arr, arr.nbytes)
    return Source(out, dtypes, {})


def _read_gguf(path: Path) -> Source:
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - the hf extra installs gguf
        raise NeuropilError(
            "reading GGUF needs the gguf package: pip install 'neuropil[hf]'"
        ) from e
    try:
        reader = GGUFReader(path)  # (its tensors' data: views of a memory map of the file)
        llama = _field(reader, "general.architecture") == "llama"
        heads = (
            (_field(reader, "llama.attention.head_count"),
             _field(reader, "llama.attention.head_count_kv"))
            if llama else None
        )  # fmt: skip
        out: dict[str, tuple[Any, int]] = {}
        kinds: dict[str, str] = {}
        renamed: dict[str, str] = {}
        for t in reader.tensors:
            name = _hf_name(t.name) if llama else t.name
            if name != t.name:
                renamed[name] = t.name
            kinds[name] = t.tensor_type.name
            out[name] = (_gguf_value(path, t, heads), int(t.n_bytes))
        blocks = frozenset(n for n, k in kinds.items() if k not in (*_GGUF_PLAIN, "BF16"))
        return Source(out, kinds, renamed, blocks)
    except NeuropilError:
        raise
    except Exception as e:  # the gguf reader raises many kinds on a bad file
        raise _bad_gguf(path, e) from e


def _gguf_value(path: Path, t: Any, heads: tuple[int, int] | None) -> Any:
    """A GGUF reader's tensor as a value of :attr:`Source.entries`: a view of
    the file where it can be one, else :class:`Lazy`."""
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    kind = t.tensor_type.name
    data = np.asarray(t.data)  # (a view: np.asarray keeps a memmap's memory)
    rows = _head_rows(t.name, shape, heads)  # (checked as the file is read)
    if kind in _GGUF_SCHEMES and len(shape) == 2:
        raw = data.reshape(shape[0], -1)
        return (_GGUF_SCHEMES[kind], _in_order(path, raw, rows, False), shape)
    if kind in _GGUF_PLAIN:
        arr = data.reshape(shape)
        return _in_order(path, arr, rows, arr.dtype.kind == "f")
    if kind == "BF16":  # raw bytes: kept as bfloat16 bits, not widened
        bits = data.view(np.uint16).reshape(shape)
        if rows is None:
            return _safetensors.BF16(bits)
        return _lazy(path, shape, True, lambda: _safetensors.BF16(_unpermute(bits, rows)))

    def dequantized() -> np.ndarray:
        arr = dequantize(data, t.tensor_type).reshape(shape).astype(np.float32, copy=False)
        return arr if rows is None else _unpermute(arr, rows)

    return _lazy(path, shape, True, dequantized)


def _in_order(path: Path, arr: np.ndarray, rows: int | None, floating: bool) -> Any:
    """``arr``, or a :class:`Lazy` copy with its rows put in order (q and k)."""
    if rows is None:
        return arr
    return _lazy(path, arr.shape, floating, lambda: _unpermute(arr, rows))


def _lazy(path: Path, shape: tuple[int, ...], floating: bool, make: Callable[[], Any]) -> Lazy:
    """A :class:`Lazy` of ``make`` that raises what reading the file raised."""

    def load() -> Any:
        try:
            return make()
        except (NeuropilError, MemoryError):
            raise
        except Exception as e:  # (gguf's dequantize, as _read_gguf)
            raise _bad_gguf(path, e) from e

    return Lazy(shape, floating, load)


def _bad_gguf(path: Path, e: Exception) -> FormatError:
    return FormatError(f"{path}: not a valid GGUF file: {type(e).__name__}: {e}")


#: GGUF's Llama tensor names -> the ``transformers`` module names (what
#: ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` builds), so the
#: output loads into that model with ``load_quantized``.
_LLAMA_NAMES = [
    ("token_embd.", "model.embed_tokens."),
    ("output_norm.", "model.norm."),
    ("output.", "lm_head."),
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("attn_q.", "self_attn.q_proj."),
    ("attn_k.", "self_attn.k_proj."),
    ("attn_v.", "self_attn.v_proj."),
    ("attn_output.", "self_attn.o_proj."),
    ("ffn_gate.", "mlp.gate_proj."),
    ("ffn_up.", "mlp.up_proj."),
    ("ffn_down.", "mlp.down_proj."),
]


def _field(reader: Any, key: str) -> Any:
    """A scalar or string metadata field of a GGUF reader (None if absent)."""
    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    part = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(part).decode("utf-8", "replace")
    return part.tolist()[0]


def _hf_name(name: str) -> str:
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        return f"model.layers.{layer}." + _hf_name(rest)
    for gguf, hf in _LLAMA_NAMES:
        if name.startswith(gguf):
            return hf + name[len(gguf) :]
    return name


def _head_rows(name: str, shape: tuple[int, ...], heads: tuple[int, int] | None) -> int | None:
    """The number of heads whose rows a q or k projection of a Llama GGUF has
    reordered (see :func:`_unpermute`), else None.

    Raises:
        FormatError: the rows do not split into the file's head count.
    """
    if heads is None or not name.endswith(("attn_q.weight", "attn_k.weight")):
        return None
    n = heads[0] if "attn_q" in name else heads[1]
    r = shape[0] if shape else 0
    if not n or r % (2 * n):
        raise FormatError(f"{name}: {r} rows do not split into {n} heads of two halves")
    return int(n)


def _unpermute(rows: Any, n: int) -> Any:
    """Undoes llama.cpp's reordering of the q and k projections' rows (its
    converter interleaves each of the ``n`` heads' two rotary halves), as
    transformers' GGUF loader does; only rows move, so packed blocks stay
    valid. A copy (the reordered rows are no view of the file)."""
    r = rows.shape[0]
    return rows.reshape(n, r // n // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_any(path: str | Path) -> Source:
    """Reads a safetensors or GGUF file (told apart by GGUF's magic bytes)."""
    path = Path(path)
    with open(path, "rb") as f:  # OSError (FileNotFoundError...) passes through
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_safetensors(path)

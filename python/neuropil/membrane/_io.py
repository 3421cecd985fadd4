"""Saving and loading membrane banks: safetensors tensors plus a JSON metadata
header (``__metadata__``) carrying the format name and version. Writes go to a
temporary file in the same folder that is then renamed over the target, so a
failed save never destroys an older file. Loading validates every field."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._safetensors import BF16, write
from ..errors import ArgumentError, FormatError, NeuropilError, _check_format_version
from ._checks import check_codes
from .bank import _CODE_KINDS as _NAMED_CODES

FORMAT = "neuropil.membrane.MembraneBank"
VERSION = 1
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_TENSORS = ("M", "C", "gains", "counts", "reads")
# What a bank's code_kind can be: a named code book, one passed as a tensor,
# or one extended by MembraneBank.grow.
_CODE_KINDS = (*_NAMED_CODES, "custom", "grown")


def _dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _host_array(t: torch.Tensor) -> Any:
    """A CPU tensor as the package's writer takes it: a numpy view, bfloat16
    as its bits (numpy has no bfloat16)."""
    if t.dtype == torch.bfloat16:
        return BF16(t.view(torch.int16).numpy().view(np.uint16))
    return t.numpy()


def save_bank(bank: Any, path: Any) -> None:
    """Writes ``bank`` through the package's safetensors writer
    (:func:`neuropil._safetensors.write`), as every other ``save``: a temporary
    file renamed over ``path`` (a pipe or device written in place), and a
    failed write (a full disk) raises the ``OSError`` ``open`` would, naming
    ``path``, with the old file intact."""
    # (os.fspath, not Path: Path("dir/") drops the separator the writer refuses, as open does)
    path = os.fspath(path)
    # Learned codes may have drifted since construction: never write a file load refuses.
    check_codes(bank.C, "codes")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "L": bank.L,
        "H": bank.H,
        "W": bank.W,
        "batch": bank.B,
        "K": bank.K,
        "dtype": _dtype_key(bank.dtype),
        "readout": bank.readout,
        "precision": bank.precision,
        "persistence": bank.persistence,
        "code_kind": bank.code_kind,
        "seed": bank.seed,
        "steps": bank.steps,
        "fast_hadamard": bank.fast_hadamard,
    }
    # The int64 counters first: every tensor then starts at a multiple of its
    # item size (the data starts 8-aligned), as safetensors' own writer lays them.
    tensors = {
        "counts": bank.counts.contiguous(),
        "reads": bank.reads.contiguous(),
        "M": bank.M.detach().cpu().contiguous(),
        "C": bank.C.detach().cpu().contiguous(),
        "gains": bank.gains.detach().cpu().contiguous(),
    }
    write(path, {k: _host_array(t) for k, t in tensors.items()}, {"neuropil": json.dumps(meta)})


def check_tensors(
    t: dict[str, torch.Tensor], dims: tuple[int, int, int, int, int], dtype: torch.dtype, where: str
) -> None:
    """The state tensors of a bank of ``dims`` = (L, H, W, B, K): shapes and
    dtypes, finite values, non-negative counts (a file or an unpickled state)."""
    L, H, W, B, K = dims
    want = {
        "M": ((B, L, H, W), dtype),
        "C": ((L, K), dtype),
        "gains": ((B, K), dtype),
        "counts": ((B, K), torch.int64),
        "reads": ((B, K), torch.int64),
    }
    for n, (shape, dt) in want.items():
        if not isinstance(t[n], torch.Tensor):
            raise FormatError(f"{where}: {n!r} must be a tensor; got {type(t[n]).__name__}")
        if tuple(t[n].shape) != shape or t[n].dtype != dt:
            raise FormatError(
                f"{where}: tensor {n!r} must be {dt} of shape {shape}; "
                f"got {t[n].dtype} of shape {tuple(t[n].shape)}"
            )
    for n in ("M", "C", "gains"):
        if not bool(torch.isfinite(t[n].detach()).all()):
            raise FormatError(f"{where}: tensor {n!r} holds non-finite values")
    for n in ("counts", "reads"):
        if bool((t[n] < 0).any()):
            raise FormatError(f"{where}: tensor {n!r} holds negative counts")


def _field(meta: dict[str, Any], name: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if name not in meta:
        raise FormatError(f"{path}: metadata field {name!r} is missing")
    v = meta[name]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise FormatError(f"{path}: metadata field {name!r} must be {kind}; got {v!r}")
    return v


def load_bank(cls: Any, path: Any, device: Any) -> Any:
    from safetensors import safe_open

    path = Path(path)
    with open(path, "rb"):  # OSError (FileNotFoundError...) as from every loader
        pass
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            names = set(f.keys())
            if names != set(_TENSORS):
                raise FormatError(
                    f"{path}: tensors must be {sorted(_TENSORS)}; got {sorted(names)}"
                )
            t = {n: f.get_tensor(n) for n in _TENSORS}
    except NeuropilError:
        raise
    except Exception as e:  # safetensors raises its own errors on truncated files
        raise FormatError(f"{path}: not a readable safetensors file ({e})") from e
    if "neuropil" not in raw:
        raise FormatError(f"{path}: no neuropil metadata; not a saved MembraneBank")
    try:
        meta = json.loads(raw["neuropil"])
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise FormatError(
            f"{path}: metadata 'neuropil' must be a JSON object; got {type(meta).__name__}"
        )
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: format must be {FORMAT!r}; got {meta.get('format')!r}")
    _check_format_version(path, _field(meta, "version", int, path), VERSION, "version")
    dims = {n: _field(meta, n, int, path) for n in ("L", "H", "W", "batch", "K")}
    for n, v in dims.items():
        if v < 1:
            raise FormatError(f"{path}: metadata field {n!r} must be positive; got {v}")
    dkey = _field(meta, "dtype", str, path)
    if dkey not in _DTYPES:
        raise FormatError(f"{path}: dtype must be one of {sorted(_DTYPES)}; got {dkey!r}")
    dtype = _DTYPES[dkey]
    readout = _field(meta, "readout", str, path)
    precision = _field(meta, "precision", str, path)
    code_kind = _field(meta, "code_kind", str, path)
    if code_kind not in _CODE_KINDS:
        raise FormatError(f"{path}: code_kind must be one of {_CODE_KINDS}; got {code_kind!r}")
    seed = _field(meta, "seed", int, path)
    steps = _field(meta, "steps", int, path)
    if steps < 0:
        raise FormatError(f"{path}: steps must be >= 0; got {steps}")
    if "persistence" not in meta:
        raise FormatError(f"{path}: metadata field 'persistence' is missing")
    persistence = meta["persistence"]
    if persistence is not None and (
        isinstance(persistence, bool) or not isinstance(persistence, (int, float))
    ):
        raise FormatError(f"{path}: persistence must be a number or null; got {persistence!r}")
    # Absent from files written before it was saved: None (the default) as then.
    fast_hadamard = meta.get("fast_hadamard")
    if fast_hadamard is not None and not isinstance(fast_hadamard, bool):
        raise FormatError(
            f"{path}: fast_hadamard must be true, false or null; got {fast_hadamard!r}"
        )
    L, H, W, B, K = (dims[n] for n in ("L", "H", "W", "batch", "K"))
    check_tensors(t, (L, H, W, B, K), dtype, str(path))
    try:
        check_codes(t["C"], "C")  # the test the constructor applies to custom codes
    except ArgumentError as e:
        raise FormatError(f"{path}: code book C has zero columns or non-finite norms ({e})") from e
    try:
        device = torch.empty(0, device="cpu" if device is None else device).device
        bank = cls(
            L,
            H,
            W,
            batch=B,
            codes=t["C"].to(device),
            readout=readout,
            persistence=persistence,
            device=device,
            dtype=dtype,
            precision=precision,
            seed=seed,
            fast_hadamard=fast_hadamard,
        )
    except NeuropilError as e:
        raise FormatError(f"{path}: inconsistent metadata ({e})") from e
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise ArgumentError(
            f"device must be an available torch device; got {device!r} ({e})"
        ) from e
    bank.M = t["M"].to(device)
    bank.gains = t["gains"].to(device)
    bank.counts = t["counts"].clone()
    bank.reads = t["reads"].clone()
    bank.steps = steps
    if code_kind == "hadamard":
        from .codes import hadamard_codes

        if L & (L - 1) or K > L or not torch.equal(t["C"], hadamard_codes(L, K, dtype=dtype)):
            raise FormatError(f"{path}: code_kind 'hadamard' but C is not the Hadamard code book")
    bank.code_kind = code_kind
    bank._setup_transform(device, dtype)
    return bank

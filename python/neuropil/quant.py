"""Packed quantization of weight matrices.

``quantize(w)`` turns a float (rows, cols) matrix into :class:`QuantizedWeights`:
groups of ``group_size`` consecutive weights along a row (32, 64, 128 or 256)
share one scale (and, for the asymmetric scheme, one min), and each weight is a
``bits``-bit code (2, 3, 4 or 8) packed densely (two 4-bit codes per byte).

Schemes:
    ``asym`` (default): ``w = scale * u + min``, scale and min from the group's range.
    ``sym``: ``w = scale * (u - 2**(bits-1))``, scale from the largest magnitude.
    ``q4_0``, ``q4_1``, ``q8_0``: GGUF's block formats (groups of 32), byte-exact
    with the ``gguf`` package's quantize and dequantize; :meth:`QuantizedWeights.to_gguf`
    gives the GGUF blocks.

With ``asym`` and ``sym``, a row whose length is not a multiple of the group
size is padded with zeros to the next multiple; padding is stored but never
returned and meets zero activations in the kernels (the GGUF schemes take rows
of a multiple of 32 only, as GGUF does). Scales and mins are float16 (``scale_dtype="float32"``
for ranges beyond float16). With ``search=True`` each group's clipping range is
searched to minimise the squared error (calibration-free, deterministic).

Every method runs in the Rust core on the packed bytes: ``matvec`` never builds
the float matrix (up to 3 rows stream the codes, one mat-vec each; larger batches
of 4-bit weights on AVX-512 VNNI run an int16-activation kernel on the codes, and
other larger batches dequantize one cache-sized tile at a time).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import operator
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import numpy.typing as npt

from . import _native, _safetensors
from .errors import (
    ArgumentError,
    DTypeError,
    FormatError,
    ShapeError,
    _check_format_version,
    _check_level,
    _shown,
)

if TYPE_CHECKING:
    import torch

__all__ = ["SCHEMES", "QuantizedWeights", "load_file", "quantize", "save_file"]

SCHEMES = ("asym", "sym", "q4_0", "q4_1", "q8_0")
_GGUF = {"q4_0": (4, 32), "q4_1": (4, 32), "q8_0": (8, 32)}
FORMAT = "neuropil.quant"
FORMAT_VERSION = 1
# What each argument may be, and the largest value the core's integer types take
# (beyond it the bindings raise a bare OverflowError).
_INT_ARGS = {"bits": ("one of 2, 3, 4, 8", 255), "group_size": ("one of 32, 64, 128, 256", 2**32)}
_MAX_EXTENT = 2**63 - 1
# The tensors a QuantizedWeights entry `name` is stored as (`.mins` is reserved
# even where absent: a plain `name.mins` would be read back as its mins).
_PARTS = ("qdata", "scales", "mins")
# The fields of a quantized entry's format in the metadata (QuantizedWeights._meta).
_ENTRY_KEYS = ("shape", "bits", "group_size", "scheme", "scale_dtype")
# The dtypes scales and mins are stored in.
_SCALE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))

#: What ``scale_dtype`` takes: a name (``"float16"``, ``"float32"``), a numpy
#: dtype or scalar type (``np.dtype("float16")``, ``np.float16``) or a torch dtype.
ScaleDType: TypeAlias = "str | np.dtype[Any] | type[np.generic] | torch.dtype"


def _resolve(bits: int | None, group_size: int | None, scheme: str) -> tuple[int, int, str]:
    if not isinstance(scheme, str) or scheme.lower() not in SCHEMES:
        raise ArgumentError(f"scheme must be one of {', '.join(SCHEMES)}; got {_shown(scheme)}")
    scheme = scheme.lower()
    if scheme in _GGUF:
        b, g = _GGUF[scheme]
        bits = b if bits is None else bits
        group_size = g if group_size is None else group_size
    bits = 4 if bits is None else bits
    group_size = 64 if group_size is None else group_size
    for name, v in (("bits", bits), ("group_size", group_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ArgumentError(f"{name} must be an integer; got {_shown(v)}")
        expected, largest = _INT_ARGS[name]
        if not 0 <= v <= largest:
            raise ArgumentError(f"{name} must be {expected}; got {v}")
    return int(bits), int(group_size), scheme


def _shape_arg(shape: Any) -> tuple[int, int]:
    """``shape`` as two Python ints, or ArgumentError (the core checks they are > 0)."""
    try:
        rows, cols = shape
        dims = (operator.index(rows), operator.index(cols))
    except (TypeError, ValueError):
        raise ArgumentError(
            f"shape must be two integers (rows, cols); got {_shown(shape)}"
        ) from None
    if (
        isinstance(rows, bool)
        or isinstance(cols, bool)
        or not all(0 <= d <= _MAX_EXTENT for d in dims)
    ):
        raise ArgumentError(
            "shape must be two integers (rows, cols) in [1, 2**63); "
            f"got ({_shown(rows)}, {_shown(cols)})"
        )
    return dims


def _scale_dtype(v: Any) -> str:
    """``scale_dtype`` as the core's name: a string passes as is (the core checks
    it); a numpy dtype, a numpy scalar type (``np.float32``) or a torch dtype
    gives its name, which must be float16 or float32. Anything else (a numpy
    value such as ``np.float32(1.0)``, a Python type, a dict numpy would read as
    a structured dtype) is refused, the message quoting what was passed."""
    if isinstance(v, str):
        return v
    name = None
    if isinstance(v, np.dtype):
        name = v.name
    elif isinstance(v, type) and issubclass(v, np.generic):
        name = np.dtype(v).name
    elif type(v).__module__ == "torch" and type(v).__name__ == "dtype":
        name = str(v).removeprefix("torch.")
    if name in ("float16", "float32"):
        return name
    raise ArgumentError(
        "scale_dtype must be float16 or float32 (a name, a numpy dtype or type, or a "
        f"torch dtype); got {_shown(v)}"
    )


def _plain_array(v: Any) -> np.ndarray | _safetensors.BF16:
    """A plain (not quantized) ``save_file`` entry as numpy: a torch tensor by its
    CPU values, detached (a layer's bias requires grad), a bfloat16 one as its
    bits (a ``uint16`` view of the tensor, no copy on the CPU: numpy has no
    bfloat16), stored as ``BF16``; bfloat16 bits held by ``neuropil quantize``
    (``_safetensors.BF16``) pass as they are."""
    if isinstance(v, _safetensors.BF16):
        return v
    if type(v).__module__.startswith("torch"):
        import torch

        if isinstance(v, torch.Tensor):
            t = v.detach().cpu()
            if t.dtype == torch.bfloat16:
                return _safetensors.BF16(t.view(torch.int16).numpy().view(np.uint16))
            return t.numpy()
    return np.asarray(v)


def _as_numpy(w: Any, name: str) -> Any:
    """A torch tensor as numpy (CPU values, detached), for the core to check as
    it checks numpy input: a float dtype numpy lacks (bfloat16, float8) is
    widened to float32, exactly; every other real dtype keeps its numpy dtype,
    so integer and bool tensors are refused by the core with the message a
    numpy array of that dtype gets (``x must have dtype float32 ...; got
    int64``), never cast; a complex tensor (a conjugated view too) is refused
    here with that message, and so is one numpy has no dtype for (qint8).
    Anything else passes as it is. ``name`` names the argument."""
    if type(w).__module__.startswith("torch"):
        import torch

        if not isinstance(w, torch.Tensor):
            return w
        # (each step only where needed: this runs on every matvec of a tensor)
        if w.requires_grad:
            w = w.detach()
        if not w.is_cpu:
            w = w.cpu()
        if w.layout != torch.strided:
            raise ArgumentError(f"{name} must be a dense tensor; got layout {w.layout}")
        dtype = w.dtype
        if dtype.is_complex:
            # (named as numpy names it, as the core does for a complex64 array;
            # complex32 has no numpy name)
            found = dtype if dtype == torch.complex32 else str(dtype).removeprefix("torch.")
            raise DTypeError(
                f"{name} must have dtype float32 (or another float dtype, converted once); "
                f"got {found}"
            )
        if dtype.is_floating_point and dtype not in (torch.float32, torch.float16, torch.float64):
            w = w.float()
        elif w.is_neg():
            # A real view with its negative bit set (``z.conj().imag``): numpy()
            # refuses it. (A conjugate bit is complex only, refused above.)
            w = w.resolve_neg()
        try:
            return w.numpy()
        except TypeError:  # a dtype numpy has no match for (qint8)
            raise DTypeError(
                f"{name} must have dtype float32 (or another float dtype, converted once); "
                f"got {w.dtype}"
            ) from None
    return w


def _like_input(y: Any, x: Any) -> Any:
    """numpy result ``y`` as a torch tensor on torch input ``x``'s device."""
    import torch

    out = torch.from_numpy(y)
    return out if x.is_cpu else out.to(x.device)


class QuantizedWeights:
    """A (rows, cols) matrix stored as packed codes plus per-group scales (and mins).

    Attributes:
        data: ``uint8`` array (rows, row_bytes), the packed codes.
        scales: ``float16`` (or ``float32``) array (rows, groups).
        mins: like ``scales`` for asymmetric schemes, else ``None``.
        shape: ``(rows, cols)`` of the original matrix.
        bits, group_size, scheme: the format.

    Pickles and deep-copies as its constructor call (the arrays and the
    format), so an unpickled object passes the constructor's checks again.

    Raises:
        ShapeError: ``data``, ``scales`` or ``mins`` do not have the 2-D shape
            the format gives (``(rows, row_bytes)``, ``(rows, groups)``).
        DTypeError: ``data`` is not ``uint8``, or ``scales``/``mins`` are not
            float16 or float32 numpy arrays (both of one dtype).
        ArgumentError: a bad format (``shape``, ``bits``, ``group_size``,
            ``scheme``), ``mins`` missing for an asymmetric scheme, or NaN/Inf
            scales or mins (every output they touch would be NaN). The checks
            :func:`load_file` applies to a file's tensors.
    """

    __slots__ = ("bits", "data", "group_size", "mins", "scales", "scheme", "shape")

    def __init__(
        self,
        data: npt.NDArray[np.uint8],
        scales: npt.NDArray[Any],
        mins: npt.NDArray[Any] | None,
        shape: tuple[int, int],
        bits: int,
        group_size: int,
        scheme: str,
    ) -> None:
        self._init(data, scales, mins, shape, bits, group_size, scheme, ("data", "scales", "mins"))

    def _init(
        self,
        data: Any,
        scales: Any,
        mins: Any,
        shape: Any,
        bits: Any,
        group_size: Any,
        scheme: Any,
        names: tuple[str, str, str],
    ) -> None:
        """The constructor; ``names`` name ``data``, ``scales`` and ``mins`` in
        the layout messages (:func:`load_file` gives the file's tensor names)."""
        self.data = data
        self.scales = scales
        self.mins = mins
        self.shape = _shape_arg(shape)
        self.bits, self.group_size, self.scheme = _resolve(bits, group_size, scheme)
        self._check_scale_dtypes(names)
        _native.quant_check(*self._args())  # data's dtype and the buffers' lengths
        self._check_layout(names)

    def _check_scale_dtypes(self, names: tuple[str, str, str]) -> None:
        """``scales`` and ``mins`` are float16 or float32 numpy arrays, checked
        before the core sees them: it takes float16 as its uint16 bits (and
        would say so for a tensor), and a list has no dtype to pass it."""
        for arr, name in ((self.scales, names[1]), (self.mins, names[2])):
            if arr is None or (isinstance(arr, np.ndarray) and arr.dtype in _SCALE_DTYPES):
                continue
            if isinstance(arr, np.ndarray):
                found = f"dtype {arr.dtype}"
            elif type(arr).__module__.startswith("torch") and hasattr(arr, "dtype"):
                found = f"a torch {type(arr).__name__} of dtype {arr.dtype}"
            else:
                found = type(arr).__name__
            raise DTypeError(f"{name} must be a float16 or float32 numpy array; got {found}")

    def _check_layout(self, names: tuple[str, str, str]) -> None:
        """What the core leaves to this class: it reads the buffers flat and
        checks their lengths only (a (4, 200) matrix has as many code bytes as
        an (8, 100) one; a (1, 8) scale array as many scales as (8, 1)), it
        takes float16 scales as their uint16 bits, and it reads any values."""
        rows, cols = self.shape
        groups = -(-cols // self.group_size)
        want = [
            (names[0], self.data, (rows, groups * self.group_size * self.bits // 8)),
            (names[1], self.scales, (rows, groups)),
        ]
        if self.mins is not None:
            want.append((names[2], self.mins, (rows, groups)))
        for name, arr, expected in want:
            if arr.shape != expected:
                raise ShapeError(
                    f"{name} must have shape {expected} for shape {list(self.shape)}, "
                    f"bits {self.bits}, group_size {self.group_size}; got {arr.shape}"
                )
        for name, arr, _ in want[1:]:
            bad = ~np.isfinite(arr)
            if bad.any():
                at = tuple(int(i) for i in np.argwhere(bad)[0])
                raise ArgumentError(
                    f"{name} must be finite; got {_shown(arr[at])} at {at} "
                    f"({int(bad.sum())} NaN or Inf)"
                )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Through the constructor: a tampered pickle (codes cut short, a
        # scale array of another shape) raises there instead of at a matvec.
        args = (self.data, self.scales, self.mins, self.shape, self.bits, self.group_size)
        return type(self), (*args, self.scheme)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _native_scales(s: Any) -> Any:
        if s is None:
            return None
        return s.view(np.uint16) if s.dtype == np.float16 else s

    def _args(self) -> tuple[Any, Any, Any, int, int, int, int, str]:
        return (
            self.data,
            self._native_scales(self.scales),
            self._native_scales(self.mins),
            self.shape[0],
            self.shape[1],
            self.bits,
            self.group_size,
            self.scheme,
        )

    @classmethod
    def _from_native(cls, out: tuple[Any, Any, Any], shape, bits, group_size, scheme):
        data, scales, mins = out
        if scales.dtype == np.uint16:
            scales = scales.view(np.float16)
            mins = None if mins is None else mins.view(np.float16)
        return cls(data, scales, mins, shape, bits, group_size, scheme)

    # --------------------------------------------------------------- properties
    @property
    def scale_dtype(self) -> str:
        """``"float16"`` or ``"float32"``."""
        return str(self.scales.dtype)

    @property
    def memory_bytes(self) -> int:
        """Bytes of codes, scales and mins (padding included)."""
        return int(
            self.data.nbytes + self.scales.nbytes + (0 if self.mins is None else self.mins.nbytes)
        )

    @property
    def bits_per_weight(self) -> float:
        """``memory_bytes * 8 / (rows * cols)``: 4.5 for 4-bit g64 with float16 scale and min."""
        return self.memory_bytes * 8 / (self.shape[0] * self.shape[1])

    def __repr__(self) -> str:
        return (
            f"QuantizedWeights(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, "
            f"scheme={self.scheme!r}, scale_dtype={self.scale_dtype!r}, "
            f"memory_bytes={self.memory_bytes})"
        )

    # ------------------------------------------------------------------ compute
    def dequantize(self) -> npt.NDArray[np.float32]:
        """The float32 matrix (rows, cols) the codes stand for (padding dropped)."""
        return _native.quant_dequantize(*self._args())

    def matvec(self, x: Any, level: str | None = None) -> Any:
        """``W @ x`` without building ``W``.

        Args:
            x: float array of shape (cols,) or (n, cols); float32 C-contiguous
                input is read in place, other floats are converted once. A torch
                tensor gives a torch tensor back, on its device (a CUDA tensor
                is read on the host: the packed weights live there; for GPU
                inference move a :class:`~neuropil.torch.QuantizedLinear` to the
                device instead).
            level: force one SIMD level (``scalar``, ``avx2``, ``avx512``, ``neon``)
                for this call.

        Returns:
            float32 (rows,) for a vector, (n, rows) for a batch (``x @ W.T``);
            a batch of n = 0 rows gives (0, rows), as numpy's ``@`` does.

        Precision: at the ``avx512`` level on CPUs with VNNI, the weights
        multiply ``x`` quantized per group to int16 (step ``max|x_group| / 32767``;
        ``/ 8191`` for 3-bit weights; near-lossless, where ggml's int8 moves an
        LLM's perplexity by ~1% through its outlier channels). Batches of 4 or
        more rows do so for 4-bit weights only. Every other level uses float32 ``x``.

        Raises:
            ShapeError: ``x`` is not 1-D or 2-D, or its last dimension is not ``cols``.
            DTypeError: ``x`` is not a float array.
            ArgumentError: ``level`` is not None or a level name.
            NeuropilError: ``level`` names a level this CPU lacks.
        """
        is_torch = type(x).__module__.startswith("torch")
        _check_level(level)
        y = _native.quant_matvec(*self._args(), _as_numpy(x, "x"), level)
        return _like_input(y, x) if is_torch else y

    def matvec_rows(self, x: Any, rows: Any, level: str | None = None) -> Any:
        """Selected rows of ``W @ x``: ``out[i] = W[rows[i]] @ x`` (a sparse FFN's up-projection).

        Args:
            x: float array (cols,); a torch tensor gives a torch tensor back on
                its device, as :meth:`matvec`.
            rows: 1-D integer indices into ``range(rows)``, any order, repeats
                allowed; an empty sequence gives an empty result.
            level: as for :meth:`matvec`.

        Returns:
            float32 (len(rows),).

        Raises:
            IndexError: an index is negative or >= rows (the message gives it
                as passed, a ``uint64`` past ``2**63`` included).
            ArgumentError: ``rows`` holds non-integers, or ``level`` is not a
                level name.
            ShapeError: ``rows`` is not 1-D (a nested list or a scalar: the
                result would not have its shape), or ``x`` is not of shape (cols,).
        """
        _check_level(level)
        idx = np.asarray(rows)
        if idx.size == 0 and idx.dtype.kind not in "iu":
            idx = idx.astype(np.int64)  # [] is float64 to numpy; nothing to index either way
        if idx.dtype.kind not in "iu":
            raise ArgumentError(f"rows must be integer indices; got dtype {idx.dtype}")
        if idx.ndim != 1:
            raise ShapeError(f"rows must be a 1-D array of row indices; got shape {idx.shape}")
        if idx.dtype.kind == "u" and idx.dtype.itemsize == 8:
            # checked before the int64 cast, which would wrap 2**63 to a negative index
            past = np.flatnonzero(idx >= self.shape[0])
            if past.size:
                raise IndexError(
                    f"rows index {int(idx[past[0]])} is out of range for length {self.shape[0]}"
                )
        idx = idx.astype(np.int64, copy=False)
        y = _native.quant_matvec_rows(*self._args(), _as_numpy(x, "x"), idx, level)
        return _like_input(y, x) if type(x).__module__.startswith("torch") else y

    # ---------------------------------------------------------------------- GGUF
    def to_gguf(self) -> npt.NDArray[np.uint8]:
        """The GGUF blocks (``uint8``, 1-D) of a ``q4_0``/``q4_1``/``q8_0`` matrix.

        Raises:
            ArgumentError: the scheme is ``asym`` or ``sym`` (no GGUF block type).
        """
        return _native.quant_to_gguf(*self._args())

    @classmethod
    def from_gguf(cls, raw: Any, scheme: str, shape: tuple[int, int]) -> QuantizedWeights:
        """Reads GGUF blocks of a (rows, cols) tensor without re-quantizing.

        Args:
            raw: the blocks' bytes: a ``uint8`` array (any shape, read in row-major
                order), ``bytes``, ``bytearray`` or a byte ``memoryview``. Other
                dtypes are refused, not cast (a cast would wrap or truncate).
            scheme: ``q4_0``, ``q4_1`` or ``q8_0``.
            shape: ``(rows, cols)`` of the matrix.

        Raises:
            DTypeError: ``raw`` is not ``uint8`` bytes.
            ArgumentError: ``scheme`` is not a GGUF scheme, or ``shape`` is not two
                non-negative integers.
            FormatError: an empty shape, ``cols`` not a multiple of 32, a wrong
                byte count for the shape, or a non-finite scale.
        """
        bits, g, scheme = _resolve(None, None, scheme)
        rows, cols = _shape_arg(shape)
        if isinstance(raw, (bytes, bytearray)):
            arr = np.frombuffer(raw, dtype=np.uint8)
        else:
            arr = np.asarray(raw)
        if arr.dtype != np.uint8:
            raise DTypeError(
                f"raw must be GGUF blocks as uint8 (an array, bytes or bytearray); "
                f"got dtype {arr.dtype}"
            )
        arr = np.ascontiguousarray(arr.reshape(-1))
        out = _native.quant_from_gguf(arr, scheme, rows, cols)
        return cls._from_native(out, (rows, cols), bits, g, scheme)

    # ---------------------------------------------------------------- persistence
    def _meta(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "scheme": self.scheme,
            "scale_dtype": self.scale_dtype,
        }

    def save(self, path: str | Path) -> None:
        """Writes a safetensors file (tensors ``weight.qdata``, ``weight.scales``,
        ``weight.mins``; the format in the JSON metadata), atomically."""
        save_file(path, {"weight": self})

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> QuantizedWeights:
        """Reads a file written by :meth:`save` (or the entry ``name`` of :func:`save_file`).

        Without ``name`` the file must be what :meth:`save` writes: one
        quantized entry's tensors and nothing else (with ``name``, the file's
        other entries are left unread, as :func:`load_file` reads them).

        Raises:
            OSError: the file cannot be read (``FileNotFoundError``...), as from ``open``.
            FormatError: the file or any metadata field is malformed or
                inconsistent; without ``name``, a file of several quantized
                entries or with a tensor of no quantized entry.
        """
        entries = load_file(path)
        quantized = {k: v for k, v in entries.items() if isinstance(v, QuantizedWeights)}
        if name is None:
            if len(quantized) != 1:
                raise FormatError(
                    f"{path}: holds {len(quantized)} quantized tensors; pass name= one of "
                    f"{sorted(quantized)}"
                )
            unexpected = sorted(k for k in entries if k not in quantized)
            if unexpected:
                raise FormatError(
                    f"{path}: unexpected tensors {unexpected} beside the quantized entry "
                    f"{next(iter(quantized))!r} (a file of QuantizedWeights.save holds only its "
                    "tensors; to read one entry of a save_file file, pass name=)"
                )
            return next(iter(quantized.values()))
        if name not in quantized:
            raise FormatError(f"{path}: no quantized tensor {name!r}; found {sorted(quantized)}")
        return quantized[name]


def quantize(
    w: Any,
    bits: int | None = None,
    group_size: int | None = None,
    scheme: str = "asym",
    *,
    scale_dtype: ScaleDType = "float16",
    search: bool = False,
) -> QuantizedWeights:
    """Quantizes a float matrix group-wise along its rows.

    Args:
        w: float array or CPU/CUDA torch tensor of shape (rows, cols); float32
            C-contiguous numpy input is read in place.
        bits: 2, 3, 4 or 8 (default 4; fixed by GGUF schemes).
        group_size: 32, 64, 128 or 256 (default 64; 32 for GGUF schemes).
        scheme: ``asym``, ``sym``, ``q4_0``, ``q4_1`` or ``q8_0``.
        scale_dtype: ``float16`` (default) or ``float32`` scales and mins: a
            name, a numpy dtype or scalar type (``np.float32``) or a torch dtype
            (``torch.float32``); not a numpy value (``np.float32(1.0)``).
        search: search each group's clipping range for the least squared error
            instead of round-to-nearest over the full range.

    Returns:
        The packed matrix.

    Raises:
        ArgumentError: unsupported bits, group size, scheme or ``scale_dtype``,
            a ``search`` that is not a bool, NaN/Inf weights, a range the
            scales' dtype cannot hold, or (GGUF schemes) rows whose length is
            not a multiple of 32.
        ShapeError: ``w`` is not 2-D or is empty.
        DTypeError: ``w`` is not a float array or tensor (integer, bool and
            complex ones are refused, not cast; torch bfloat16 is widened to
            float32 exactly).
    """
    bits, group_size, scheme = _resolve(bits, group_size, scheme)
    if not isinstance(search, (bool, np.bool_)):  # bool("no") would be True
        raise ArgumentError(f"search must be True or False; got {_shown(search)}")
    arr = _as_numpy(w, "w")
    try:
        out = _native.quant_quantize(
            arr, bits, group_size, scheme, _scale_dtype(scale_dtype), bool(search)
        )
    except ArgumentError as e:
        hint = "(use scale_dtype=float32)"
        if scheme not in _GGUF or hint not in str(e):
            raise
        # GGUF's block formats fix float16 scales: scale_dtype cannot help there.
        raise ArgumentError(
            str(e).replace(
                hint,
                f"(GGUF's {scheme} stores float16 scales; for this range use scheme "
                "'asym' or 'sym' with scale_dtype='float32', or scale the weights down)",
            )
        ) from None
    shape = np.shape(arr)
    return QuantizedWeights._from_native(out, shape, bits, group_size, scheme)


def save_file(path: str | Path, entries: dict[str, Any]) -> None:
    """Writes quantized matrices and plain arrays to one safetensors file.

    A :class:`QuantizedWeights` entry ``name`` becomes tensors ``name.qdata``,
    ``name.scales`` (and ``name.mins``) plus its format in the metadata key
    ``neuropil.quant``; a numpy array is stored as is, a torch tensor as its CPU
    values in its dtype (detached; bfloat16 as the safetensors dtype ``BF16``,
    2 bytes a value, bit for bit, as ``safetensors.torch.save_file`` stores it).

    Raises:
        ArgumentError: a key is not a string, is the reserved ``__metadata__``, or
            names the same tensor as another entry (``{"w": q, "w.scales": a}``:
            ``name.qdata``, ``name.scales`` and ``name.mins`` belong to the
            quantized entry ``name``). Checked before anything is written.
        DTypeError: an entry's dtype has no safetensors type (complex, strings,
            objects). Checked before anything is written.
    """
    _check_names(entries)
    tensors: dict[str, np.ndarray | _safetensors.BF16] = {}
    formats: dict[str, Any] = {}
    for name, v in entries.items():
        tensors.update(_entry_tensors(name, v))
        if isinstance(v, QuantizedWeights):
            formats[name] = v._meta()
    _safetensors.write(path, tensors, _file_metadata(formats))


def _entry_tensors(name: str, v: Any) -> dict[str, np.ndarray | _safetensors.BF16]:
    """The tensors :func:`save_file` stores an entry as (``neuropil quantize``
    writes them one entry at a time with this too)."""
    if not isinstance(v, QuantizedWeights):
        return {name: _plain_array(v)}
    parts = {f"{name}.qdata": v.data, f"{name}.scales": v.scales}
    return parts if v.mins is None else {**parts, f"{name}.mins": v.mins}


def _file_metadata(formats: dict[str, Any]) -> dict[str, str]:
    """The metadata of a :func:`save_file` file whose quantized entries have
    ``formats`` (name -> :meth:`QuantizedWeights._meta`)."""
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "neuropil.quant": json.dumps(formats, separators=(",", ":")),
    }


def _check_names(entries: dict[str, Any]) -> None:
    """Raises ArgumentError unless every entry maps to tensors of its own."""
    owner: dict[str, str] = {}
    clashes: list[str] = []
    for name, v in entries.items():
        if not isinstance(name, str):
            raise ArgumentError(f"entries keys must be strings; got {name!r}")
        if name == "__metadata__":
            raise ArgumentError(
                "entries key '__metadata__' is reserved by safetensors for the metadata; "
                "rename the entry"
            )
        quantized = isinstance(v, QuantizedWeights)
        for t in [f"{name}.{part}" for part in _PARTS] if quantized else [name]:
            if t in owner:
                clashes.append(f"{owner[t]!r} and {name!r} (tensor {t!r})")
            else:
                owner[t] = name
    if clashes:
        raise ArgumentError(
            "entries must name distinct tensors (a QuantizedWeights entry 'name' is stored "
            f"as 'name.qdata', 'name.scales', 'name.mins'); got clashes: {'; '.join(clashes)}"
        )


def load_file(path: str | Path) -> dict[str, Any]:
    """Reads a file written by :func:`save_file`: ``{name: QuantizedWeights | ndarray}``.

    Plain tensors come back in their dtype, except ``BF16`` ones (numpy has no
    bfloat16): those are ``float32`` arrays of the same values, exactly (twice
    the bytes; :func:`neuropil.torch.load_quantized` puts them into a model as
    bfloat16 without that widening).

    Raises:
        OSError: the file cannot be read (``FileNotFoundError``...), as from ``open``.
        FormatError: not safetensors, wrong format or version, a missing or
            malformed field, or buffers inconsistent with the recorded format.
    """
    return _load_entries(path, bf16_bits=False)


def _load_entries(path: str | Path, *, bf16_bits: bool) -> dict[str, Any]:
    """:func:`load_file`; with ``bf16_bits`` a plain ``BF16`` tensor comes back
    as its bits (``_safetensors.BF16``), not widened to float32."""
    tensors, meta, dtypes = _safetensors.read(path, bf16_as_f32=not bf16_bits)
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: metadata format must be {FORMAT!r}; got {meta.get('format')!r}")
    _check_format_version(path, meta.get("format_version"), FORMAT_VERSION)
    try:
        formats = json.loads(meta.get("neuropil.quant", ""))
    except (ValueError, RecursionError) as e:  # not JSON, nested too deep, huge numbers
        raise FormatError(
            f"{path}: metadata neuropil.quant is not JSON ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(formats, dict):
        raise FormatError(f"{path}: metadata neuropil.quant must be a JSON object")
    out: dict[str, Any] = {}
    used: set[str] = set()
    for name, f in formats.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(f, dict):
            raise FormatError(f"{where}: format entry must be an object; got {f!r}")
        try:
            shape = f["shape"]
            bits, g, scheme, sdt = f["bits"], f["group_size"], f["scheme"], f["scale_dtype"]
        except KeyError as e:
            raise FormatError(f"{where}: format entry lacks {e}") from e
        unknown = sorted(set(f) - set(_ENTRY_KEYS))
        if unknown:
            raise FormatError(
                f"{where}: format entry has unknown fields {unknown} (known: {list(_ENTRY_KEYS)})"
            )
        # Every field as save_file writes it: the constructor's defaults (None
        # for bits or group_size) and spellings ("ASYM") are no file's values.
        for field, v in (("bits", bits), ("group_size", g)):
            if type(v) is not int:
                raise FormatError(f"{where}: {field} must be an integer; got {_shown(v)}")
        if scheme not in SCHEMES:
            raise FormatError(
                f"{where}: scheme must be one of {list(SCHEMES)}; got {_shown(scheme)}"
            )
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise FormatError(f"{where}: shape must be two positive integers; got {shape!r}")
        if sdt not in ("float16", "float32"):
            raise FormatError(f"{where}: scale_dtype must be float16 or float32; got {sdt!r}")
        keys = [f"{name}.qdata", f"{name}.scales"] + (
            [f"{name}.mins"] if f"{name}.mins" in tensors else []
        )
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise FormatError(f"{where}: missing tensors {missing}")
        used.update(keys)
        for k in keys:  # (a quantized entry's parts are checked as load_file reads them)
            if bf16_bits and dtypes[k] == "BF16":
                tensors[k] = _safetensors.bf16_to_f32(tensors[k])
        scales = tensors[f"{name}.scales"]
        mins = tensors.get(f"{name}.mins")
        for arr, what in ((scales, "scales"), (mins, "mins")):
            if arr is not None and str(arr.dtype) != sdt:
                raise FormatError(f"{where}: {what} dtype must be {sdt}; got {arr.dtype}")
        # The constructor's checks (a pickle passes them too): the lengths, the
        # 2-D shapes the format gives, finite scales and mins.
        qw = QuantizedWeights.__new__(QuantizedWeights)
        try:
            qw._init(
                tensors[f"{name}.qdata"],
                scales,
                mins,
                tuple(shape),
                bits,
                g,
                scheme,
                ("qdata", "scales", "mins"),
            )
        except (ArgumentError, ValueError, TypeError, OverflowError) as e:
            raise FormatError(f"{where}: {e}") from e
        if name in tensors:
            raise FormatError(f"{where}: names both a quantized entry and a plain tensor")
        out[name] = qw
    for name, arr in tensors.items():
        if name not in used:
            out[name] = _safetensors.BF16(arr) if bf16_bits and dtypes[name] == "BF16" else arr
    return out


def _skip_patterns(skip: Any, what: str = "skip") -> tuple[str, ...]:
    """``skip`` as a tuple of patterns: one string is one pattern, ``None`` is
    none (as transformers' ``modules_to_not_convert=None``); anything else must
    be an iterable of strings. ``what`` names the argument in messages."""
    if skip is None:
        return ()
    if isinstance(skip, str):
        return (skip,)
    try:
        patterns = tuple(skip)
    except TypeError:
        raise ArgumentError(
            f"{what} must be a string, an iterable of strings or None; got {_shown(skip)}"
        ) from None
    for pat in patterns:
        if not isinstance(pat, str):
            raise ArgumentError(
                f"{what} patterns must be strings (module names or globs); got {_shown(pat)} "
                f"in {_shown(list(patterns))}"
            )
    return patterns


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether a module or tensor name matches a ``skip`` pattern: a glob on the
    full name (a tensor's also without ``.weight``) or on the name of a module
    that holds it (``model.layers.0`` keeps every layer of block 0, as
    transformers' ``modules_to_not_convert`` does), or one name component.
    ``neuropil quantize --skip`` matches the same way."""
    parts = name.split(".")
    names = _module_names(name)
    return any(pat in parts or any(fnmatch.fnmatchcase(n, pat) for n in names) for pat in skip)


def _module_names(name: str) -> list[str]:
    """``name`` and the names of the modules that hold it, longest first."""
    parts = name.split(".")
    return [name] + [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _check_skip(
    names: Iterable[str],
    skip: Iterable[str],
    what: str = "skip",
    aliases: Mapping[str, str] | None = None,
    note: str = "",
) -> None:
    """Raises :class:`ArgumentError` for the first ``skip`` pattern that matches
    none of ``names`` as :func:`_skipped` matches: a typo would otherwise
    quantize the layer it was meant to keep. The message names the pattern and
    the (up to three) nearest tensor or module names, or, when none is near, the
    first three names, then ``note``.

    ``aliases`` maps other names of some tensors to their names in ``names``
    (a GGUF file's own names to the ``transformers`` names ``neuropil
    quantize`` writes): a pattern matching an alias matches too, and an alias
    among the nearest names is shown with its translation, ``'blk.0.attn_q'
    (= 'model.layers.0.self_attn.q_proj')``."""
    names = list(names)
    aliases = dict(aliases or {})
    every = names + list(aliases)
    for pat in skip:
        if any(_skipped(n, (pat,)) for n in every):
            continue
        own = sorted({m for n in names for m in _module_names(n)})
        candidates = sorted({m for n in every for m in _module_names(n)})
        near = difflib.get_close_matches(pat, candidates, n=3)
        same = _translations(names, aliases) if aliases else {}
        shown = [f"{m!r} (= {same[m]!r})" if m in same else repr(m) for m in near]
        hint = (
            f"nearest: {', '.join(shown)}"
            if near
            else f"names look like {', '.join(map(repr, own[:3]))}"
            if own
            else "there are none"
        )
        raise ArgumentError(
            f"{what} pattern {pat!r} must match a tensor or module name; it matches no "
            f"tensor or module (of {len(names)} names; {hint}){note}"
        )


def _translations(names: list[str], aliases: dict[str, str]) -> dict[str, str]:
    """Each alias tensor or module name (see :func:`_check_skip`) -> its name
    among ``names``: the alias tensor's own name, else the shortest module of
    ``names`` that holds exactly the same tensors (``blk.0`` -> ``model.layers.0``)."""
    held: dict[str, set[str]] = {}
    for n in names:
        for m in _module_names(n):
            held.setdefault(m, set()).add(n)
    by_tensors: dict[frozenset[str], str] = {}
    for m in sorted(held, key=lambda m: (len(m), m)):
        by_tensors.setdefault(frozenset(held[m]), m)
    alias_held: dict[str, set[str]] = {}
    for alias, n in aliases.items():
        for m in _module_names(alias):
            alias_held.setdefault(m, set()).add(n)
    out = {m: by_tensors[frozenset(t)] for m, t in alias_held.items() if frozenset(t) in by_tensors}
    return out | aliases

"""``neuropil quantize IN OUT``: a safetensors or GGUF file in, a packed safetensors file out.

Every 2-D float tensor with at least ``--min-size`` elements whose name matches
no ``--skip`` pattern is quantized; everything else is copied in its dtype
(float16, bfloat16, float32, float64, ints: a bfloat16 tensor stays 2 bytes a
value). GGUF tensors already in the target block format (``Q4_0``, ``Q4_1``,
``Q8_0``) are carried over byte for byte, whatever their size (``--min-size``
does not turn packed blocks into float); other GGUF block types are
dequantized by the ``gguf`` package first. A GGUF block tensor kept in float
(by ``--skip``, or as 1-D) is dequantized to float32, as ``d * q (+ m)``
needs (float16 only where it holds every value exactly, which real weights
rarely do: none of SmolLM2's 211 block tensors), so it grows (a ``Q8_0``
tensor 3.8x, a ``Q4_1`` one 6.4x). A Llama-architecture GGUF (SmolLM2) gets
the ``transformers`` tensor names and q/k row order, so the output loads into
the model ``from_pretrained(..., gguf_file=...)`` builds; other GGUF
architectures keep their GGUF names. ``--skip`` patterns match as
``quantize_model``'s ``skip`` does (a glob on the name, with or without
``.weight``, or on an enclosing module's name, or one name component); for a
renamed GGUF they match either name, the file's own (``blk.0.attn_q``, as
``gguf-dump`` shows it) or the ``transformers`` one
(``model.layers.0.self_attn.q_proj``). A pattern that matches no tensor is an
error (exit 2) before anything is written, as a typo would otherwise quantize
the layer it meant to keep. The output loads with ``neuropil.quant.load_file``
(bfloat16 as float32 values) and ``neuropil.torch.load_quantized``. The report
lists the quantized tensors and (``--json``: ``kept``) those copied, with
their type in the file and the dtype written. When OUT is stdout (``-``,
``/dev/stdout``, ``| cat > out``), the report (text or ``--json``) goes to
stderr: printed after the file's bytes it would corrupt the file.

Memory: one tensor at a time (its float32 values and packed form), whatever the
size of the model. The input is read through a memory map, and each tensor is
written as soon as it is converted (``_safetensors_stream``: the header, which
comes first, is filled in at the end), into a temporary file renamed over OUT
at the end; stdout or a pipe gets the data through an anonymous temporary file
(in ``TMPDIR``), after the header.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shlex
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

import numpy as np

from . import _safetensors
from . import _safetensors_stream as _stream
from ._quant_sources import _GGUF_SCHEMES, Lazy, Source, read_any
from .errors import ArgumentError, NeuropilError, _shown
from .quant import (
    _ENTRY_KEYS,
    _PARTS,
    QuantizedWeights,
    _check_names,
    _check_skip,
    _entry_tensors,
    _file_metadata,
    _resolve,
    _skip_patterns,
    _skipped,
    quantize,
)

#: Bytes of float32 values compared at once by :func:`_rel_error`.
_ERROR_BLOCK = 8 << 20


def _rel_error(w: np.ndarray, q: QuantizedWeights) -> float:
    """``|w - q| / |w|`` (Frobenius norms), over blocks of rows of a few MiB:
    a whole dequantized matrix (and the difference) would double the memory
    the largest tensor takes."""
    rows, cols = q.shape
    step = max(1, _ERROR_BLOCK // (4 * cols))
    diff = norm = 0.0
    for a in range(0, rows, step):
        b = min(rows, a + step)
        mins = None if q.mins is None else q.mins[a:b]
        part = QuantizedWeights(
            q.data[a:b], q.scales[a:b], mins, (b - a, cols), q.bits, q.group_size, q.scheme
        )
        wa = w[a:b].astype(np.float32, copy=False)  # (float16, float64: this block only)
        d = part.dequantize()
        np.subtract(wa, d, out=d)
        diff += float(np.vdot(d, d))
        norm += float(np.vdot(wa, wa))
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-30)


def _check_paths(src: Path, dst: Path) -> None:
    """The output must be a file in an existing folder, and not the input."""
    if dst.is_dir():
        raise ArgumentError(f"output must be a file path; got the folder {str(dst)!r}")
    parent = dst.parent
    if not parent.is_dir():
        raise ArgumentError(
            f"output's folder must exist; got {str(dst)!r} ({str(parent)!r} "
            f"{'is not a folder' if parent.exists() else 'does not exist'})"
        )
    try:
        same = dst.exists() and src.exists() and os.path.samefile(src, dst)
    except OSError:
        same = False
    if same or src.resolve() == dst.resolve():
        raise ArgumentError(
            f"output must differ from the input (it would replace the original weights); "
            f"got {str(dst)!r} for input {str(src)!r}"
        )


def convert(
    src: str | Path,
    dst: str | Path,
    bits: int | None = None,
    group_size: int | None = None,
    scheme: str = "asym",
    skip: str | Iterable[str] | None = (),
    min_size: int = 4096,
    search: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantizes the tensors of ``src`` into ``dst``; returns the report.

    ``dst`` is a path, or the string ``"-"`` for stdout (a file named ``-``:
    ``"./-"`` or a ``Path``). One tensor is held at a time: the input is read
    through a memory map, and each tensor is converted and written before the
    next one (see ``_safetensors_stream``), into a temporary file renamed over
    ``dst`` at the end, so an error or interrupt leaves an existing ``dst`` as
    it was. For stdout or a pipe, the data waits in an anonymous temporary file
    (in ``TMPDIR``) until the header, which comes first, is known.

    Raises:
        ArgumentError: a bad ``bits``/``group_size``/``scheme`` or ``min_size``,
            or a ``dst`` that is a folder, lies in a missing folder or is ``src``
            itself (checked before anything is read), or a ``skip`` pattern
            that matches no tensor or module of ``src``, or tensor names that
            would clash in ``dst`` (``w`` quantized beside a ``w.scales``)
            (checked before anything is quantized or written).
        FormatError: ``src`` is unreadable, not safetensors or GGUF, or already
            a neuropil quantized file.
        NeuropilError: ``dst`` cannot be written.
    """
    from tqdm import tqdm

    bits, group_size, scheme = _resolve(bits, group_size, scheme)
    # The core checks the format combination; a one-group matrix costs nothing.
    quantize(np.zeros((1, 32), np.float32), bits, group_size, scheme)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ArgumentError(f"min_size must be an integer >= 0; got {_shown(min_size)}")
    stdout = _stdout_bytes() if _is_dash(dst) else None
    if stdout is None:
        _check_paths(Path(src), Path(dst))
    source = read_any(src)
    skip = _skip_patterns(skip, "--skip")  # one string: one pattern; None: none
    gguf_names = source.gguf_names
    _check_skip(
        source.entries,
        skip,
        "--skip",
        aliases={g: n for n, g in gguf_names.items()},
        note=_renaming_note(gguf_names),
    )

    def skipped(name: str) -> bool:  # by its name, or by its GGUF name before renaming
        return _skipped(name, skip) or (name in gguf_names and _skipped(gguf_names[name], skip))

    packed = {
        name: _packs(value, skipped(name), scheme, min_size)
        for name, (value, _) in source.entries.items()
    }
    # save_file's check of the names (`w` packed as `w.qdata`, `w.scales`,
    # `w.mins` beside a tensor `w.scales`), before any tensor is converted: it
    # tells packed entries by their type, which the placeholder has.
    _check_names({n: _PACKED if p else None for n, p in packed.items()})
    fmt = _Format(bits, group_size, scheme, search)
    rows: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    formats: dict[str, Any] = {}
    before = after = 0
    try:
        with (
            _stream.writing_stream(stdout)
            if stdout is not None
            else _stream.writing(dst, _header_room(source.entries, packed))
        ) as out:
            for name, (value, nbytes) in tqdm(
                source.entries.items(), desc="quantize", disable=not progress, unit="tensor"
            ):
                entry, row = _convert_one(name, value, packed[name], fmt, source)
                before += nbytes
                if isinstance(entry, QuantizedWeights):
                    rows.append(row)
                    formats[name] = entry._meta()
                    after += entry.memory_bytes
                else:
                    kept.append(row)
                    after += entry.nbytes
                for part, arr in _entry_tensors(name, entry).items():
                    out.add(part, arr)
                del entry  # (before the next one is made: one tensor at a time)
            out.finish(_file_metadata(formats))
    except BrokenPipeError:
        raise  # a reader of stdout that left: the command line exits quietly
    except OSError as e:
        raise NeuropilError(f"output {str(dst)!r}: cannot write: {e}") from e
    return {
        "input": str(src),
        "output": str(dst),
        "bits": bits,
        "group_size": group_size,
        "scheme": scheme,
        "bytes_before": before,
        "bytes_after": after,
        "quantized_tensors": len(rows),
        "tensors": rows,
        "kept": kept,
    }


class _Format(NamedTuple):
    bits: int
    group_size: int
    scheme: str
    search: bool


#: Marks an entry :func:`convert` will store packed, for ``_check_names``
#: (which tells them by type) before any is made.
_PACKED = QuantizedWeights.__new__(QuantizedWeights)


def _peek(value: Any) -> tuple[tuple[int, ...], bool]:
    """A :attr:`Source.entries` value's shape, and whether its values are
    floats (GGUF blocks: dequantized to float32), without reading it."""
    if isinstance(value, tuple):  # GGUF blocks
        return tuple(value[2]), True
    if isinstance(value, (Lazy, _safetensors.BF16)):
        return value.shape, isinstance(value, _safetensors.BF16) or value.floating
    return value.shape, value.dtype.kind == "f"


def _packs(value: Any, skipped: bool, scheme: str, min_size: int) -> bool:
    """Whether an entry is stored packed: GGUF blocks of the target scheme
    (carried over), or a float matrix of at least ``min_size`` values, unless
    ``--skip`` keeps it in float (a skipped block tensor is dequantized)."""
    if skipped:
        return False
    if isinstance(value, tuple) and value[0] == scheme:
        return True
    shape, floating = _peek(value)
    size = int(np.prod(shape))
    # (an empty matrix has nothing to pack: kept, as under --min-size)
    return len(shape) == 2 and floating and size >= min_size and size > 0


def _load(value: Any) -> Any:
    return value.load() if isinstance(value, Lazy) else value


def _convert_one(
    name: str, value: Any, packed: bool, fmt: _Format, source: Source
) -> tuple[Any, dict[str, Any]]:
    """One entry as it is stored (a :class:`QuantizedWeights`, an array or
    :class:`_safetensors.BF16` bits) and its row of the report."""
    kind = source.kinds[name]
    if isinstance(value, tuple):  # GGUF blocks
        gscheme, raw, shape = value
        q = QuantizedWeights.from_gguf(_load(raw), gscheme, shape)
        if packed and gscheme == fmt.scheme:
            return q, {"tensor": name, "shape": list(shape), "from": kind, "rel_error": 0.0}
        value = q.dequantize()  # (packed again below, or copied in float)
        del q  # (the blocks' copy goes before the matrix is packed again)
    value = _load(value)
    bf16 = isinstance(value, _safetensors.BF16)
    stored = value.bits if bf16 else np.asarray(value)
    if not packed:
        # Copied in its dtype (float16, bfloat16, float32, float64, ints);
        # values dequantized from GGUF blocks as float32, or float16 where
        # that holds every one of them exactly.
        if name in source.dequantized:
            value = _float16_if_exact(stored)
        dtype = "bfloat16" if bf16 else str(value.dtype)
        return value, {"tensor": name, "shape": list(stored.shape), "from": kind, "dtype": dtype}
    arr = value.to_f32() if bf16 else stored
    try:
        q = quantize(arr, fmt.bits, fmt.group_size, fmt.scheme, search=fmt.search)
    except NeuropilError as e:
        # The core names its argument `w`; the user needs the tensor, and a
        # hint that works as printed: the name as a glob matching only
        # itself ("[" and "*" escaped), quoted for the shell.
        hint = shlex.quote(glob.escape(name))
        raise type(e)(
            f"tensor {name!r} {tuple(arr.shape)}: {e} (keep it in float with --skip {hint})"
        ) from e
    row = {"tensor": name, "shape": list(arr.shape), "from": kind, "rel_error": _rel_error(arr, q)}
    return q, row


# At most the characters of one field of a packed entry's format in the
# metadata besides its key, `"key":value,`: 4 and the value, at most 41 (a shape
# of two 19-digit extents; "float16" takes 9), and some to spare.
_FIELD_ROOM = 48


def _header_room(entries: Mapping[str, tuple[Any, int]], packed: Mapping[str, bool]) -> int:
    """An upper bound of the output's header, reserved before any tensor is
    written (see ``_safetensors_stream``): every entry's tensors' entries, and a
    packed entry's format in the metadata, counted twice as it is a JSON
    string there (a character escaped takes at most two)."""
    room = 256  # (the metadata's other keys and values, and the braces)
    for name, (value, _) in entries.items():
        if packed[name]:
            room += sum(_stream.entry_room(f"{name}.{part}", 2) for part in _PARTS)
            fields = sum(len(k) + _FIELD_ROOM for k in _ENTRY_KEYS)
            room += 2 * (len(json.dumps(name)) + 4 + fields)  # (`"name":{...},`)
        else:
            room += _stream.entry_room(name, len(_peek(value)[0]))
    return room


def _is_dash(dst: str | Path) -> bool:
    """Whether ``dst`` is ``"-"``, stdout (a string: a ``Path`` is a file name)."""
    return isinstance(dst, str) and dst == "-"


def _stdout_bytes() -> IO[bytes]:
    """Binary stdout, for OUT ``-``, emptied of text printed before.

    Raises:
        ArgumentError: stdout is not a binary stream (closed, or replaced by a
            text-only one).
    """
    buffer = getattr(sys.stdout, "buffer", None)
    if sys.stdout is None or buffer is None or sys.stdout.closed:
        raise ArgumentError(
            f"output '-' means stdout, which must be an open binary stream; got {sys.stdout!r}"
        )
    sys.stdout.flush()
    return cast("IO[bytes]", buffer)


def _float16_if_exact(values: np.ndarray) -> np.ndarray:
    """Dequantized GGUF values (float32) as float16 when that holds each of them
    exactly, else as they are (the usual case: ``d * q + m`` needs float32)."""
    half = values.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), values) else values


def _renaming_note(gguf_names: dict[str, str]) -> str:
    """For an error about a renamed GGUF file: how its names were renamed."""
    if not gguf_names:
        return ""
    # (a layer's tensor as the example where there is one, a q projection first)
    pairs = sorted(gguf_names.items(), key=lambda p: (".attn_q." not in p[1], p[1][:4] != "blk."))
    name, gguf = (s.removesuffix(".weight") for s in pairs[0])
    return (
        f"; GGUF tensor names are renamed to transformers' names ({gguf} -> {name}); "
        "patterns may use either"
    )


def _is_stdout(path: str | Path) -> bool:
    """Whether ``path`` exists and is the file, pipe or device open as fd 1
    (``/dev/stdout``, or the file stdout is redirected to)."""
    try:
        return os.path.samestat(os.fstat(1), os.stat(path))
    except (OSError, ValueError):  # fd 1 closed, or OUT missing or unreachable
        return False


def main(args: Any) -> int:
    # `quantize IN /dev/stdout | ...`: the file's bytes go to stdout, so the
    # report goes to stderr instead of after them (checked before the save,
    # which may rename a new file over a regular OUT).
    out = sys.stderr if _is_dash(args.output) or _is_stdout(args.output) else sys.stdout
    report = convert(
        args.input,
        args.output,
        args.bits,
        args.group_size,
        args.scheme,
        tuple(args.skip or ()),
        args.min_size,
        args.search,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return 0
    worst = sorted(report["tensors"], key=lambda r: -r["rel_error"])[:10]
    if worst:
        print("tensor | shape | relative RMS error", file=out)
        for r in worst:
            print(f"{r['tensor']} | {tuple(r['shape'])} | {r['rel_error']:.4g}", file=out)
        mean = np.mean([r["rel_error"] for r in report["tensors"]])
        print(
            f"... {len(report['tensors'])} tensors quantized, mean relative error {mean:.4g}",
            file=out,
        )
    if report["kept"]:
        counts = Counter(r["dtype"] for r in report["kept"])
        print(
            f"... {len(report['kept'])} tensors kept unquantized ("
            + ", ".join(f"{dt}: {c}" for dt, c in sorted(counts.items()))
            + ")",
            file=out,
        )
    # GGUF block tensors of another scheme were dequantized and packed again
    # (one more rounding): say which scheme keeps them exactly.
    again = Counter(
        r["from"] for r in report["tensors"] if r["from"] in _GGUF_SCHEMES and r["rel_error"]
    )
    for kind, n in sorted(again.items()):
        print(
            f"note: {n} {kind} tensors of the GGUF file were re-quantized; "
            f"--scheme {_GGUF_SCHEMES[kind]} keeps them as they are",
            file=out,
        )
    mb = 1 << 20
    before, after = report["bytes_before"], report["bytes_after"]
    # (8-bit from a 4-bit GGUF, or tensors kept in float, can make the output larger)
    ratio = (
        f"{before / max(after, 1):.2f}x smaller"
        if after <= before
        else f"{after / max(before, 1):.2f}x larger"
    )
    print(
        f"{report['input']}: {before / mb:.1f} MiB -> {report['output']}: "
        f"{after / mb:.1f} MiB ({ratio})",
        file=out,
    )
    return 0

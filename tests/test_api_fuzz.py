"""Adversarial bad-input audit of the public Python API.

Every public entry point (neuropil.quant, .torch, .neurons, .flyhash, .range,
.hf, .membrane, .windows) gets wrong types, odd dtypes and layouts, empty and
huge extents, NaN/Inf and out-of-domain parameters, and damaged files. The
conventions checked (CONVENTIONS.md, errors.py):

- bad input raises a neuropil error (``ShapeError``, ``DTypeError``,
  ``ArgumentError``, ``FormatError``; ``IndexError`` for an index out of
  range, ``OSError`` for a file that cannot be opened) whose message names the
  argument, the expected and the found value; never a panic, a crash, a hang,
  a bare ``TypeError``/``ValueError`` from deep inside, or a silent clamp;
- a valid edge case (0 rows, a non-contiguous or big-endian view) gives the
  answer of the plain case or of a numpy reference;
- a failed ``save`` leaves the file it would have replaced intact.

Calls that could crash or hang the interpreter (huge extents, kernels on
random shapes, parsers on random bytes, saves under a file-size limit) run in
a fresh interpreter (:func:`run_snippet`, :func:`run_cases`), so one crash
fails its test instead of ending the session. Property tests use hypothesis
inside those interpreters, derandomized (``NEUROPIL_FUZZ_RANDOM=1`` explores
new examples each run, ``NEUROPIL_FUZZ_SCALE=20`` runs 20 times as many).

Defects found in modules owned elsewhere are ``xfail(strict=True)`` with the
reason; the test passes (XPASS fails) once they are fixed. A message that does
not show the found value is one (``LACKS_FOUND``: only that failure is expected).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import types
from typing import Any

import numpy as np
import pytest

import neuropil
from neuropil import ArgumentError, DTypeError, FormatError, ShapeError
from neuropil.flyhash import BinaryIndex, FlyHash
from neuropil.neurons import InputSparseFFN, NeuronCache, SparseFFN
from neuropil.quant import QuantizedWeights, quantize, save_file
from neuropil.range import RangeIndex
from neuropil.windows import SlidingWindows

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_HF = HAS_TORCH and importlib.util.find_spec("transformers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs torch and transformers")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HYPOTHESIS_RANDOM = os.environ.get("NEUROPIL_FUZZ_RANDOM") == "1"
HYPOTHESIS_SCALE = int(os.environ.get("NEUROPIL_FUZZ_SCALE", "1"))  # examples x this


def xfail(reason: str, raises: Any = None) -> pytest.MarkDecorator:
    """A defect in a module this audit does not own: expected to fail until fixed
    (failing with ``raises`` only, where given: any other failure still fails)."""
    return pytest.mark.xfail(strict=True, reason=reason, raises=raises)


# ------------------------------------------------------------------ machinery
def run_snippet(code: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Runs ``code`` in a fresh interpreter; fails on a non-zero exit (a crash,
    an uncaught exception), on a panic in its output, or past ``timeout`` (a hang)."""
    full_env = {**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-2000:]
        pytest.fail(f"hung: no exit within {timeout} s; last output:\n{out!r}")
    both = proc.stdout + proc.stderr
    assert "PanicException" not in both and "panicked" not in both, both[-4000:]
    assert proc.returncode == 0, f"exit status {proc.returncode}:\n{both[-4000:]}"
    return proc.stdout


_CASE_RUNNER = """
import json, sys, traceback
def _run(cases):
    for label, code in cases:
        print(json.dumps({"start": label}), flush=True)
        try:
            exec(code, globals())
            res = {"label": label, "exc": None, "mro": [], "msg": ""}
        except BaseException as e:
            res = {"label": label, "exc": type(e).__name__,
                   "mro": [c.__name__ for c in type(e).__mro__], "msg": str(e)[:2000]}
        print(json.dumps(res), flush=True)
"""


def run_cases(setup: str, cases: dict[str, str], timeout: float = 120) -> dict[str, dict]:
    """Runs each statement of ``cases`` in one fresh interpreter after ``setup``.

    Returns ``{label: {"exc": name or None, "mro": [...], "msg": ...}}``. The
    first case without a result, whether it started or not (setup itself may
    have died or hung), is reported as ``exc="CRASH"`` if the interpreter
    ended (the message: its exit status and stderr) or ``exc="HANG"`` if it
    was still running at ``timeout`` (the message says how long and where);
    the cases after it are ``NOT RUN``, and the others keep their results."""
    script = (
        textwrap.dedent(setup)
        + _CASE_RUNNER
        + f"\n_run(json.loads({json.dumps(json.dumps(list(cases.items())))}))\n"
    )
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}

    def text(b: str | bytes | None) -> str:
        return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env
        )
        out, err, status = proc.stdout, proc.stderr, "CRASH"
        why = f"the interpreter exited with status {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        out, err, status = text(e.stdout), text(e.stderr), "HANG"
        why = f"no result within the {timeout} s timeout (interpreter start included)"
    results: dict[str, dict] = {}
    started = None
    for line in out.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "start" in rec:
            started = rec["start"]
        else:
            results[rec["label"]] = rec
            started = None
    unfinished = [label for label in cases if label not in results]
    if unfinished:
        first = unfinished[0]
        where = "while running this case" if started == first else "before this case started"
        if not results and started is None:
            where = "during setup, before any case started"
        results[first] = {"exc": status, "mro": [], "msg": f"{why}, {where}\n{err[-3000:]}"}
        for label in unfinished[1:]:
            results[label] = {"exc": "NOT RUN", "mro": [], "msg": f"after {first!r}: {status}"}
    return {label: results[label] for label in cases}


class MissingFoundValue(AssertionError):
    """The message does not show the found value (see :func:`expect`)."""


def check_message(msg: str, needles: tuple[str, ...]) -> None:
    """``msg`` holds every needle (the argument's name, the expected and the
    found value). A needle ``"got X"`` is the found value: X must come after
    the message's first "got" (``got dtype int64``, ``got shape (0, 8)`` hold
    "got int64", "got (0, 8)"); these are checked last and raise
    :class:`MissingFoundValue`, so a defect mark can expect just that."""
    for n in needles:
        if not n.startswith("got "):
            assert n in msg, f"{n!r} not in the message: {msg!r}"
    got = re.search(r"\bgot\b", msg)
    for n in needles:
        if n.startswith("got ") and (got is None or n[4:] not in msg[got.end() :]):
            raise MissingFoundValue(f"found value {n[4:]!r} not shown after 'got': {msg!r}")


def expect(fn: Any, exc: type[BaseException] | tuple, *needles: str) -> BaseException:
    """``fn()`` raises ``exc`` whose message holds every needle (:func:`check_message`)."""
    with pytest.raises(exc) as info:
        fn()
    check_message(str(info.value), needles)
    return info.value


def check_result(res: dict, exc: str | None, needles: tuple[str, ...]) -> None:
    """A :func:`run_cases` result raised ``exc`` (a class name in its MRO)
    with every needle in its message (:func:`check_message`; ``exc=None``: the
    call succeeded)."""
    assert res["exc"] not in ("CRASH", "HANG", "NOT RUN"), f"{res['exc']}:\n{res['msg']}"
    assert "PanicException" not in res["mro"], res
    if exc is None:
        assert res["exc"] is None, res
        return
    assert exc in res["mro"], res
    check_message(res["msg"], needles)


# ------------------------------------------------------------------ objects
rng = np.random.default_rng(20240607)
W = rng.standard_normal((8, 64)).astype(np.float32)
X64 = rng.standard_normal(64).astype(np.float32)
FRAMES = rng.standard_normal((20, 4)).astype(np.float32)
KEYS = rng.standard_normal((100, 8)).astype(np.float32)
QUERIES = rng.standard_normal((3, 8)).astype(np.float32)
H, D = 16, 8
GATE, UP = rng.standard_normal((2, H, D)).astype(np.float32)
DOWN = rng.standard_normal((D, H)).astype(np.float32)
XF = rng.standard_normal((3, D)).astype(np.float32)
XFH = rng.standard_normal((5, 16)).astype(np.float32)
CODES = rng.integers(0, 256, (6, 2), dtype=np.uint8)


@functools.cache
def qw() -> QuantizedWeights:
    return quantize(W)


@functools.cache
def fh() -> FlyHash:
    return FlyHash(16, seed=0)


def bix() -> BinaryIndex:
    ix = BinaryIndex(16)
    ix.add(CODES)
    return ix


@functools.cache
def rix() -> RangeIndex:
    return RangeIndex(KEYS)


def sw() -> SlidingWindows:
    return SlidingWindows(FRAMES, 3, targets={"a": np.arange(20)}, target_offset=1)


def readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.setflags(write=False)
    return a


def noncontig(a: np.ndarray) -> np.ndarray:
    """The same values as ``a``, every other element of a wider array (2-D: columns)."""
    return np.repeat(a, 2, axis=-1)[..., ::2]


def negstride(a: np.ndarray) -> np.ndarray:
    """The same values as ``a`` through a view with a negative stride."""
    return np.ascontiguousarray(a[::-1])[::-1]


LAYOUTS = {
    "noncontiguous": noncontig,
    "negative-stride": negstride,
    "fortran": np.asfortranarray,
    "read-only": readonly,
    "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "float64": lambda a: a.astype(np.float64),
    "float16-exact": lambda a: a.astype(np.float16),
}


# ================================================================== bad arguments, in process
# Each case calls an entry point with one bad argument: it must raise the given
# exception, with every needle in its message (check_message): "<arg> must" (the
# argument named) and "got <found>" (the value found). Tables are written per
# entry point and argument, as value kinds x entry points:
# - rows(entry, arg, call, table): the cases call(v) for the rows
#   (kind, v, exception, *needles[, marks]) of table, "<arg> must" added to the
#   needles (unless arg is None); a v that is a function is called when the case
#   runs (torch tensors, objects of helpers);
# - scalars(*values): rows of values refused with ArgumentError, shown by repr();
# - keywords(entry, call, arg=values, ...): the scalars() rows of call(arg=v);
# - bad_arrays(good, kinds): rows of wrong-dtype, -rank or -extent and NaN/Inf
#   variants of an array; out_of_range(...): IndexError cases.
def P(id_: str, fn: Any, exc: Any, *needles: str, marks: Any = ()) -> Any:
    return pytest.param(fn, exc, needles, id=id_, marks=marks)


def _run_with(call: Any, v: Any) -> Any:
    return call(v() if isinstance(v, types.FunctionType) else v)


def rows(entry: str, arg: str | None, call: Any, table: list, marks: Any = ()) -> list:
    out = []
    for kind, v, exc, *rest in table:
        needles = [n for n in rest if isinstance(n, str)]
        more = [m for m in rest if not isinstance(m, str)]
        name = f"{entry}-{arg}-{kind}" if arg else f"{entry}-{kind}"
        needles = [f"{arg} must", *needles] if arg else needles
        fn = functools.partial(_run_with, call, v)
        out.append(P(name, fn, exc, *needles, marks=[*marks, *more]))
    return out


def _label(v: Any) -> str:
    """A short id for a bad value: lists by name, big ints as 2**k, 2**k-1 or 10**k."""
    if isinstance(v, list):
        return "list" if v else "empty-list"
    if type(v) is not int or abs(v) < 2**32:
        return repr(v)
    k, digits = v.bit_length(), str(v)
    if v in (2 ** (k - 1), 2**k - 1):
        return f"2**{k - 1}" if v == 2 ** (k - 1) else f"2**{k}-1"
    return f"10**{len(digits) - 1}" if digits.rstrip("0") == "1" else digits


def scalars(*values: Any) -> list:
    """Rows of bad values the message shows as repr() does: ArgumentError, "got <repr>"."""
    return [(_label(v), v, ArgumentError, f"got {v!r}") for v in values]


def keywords(entry: str, call: Any, **bad: tuple) -> list:
    """scalars() rows of ``call(arg=v)`` for each keyword argument and its bad values."""
    out = []
    for arg, values in bad.items():
        out += rows(entry, arg, lambda v, a=arg: call(**{a: v}), scalars(*values))
    return out


ARRAY_KINDS = {
    "bool": lambda a: a > 0,
    "0d": lambda a: np.float32(1),
    "1d": lambda a: a[0],
    "3d": lambda a: a[None],
    "width": lambda a: a[..., :-1],  # one column short
    "1d-width": lambda a: a[0, :-1],
    "0-rows": lambda a: a[:0],
    "0-cols": lambda a: a[:, :0],
    "nan": lambda a: a * np.nan,
    "inf": lambda a: a * np.inf,
}


def bad_arrays(good: np.ndarray, kinds: str) -> list:
    """Rows of the variants of the array ``good`` named in ``kinds`` (a dtype
    name, or a key of ARRAY_KINDS): a wrong dtype (DTypeError), rank or extent
    (ShapeError), NaN or Inf (ArgumentError), each with its found value."""
    out = []
    for kind in kinds.split():
        v = ARRAY_KINDS[kind](good) if kind in ARRAY_KINDS else good.astype(kind)
        if kind in ("nan", "inf"):
            first = v.flat[np.flatnonzero(~np.isfinite(v))[0]]
            out.append((kind, v, ArgumentError, f"got {'NaN' if first != first else first}"))
        elif v.shape != good.shape:
            out.append((kind, v, ShapeError, f"got {v.shape}"))
        else:
            out.append((kind, v, DTypeError, f"got {v.dtype}"))
    return out


def out_of_range(entry: str, name: str, call: Any, *values: Any) -> list:
    """IndexError cases: ``call(v)`` refuses the (first) index of v, naming it."""
    out = []
    for v in values:
        i = int(np.ravel(v)[0])
        fn = functools.partial(call, v)
        needle = f"{name} index {i} is out of range"
        out.append(P(f"{entry}-index={_label(i)}", fn, IndexError, needle))
    return out


def _qw_with(**kw: Any) -> QuantizedWeights:
    """``QuantizedWeights`` built from qw()'s arguments, those of ``kw`` replaced."""
    q = qw()
    args = {"data": q.data, "scales": q.scales, "mins": q.mins, "shape": (8, 64), "bits": 4,
            "group_size": 64, "scheme": "asym"}  # fmt: skip
    return QuantizedWeights(**{**args, **kw})


def nc() -> NeuronCache:
    return NeuronCache(8, 3)


def ffn(cls: type = SparseFFN, **kw: Any) -> Any:
    return cls(GATE, UP, DOWN, **kw)


def _torch() -> Any:
    return importlib.import_module("torch")


def T(a: np.ndarray, **kw: Any) -> Any:
    """``a`` as a torch tensor (``requires_grad``, ``dtype`` ... as keywords)."""
    torch = _torch()
    grad = kw.pop("requires_grad", False)
    return torch.tensor(a, **kw).requires_grad_(grad)


def _linear(nan_bias: bool = False) -> Any:
    torch = _torch()
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8)
    if nan_bias:
        with torch.no_grad():
            lin.bias.fill_(float("nan"))
    return lin


def _mlp() -> Any:
    torch = _torch()
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def _ql() -> Any:
    from neuropil.torch import QuantizedLinear

    return QuantizedLinear.from_linear(_linear())


def _torch_mod() -> Any:
    return importlib.import_module("neuropil.torch")


def _membrane() -> Any:
    return importlib.import_module("neuropil.membrane")


def bank() -> Any:
    return _membrane().MembraneBank(8, 2, 2)


def V(*shape: int, **kw: Any) -> Any:
    return _torch().rand(*(shape or (8, 2, 2)), generator=_torch().Generator().manual_seed(0), **kw)


NAN, INF = float("nan"), float("inf")
# messages that show no found value: library defects, visible until fixed
LACKS_FOUND = xfail("message lacks found value", raises=MissingFoundValue)

# fmt: off
QUANT_CASES = [
    *rows("quantize", "w", quantize, [
        ("str", "abc", DTypeError, "float32", "got <U3"),
        ("None", None, DTypeError, "got object"),
        ("ragged", [[1.0] * 64, [1.0]], DTypeError, "got list"),
        *bad_arrays(W, "object complex64 int64 uint8 bool 1d 3d"),
        ("0d", np.float32(1), ShapeError, "(rows, cols)", "got ()"),
        ("0-rows", W[:0], ShapeError, "empty", "got shape (0, 64)"),
        ("0-cols", W[:, :0], ShapeError, "empty", "got shape (8, 0)"),
        ("nan", np.where(W > 1, np.nan, W), ArgumentError, "got NaN at flat index 3"),
        ("-inf", np.where(W > 1, -np.inf, W), ArgumentError, "got -inf at flat index 3"),
        ("beyond-float16", W * 1e30, ArgumentError, "float32", "got row 0 group 0 with scale inf"),
    ]),
    *rows("quantize", "bits", lambda v: quantize(W, bits=v), [
        *scalars(True, 4.0, -1, 2**62), ("5", 5, ArgumentError, "2, 3, 4, 8", "got 5")]),
    *keywords("quantize", lambda **kw: quantize(W, **kw), group_size=(0, 2**62), scheme=(None,),
              search=("no",)),
    P("quantize-q4_0-48-cols", lambda: quantize(W[:, :48], scheme="q4_0"), ArgumentError,
      "w must", "divisible by 32", "got 48 columns"),
    *rows("quantize", "scale_dtype", lambda v: quantize(W, scale_dtype=v), [
        ("float64", "float64", ArgumentError, 'got "float64"'), *scalars(None)]),
    *rows("matvec", "x", lambda v: qw().matvec(v), [
        ("str", "x", DTypeError, "got <U1"),
        ("None", None, DTypeError, "got object"),
        ("len", X64[:63], ShapeError, "(64,)", "got (63,)"),
        ("3d", X64[None, None], ShapeError, "got (1, 1, 64)"),
        *bad_arrays(X64, "0d int64 bool complex128 object nan"),
    ]),
    *rows("matvec", "level", lambda v: qw().matvec(X64, level=v), [
        ("sse", "sse", ArgumentError, 'got "sse"'), *scalars(3)]),
    *rows("matvec_rows", "rows", lambda v: qw().matvec_rows(X64, v), [
        ("str", "a", ArgumentError, "got dtype <U1"),
        ("float", [1.0], ArgumentError, "got dtype float64"),
        ("bool", np.array([True]), ArgumentError, "got dtype bool"),
        ("None", None, ArgumentError, "got dtype object"),
        ("2d", [[1, 2], [3, 4]], ShapeError, "got shape (2, 2)"),
    ]),
    *out_of_range("matvec_rows", "rows", lambda v: qw().matvec_rows(X64, v),
                  [-1], [8], np.array([2**63], np.uint64)),
    P("matvec_rows-x-2d", lambda: qw().matvec_rows(XF[:2, :1].repeat(64, 1), [1]), ShapeError,
      "x must", "got (2, 64)"),
    P("from_gguf-raw-short", lambda: QuantizedWeights.from_gguf(b"\0" * 10, "q4_0", (1, 32)),
      FormatError, "expected 18 bytes", "got 10"),
    P("from_gguf-raw-str", lambda: QuantizedWeights.from_gguf("abc", "q4_0", (1, 32)), DTypeError,
      "raw must", "got dtype <U3"),
    P("from_gguf-raw-nan-scale", lambda: QuantizedWeights.from_gguf(
        np.frombuffer(np.float16(np.nan).tobytes() + b"\0" * 16, np.uint8), "q4_0", (1, 32)),
      FormatError, "block 0 has a non-finite scale (NaN)"),
    P("from_gguf-shape-neg", lambda: QuantizedWeights.from_gguf(b"\0" * 18, "q4_0", (-1, 32)),
      ArgumentError, "shape must", "got (-1, 32)"),
    P("from_gguf-shape-huge", lambda: QuantizedWeights.from_gguf(b"\0" * 18, "q4_0", (2**62,) * 2),
      FormatError, f"shape ({2**62}, {2**62}) is too large"),
    *rows("QuantizedWeights", None, lambda kw: _qw_with(**kw), [  # kw: arguments replaced
        ("shape-huge", {"shape": (2**62, 2**62)}, ArgumentError, "shape must", f"got {2**62}"),
        ("data-short", lambda: {"data": qw().data[:3]}, ShapeError, "data must", "got (96,)"),
        ("data-float32", lambda: {"data": qw().data.astype(np.float32)}, DTypeError,
         "data must", "got float32"),
        ("mins-None", {"mins": None}, ArgumentError, "mins must", "got None"),
        ("scales-nan", lambda: {"scales": np.full_like(qw().scales, np.nan)}, ArgumentError,
         "scales must be finite", "got nan at (0, 0)"),
        ("scales-2d-shape", lambda: {"scales": qw().scales.reshape(1, -1),
                                     "mins": qw().mins.reshape(1, -1)},
         ShapeError, "scales must", "(8, 1)", "got (1, 8)"),
    ]),
    P("to_gguf-scheme-asym", lambda: qw().to_gguf(), ArgumentError, "scheme must", "got asym"),
    P("save_file-entries-reserved", lambda: save_file("/nonexistent/x", {"__metadata__": W}),
      ArgumentError, "entries key '__metadata__' is reserved"),
    P("save_file-entries-int-key", lambda: save_file("/nonexistent/x", {1: W}), ArgumentError,
      "entries keys must", "got 1"),
]

FLYHASH_X = [  # encode, activations, encode_indices and hash check x alike
    ("str", "abc", DTypeError, "got str"),
    ("None", None, DTypeError, "got NoneType"),
    ("ragged", [[0.5] * 16, [1.0]], ShapeError, "got a ragged sequence"),
    *bad_arrays(XFH, "object complex64 int64 uint8 bool 0d 3d 1d-width 0-cols nan inf"),
    ("width", XFH[:, :15], ShapeError, "(n, 16)", "got (5, 15)"),
]
FLYHASH_CASES = [
    *rows("FlyHash", "input_dim", FlyHash, [
        *scalars("16", 16.0, True, -3), ("0", 0, ArgumentError, ">= 1", "got 0")]),
    *rows("FlyHash", "input_dim", lambda v: FlyHash(v, seed=0), [
        ("2**62", 2**62, ArgumentError, "input_dim must be small enough for the sign projection "
         f"to fit in 8 GiB (8589934592 bytes); got {2**62} (with expansion_ratio=13.0: ",
         "a projection of 3.456e37 bytes)"),
        *scalars(2**70)]),
    *rows("FlyHash", "expansion_ratio", lambda v: FlyHash(16, v, seed=0), [
        ("nan", NAN, ArgumentError, "got NaN"), ("inf", INF, ArgumentError, "got inf"),
        ("-1.0", -1.0, ArgumentError, "got -1"), *scalars("13"),
        ("10**400", 10**400, ArgumentError, "finite", f"got {10**400}"),
        ("1e300", 1e300, ArgumentError, "8 GiB", "got 1e300")]),
    *rows("FlyHash", "active_fraction", lambda v: FlyHash(16, active_fraction=v, seed=0), [
        ("nan", NAN, ArgumentError, "got NaN"), ("0", 0, ArgumentError, "(0, 1]", "got 0"),
        *scalars(1.5), ("1e-9", 1e-9, ArgumentError, "got 0.000000001 (active_bits = 0)")]),
    *keywords("FlyHash", lambda **kw: FlyHash(16, **kw), seed=(-1, 2**64, 1.0)),
    *keywords("FlyHash", lambda **kw: FlyHash(16, seed=0, **kw), projection=("dense", None)),
    # connectivity is read by sparse projections only, but a NaN is refused for
    # every projection (it used to be kept, saved and loaded)
    *[c for proj in ("sign", "sparse", "seeded") for c in rows(
        f"FlyHash-{proj}", "connectivity",
        lambda v, p=proj: FlyHash(16, seed=0, projection=p, connectivity=v), [
            (f"{v}", v, ArgumentError, "(0, 1]", f"got {shown}")
            for v, shown in ((NAN, "NaN"), (INF, "inf"), (0.0, "0"), (2.0, "2"))])],
    *rows("FlyHash-sparse", "connectivity",
          lambda v: FlyHash(16, seed=0, projection="sparse", connectivity=v), [
              ("1e-9", 1e-9, ArgumentError, "got 0.000000001 (0 connections)")]),
    P("FlyHash-sparse-input_dim-70000",
      lambda: FlyHash(70000, 1.0, seed=0, projection="sparse", connectivity=0.01),
      ArgumentError, "input_dim must", "65535", "got 70000"),
    *rows("FlyHash", "binary", lambda v: FlyHash(16, seed=0, binary=v), [
        *scalars("yes"), ("True-sign", True, ArgumentError, 'got True with projection="sign"')]),
    *[c for m in ("encode", "activations", "encode_indices", "hash") for c in [
        *rows(f"FlyHash.{m}", "x", lambda v, m=m: getattr(fh(), m)(v), FLYHASH_X),
        *rows(f"FlyHash.{m}", "level", lambda v, m=m: getattr(fh(), m)(XFH, level=v), [
            ("sse", "sse", ArgumentError, 'got "sse"'), *scalars(1)]),
    ]],
    *rows("BinaryIndex", "nbits", BinaryIndex, [
        *scalars("16", 0, 16.0, 2**70), ("2**62", 2**62, ArgumentError, "2^30", f"got {2**62}")]),
    *rows("BinaryIndex.add", "codes", lambda v: bix().add(v), [
        ("float32", CODES.astype(np.float32), DTypeError, "uint8", "got float32"),
        *bad_arrays(CODES, "int8 bool 3d"),
        ("str", "ab", DTypeError, "got str"),
        ("None", None, DTypeError, "got NoneType"),
        ("width", CODES[:, :1], ShapeError, "(n, 2)", "got (6, 1)"),
    ]),
    *rows("BinaryIndex.add", "ids", lambda v: bix().add(CODES, ids=v), [
        ("neg", [-1] * 6, ArgumentError, "got -1"),
        ("float", np.arange(6.0), DTypeError, "got float64"),
        ("len", [1, 2], ShapeError, "(6,)", "got (2,)"),
        ("2d", [list(range(6))], ShapeError, "got (1, 6)"),
        ("uint64-2**63", np.full(6, 2**63, np.uint64), ArgumentError, f"got {2**63}"),
        ("int64-max", np.full(6, 2**63 - 1), ArgumentError, f"got {2**63 - 1}"),
        ("bool", np.ones(6, bool), DTypeError, "got bool"),
    ]),
    P("BinaryIndex.add-ids-scalar", lambda: bix().add(CODES[:1], ids=3), ShapeError, "ids must",
      "got ()"),
    P("BinaryIndex.add-codes-bits-past-nbits",
      lambda: BinaryIndex(12).add(np.full((1, 2), 255, np.uint8)), ArgumentError, "codes must",
      "got row 0 with bits set past bit 12"),
    *rows("BinaryIndex.search", "k", lambda v: bix().search(CODES, v), [
        *scalars(0, -1, 2.0, True, 2**70),
        ("2**62", 2**62, ArgumentError, "8 GiB", f"got {2**62}")]),
    *rows("BinaryIndex.search", "metric", lambda v: bix().search(CODES, 3, metric=v), [
        ("l2", "l2", ArgumentError, 'got "l2"'), *scalars(None)]),
    *rows("BinaryIndex.search", "queries", lambda v: bix().search(v, 3),
          bad_arrays(CODES, "float32")),
    *rows("BinaryIndex.range_search", "max_distance", lambda v: bix().range_search(CODES, v),
          scalars(-1, 2**40, 1.5)),
    *rows("BinaryIndex.remove", "ids", lambda v: bix().remove(v), [
        ("str", "a", DTypeError, "got <U1"),
        ("float", [1.0], DTypeError, "got float64"),
        ("None", None, DTypeError, "got object"),
        ("bool", np.array([True]), DTypeError, "got bool"),
        ("2d", [[1, 2]], ShapeError, "got (1, 2)"),
        ("ragged", [[1], [1, 2]], ShapeError, "got a ragged sequence"),
    ]),
]

NEURONS_CASES = [
    *rows("NeuronCache", "num_neurons", NeuronCache, [
        *scalars("8", 8.0, True, 2**70), ("0", 0, ArgumentError, ">= 1", "got 0"),
        ("2**40", 2**40, ArgumentError, "2^32", f"got {2**40}")]),
    *rows("NeuronCache", "capacity", lambda v: NeuronCache(8, v), [
        ("9", 9, ArgumentError, "num_neurons = 8", "got 9"), *scalars(-1, 2.0)]),
    P("NeuronCache-capacity_bytes-without-bytes_per_neuron",
      lambda: NeuronCache(8, capacity_bytes=10), ArgumentError,
      "capacity_bytes needs bytes_per_neuron > 0", "got 0"),
    # 1e300 is finite, but inf as the core's float32: the message shows what was passed
    *keywords("NeuronCache", lambda **kw: NeuronCache(8, **kw), bytes_per_neuron=(2**70,),
              policy=("lru", []), hysteresis=(NAN, -1, "x", None, 1e300),
              reclassify_every=(-1, 2**64)),
    *rows("NeuronCache", "decay", lambda v: NeuronCache(8, decay=v), [
        *scalars(NAN, 2, "0.5"), ("0.0", 0.0, ArgumentError, "(0, 1]", "got 0.0"),
        ("1e-50", 1e-50, ArgumentError, "got 1e-50 (0 as float32)")]),
    *keywords("NeuronCache", lambda **kw: NeuronCache(8, policy="window", **kw),
              window=(0, None, 2**70)),
    *rows("NeuronCache.record", "active", lambda v: nc().record(v), [
        ("str", "ab", DTypeError, "got dtype <U2"),
        ("None", None, DTypeError, "got dtype object"),
        ("float", [1.0], DTypeError, "got dtype float64"),
        ("complex", np.ones(2, np.complex64), DTypeError, "got dtype complex64"),
        ("ragged", [[1], [1, 2]], ShapeError, "got a ragged sequence"),
    ]),
    *rows("NeuronCache.record", "active ids", lambda v: nc().record(v), [
        ("2d", [[1, 2]], ShapeError, "got (1, 2)"), ("0d", 3, ShapeError, "got ()")]),
    *rows("NeuronCache.record", "active mask", lambda v: nc().record(v), [
        ("width", np.ones(7, bool), ShapeError, "got (7,)"),
        ("3d", np.ones((1, 2, 8), bool), ShapeError, "got (1, 2, 8)")]),
    *out_of_range("NeuronCache.record", "active", lambda v: nc().record(v),
                  [-1], [8], np.array([-3], np.int8), np.array([2**64 - 1], np.uint64)),
    *rows("NeuronCache.set_hot", "hot", lambda v: nc().set_hot(v), [
        ("repeated", [1, 1], ArgumentError, "got 1 repeated"),
        ("too-many", [1, 2, 3, 4], ArgumentError, "got 4")]),
    *out_of_range("NeuronCache.set_hot", "hot", lambda v: nc().set_hot(v), [-1], [8]),
    *rows("NeuronCache.set_hot", "ids", lambda v: nc().set_hot(v), [
        ("float", [1.5], DTypeError, "got dtype float64"),
        ("bool", np.array([True]), DTypeError, "got dtype bool"),
        ("2d", [[1, 2]], ShapeError, "got (1, 2)")]),
    *rows("NeuronCache.activation_frequency", "neuron", lambda v: nc().activation_frequency(v),
          scalars("a")),
    *out_of_range("NeuronCache.activation_frequency", "neuron",
                  lambda v: nc().activation_frequency(v), -1, 2**70),
]
for _c in (SparseFFN, InputSparseFFN):
    _n = _c.__name__
    NEURONS_CASES += [
        *rows(_n, "gate", lambda v, c=_c: c(v, UP, DOWN), [
            ("str", "a", DTypeError, "got <U1"),
            *bad_arrays(GATE, "int64 bool complex64 nan 3d"),
            ("width", GATE[:, :7], ShapeError, "(16, 8)", "got (16, 7)")]),
        *rows(_n, "up", lambda v, c=_c: c(GATE, v, DOWN), [
            ("None", None, DTypeError, "got object")]),
        # a transposed down holds as many values: it must be refused, not read
        # in the wrong layout (InputSparseFFN did, giving wrong answers)
        *rows(_n, "down", lambda v, c=_c: c(GATE, UP, v), [
            *bad_arrays(DOWN, "inf"),
            ("transposed", DOWN.T, ShapeError, "(8, 16)", "got (16, 8)")]),
        P(f"{_n}-0-neurons", lambda c=_c: c(GATE[:0], UP[:0], DOWN[:, :0]), ShapeError, "up must",
          "got shape (0, 8)"),
        *rows(_n, "activation", lambda v, c=_c: ffn(c, activation=v), [
            ("tanh", "tanh", ArgumentError, 'got "tanh"'), *scalars(None)]),
        *keywords(_n, lambda c=_c, **kw: ffn(c, **kw), bits=(3, 4.0, True), dtype=("bfloat16",)),
        *rows(_n, "up_bias", lambda v, c=_c: ffn(c, up_bias=v), [
            ("gated", np.zeros(H, np.float32), ArgumentError,
             "got up_bias of shape (16,) with a gate")]),
        *rows(_n, "up_bias", lambda v, c=_c: c(None, UP, DOWN, up_bias=v), [
            ("len", np.zeros(H + 1), ShapeError, "got (17,)")]),
        *rows(_n, "down_bias", lambda v, c=_c: ffn(c, down_bias=v), [
            ("str", "x", DTypeError, "got <U1"),
            ("nan", np.full(D, np.nan), ArgumentError, "got NaN")]),
        *rows(_n, "x", lambda v, c=_c: ffn(c)(v), [
            ("str", "a", DTypeError, "got <U1"), ("None", None, DTypeError, "got object"),
            *bad_arrays(XF, "int64 bool 0d 3d width 1d-width nan"),
            ("ragged", [[1.0] * 8, [1.0]], ShapeError, "got a ragged sequence")]),
        *rows(f"{_n}.calibrate", "sparsity", lambda v, c=_c: ffn(c).calibrate(XF, v),
              scalars(NAN, 1.0, "0.5")),
        *rows(f"{_n}.calibrate", "samples", lambda v, c=_c: ffn(c).calibrate(v, 0.5),
              bad_arrays(XF, "nan 0-rows int64")),
    ]
NEURONS_CASES += [
    *keywords("SparseFFN", ffn, hot_capacity=(-1, H + 1), threshold=(NAN, "a"),
              top_k=(0, H + 1, 2.0)),
    # the setters check as the constructor does (they used to store anything:
    # int(2.7) kept 2, a negative k reached the core as 0)
    *rows("SparseFFN.threshold=", "threshold", lambda v: setattr(ffn(), "threshold", v),
          scalars(NAN, "a")),
    *rows("SparseFFN.top_k=", "top_k", lambda v: setattr(ffn(), "top_k", v),
          scalars(2.7, -1, 2**70)),
    *rows("SparseFFN.set_hot", "hot", lambda v: ffn().set_hot(v), [
        ("repeated", [1, 1], ArgumentError, "got 1 repeated")]),
    *rows("SparseFFN.set_hot", "ids", lambda v: ffn().set_hot(v), [
        ("neg", [-1], ArgumentError, "got -1"),
        ("float", [1.5], ArgumentError, "got dtype float64"),
        ("2d", [[1, 2]], ShapeError, "got (1, 2)")]),
    *out_of_range("SparseFFN.set_hot", "hot", lambda v: ffn().set_hot(v), [H]),
    *rows("InputSparseFFN", None, lambda v: ffn(InputSparseFFN, thresholds=v), [
        ("thresholds-nan", (np.nan, None), ArgumentError, "t_in must", "got nan"),
        ("thresholds-str", (None, "a"), ArgumentError, "t_hidden must", "got 'a'"),
        ("thresholds-one", (1.0,), ArgumentError, "thresholds must", "got (1.0,)"),
        ("thresholds-scalar", 1.0, ArgumentError, "thresholds must", "got 1.0")]),
    *rows("InputSparseFFN.t_in=", "t_in", lambda v: setattr(ffn(InputSparseFFN), "t_in", v),
          scalars(-1)),
    *rows("InputSparseFFN.hidden", "t_in", lambda v: ffn(InputSparseFFN).hidden(XF, v),
          scalars("a")),
    P("InputSparseFFN-int4-odd", lambda: InputSparseFFN(GATE[:15], UP[:15], DOWN[:, :15], bits=4),
      ArgumentError, "up must", "divisible by 2", "got (15, 8)"),
]

RANGE_CASES = [
    *rows("RangeIndex", "keys", RangeIndex, [
        ("str", "a", DTypeError, "got <U1"),
        ("None", None, DTypeError, "got object"),
        ("ragged", [[1.0], [1.0, 2.0]], ShapeError, "got a ragged sequence"),
        *bad_arrays(KEYS, "int64 bool complex64 0d 1d 0-rows 0-cols nan")]),
    *keywords("RangeIndex", lambda **kw: RangeIndex(KEYS, **kw), method=("hnsw", None),
              leaf=(0, 2**64, 64.0), seed=(-1,)),
    *rows("RangeIndex", "branching", lambda v: RangeIndex(KEYS, "kmeans", branching=v),
          scalars(1)),
    *rows("RangeIndex", "rebuild_fraction", lambda v: RangeIndex(KEYS, rebuild_fraction=v), [
        ("nan", NAN, ArgumentError, "got NaN"), *scalars(-1, "a", None)]),
    *rows("RangeIndex.search", "thresholds", lambda v: rix().search(QUERIES, v), [
        ("nan", np.full(3, np.nan), ArgumentError, "got NaN"),
        ("len", np.zeros(2), ShapeError, "(3,)", "got (2,)"),
        ("2d", np.zeros((3, 1)), ShapeError, "got (3, 1)"),
        ("str", "a", DTypeError, "got <U1")]),
    P("RangeIndex.search-queries-1d", lambda: rix().search(QUERIES[0], 0.0), ShapeError,
      "queries must", "got (8,)"),
    *rows("RangeIndex.search", "queries", lambda v: rix().search(v, np.zeros(3)),
          bad_arrays(QUERIES, "width nan int64")),
    *rows("RangeIndex.topk", "k", lambda v: rix().topk(QUERIES, v),
          scalars(0, 101, 2**70, 2.0, "3")),
    *rows("RangeIndex.add", "keys", lambda v: RangeIndex(KEYS).add(v),
          bad_arrays(KEYS, "width nan 1d")),
]

_TARGET = {"a": np.zeros(20)}
WINDOWS_CASES = [
    *rows("SlidingWindows", "frames", lambda v: SlidingWindows(v, 3), [
        ("str", "a", DTypeError, "got <U1"),
        ("None", None, DTypeError, "got object"),
        ("ragged", [[1.0], [1.0, 2.0]], ShapeError, "got a ragged sequence"),
        *bad_arrays(FRAMES, "complex64 object 0d 1d 3d 0-rows 0-cols")]),
    P("SlidingWindows-frames-datetime64", lambda: SlidingWindows(np.zeros((5, 2), "M8[s]"), 2),
      DTypeError, "frames must", "got datetime64[s]"),
    *rows("SlidingWindows", "window", lambda v: SlidingWindows(FRAMES, v), [
        *scalars(0, 3.0, True, "3", 2**64), ("21", 21, ArgumentError, "got window (21 frames)"),
        ("2**62", 2**62, ArgumentError, f"got window ({2**62} frames)")]),
    *keywords("SlidingWindows", lambda **kw: SlidingWindows(FRAMES, 3, **kw), stride=(0,)),
    *rows("SlidingWindows", "episodes", lambda v: SlidingWindows(FRAMES, 3, episodes=v), [
        ("neg", [-1, 21], ArgumentError, "got -1"),
        ("float", [10.0, 10.0], DTypeError, "got dtype float64"),
        ("sum", [10, 11], ArgumentError, "got 2 values summing to 21"),
        ("2d", [[10, 10]], ShapeError, "got (1, 2)"),
        ("empty", [], ArgumentError, "got 0 values summing to 0"),
        ("overflowing-sum", np.array([2**62] * 4 + [20]), ArgumentError,
         f"got a sum of {2**64 - 1}")]),
    P("SlidingWindows-episodes-uint64-max",
      lambda: SlidingWindows(FRAMES, 3, episodes=np.array([2**64 - 1], np.uint64)), IndexError,
      f"episodes holds {2**64 - 1}, out of range"),
    *rows("SlidingWindows", "targets['a']", lambda v: SlidingWindows(FRAMES, 3, targets={"a": v}), [
        ("len", np.zeros(19), ShapeError, "got (19,)"),
        ("str", "x", DTypeError, "got <U1"),
        ("ragged", [[1], [1, 2]], ShapeError, "got a ragged sequence")]),
    *rows("SlidingWindows", None, lambda v: SlidingWindows(FRAMES, 3, targets=v), [
        ("targets-key-int", {1: np.zeros(20)}, ArgumentError, "targets keys must", "got 1"),
        ("targets-list", [("a", np.zeros(20))], ArgumentError, "targets must", "got list")]),
    *rows("SlidingWindows", "target_offset['a']",
          lambda v: SlidingWindows(FRAMES, 3, targets=_TARGET, target_offset=v), scalars(-3, 1.0)),
    P("SlidingWindows-target_offset-unknown",
      lambda: SlidingWindows(FRAMES, 3, targets=_TARGET, target_offset={"b": 1}), ArgumentError,
      "target_offset names unknown targets: ['b']"),
    *rows("SlidingWindows.take", "indices", lambda v: sw().take(v), [
        ("float", [1.0], DTypeError, "got dtype float64"),
        ("str", "a", DTypeError, "got dtype <U1"),
        ("None", None, DTypeError, "got dtype object"),
        ("2d", [[1]], ShapeError, "got (1, 1)"),
        ("bool", np.array([True]), DTypeError, "got dtype bool"),
        ("scalar", 1, ShapeError, "got ()")]),
    *out_of_range("SlidingWindows.take", "window", lambda v: sw().take(v), [17], [-18]),
    P("SlidingWindows.take-indices-uint64-max",
      lambda: sw().take(np.array([2**64 - 1], np.uint64)), IndexError,
      f"indices holds {2**64 - 1}, out of range"),
    *out_of_range("SlidingWindows.__getitem__", "window", lambda v: sw()[v], 17, 2**70),
    *rows("SlidingWindows.__getitem__", "i", lambda v: sw()[v], scalars(1.0, [1, 2])),
    *rows("SlidingWindows.target", "name", lambda v: sw().target(v, 0), scalars("b")),
    *rows("SlidingWindows.batches", "batch_size", lambda v: sw().batches(v), scalars(0, 2.0)),
    *keywords("SlidingWindows.batches", lambda **kw: sw().batches(2, **kw), seed=(-1, 2**64),
              rank=(1,), world_size=(0, 2**64), epoch=(2**64,), prefetch=(-1,)),
    *keywords("SlidingWindows.epoch_order", lambda **kw: sw().epoch_order(**kw), epoch=(2**64,),
              rank=(-1,)),
    *keywords("SlidingWindows.memory_plan", lambda **kw: sw().memory_plan(**kw),
              batch_size=(-1, "a"), prefetch=(-5,), available=(-5, "a"), headroom=(NAN, 0)),
    *keywords("SlidingWindows.materialize", lambda **kw: sw().materialize(**kw), chunk=(0,),
              available=(NAN,)),
]

# torch tensors where arrays are taken, torch modules (built when the case runs)
_COMPLEX_CAST = pytest.mark.filterwarnings("ignore:Casting complex values")
TORCH_CASES = [
    *rows("matvec", "x", lambda v: qw().matvec(v), [
        ("torch-int64", lambda: T(X64).long(), DTypeError, "got int64"),
        ("torch-bool", lambda: T(X64) > 0, DTypeError, "got bool"),
        ("torch-complex64", lambda: T(X64).to(_torch().complex64), DTypeError, "got complex64"),
        ("torch-len", lambda: T(X64[:63]), ShapeError, "got (63,)")], marks=[_COMPLEX_CAST]),
    *rows("quantize", "w", quantize, [
        ("torch-int64", lambda: T(W).long(), DTypeError, "got int64")], marks=[_COMPLEX_CAST]),
    *rows("FlyHash.encode", "x", lambda v: fh().encode(v), [
        ("torch-int64", lambda: T(XFH).long(), DTypeError, "got int64"),
        ("torch-complex64", lambda: T(XFH).to(_torch().complex64), DTypeError, "got complex64"),
        ("torch-nan", lambda: T(XFH) * NAN, ArgumentError, "got NaN"),
        ("torch-3d", lambda: T(XFH)[None], ShapeError, "got (1, 5, 16)"),
        ("torch-0d", lambda: T(np.float32(1)), ShapeError, "got ()")]),
    P("FlyHash.hash-x-torch-bool", lambda: fh().hash(T(XFH) > 0), DTypeError, "x must", "got bool"),
    P("BinaryIndex.add-codes-torch-int64", lambda: bix().add(T(CODES).long()), DTypeError,
      "codes must", "got int64"),
    P("NeuronCache.record-active-torch-float64", lambda: nc().record(T(np.ones(3))), DTypeError,
      "active must", "got dtype float64"),
    P("SparseFFN-x-torch-int64", lambda: ffn()(T(XF).long()), DTypeError, "x must", "got int64"),
    # a tensor that requires grad takes the torch ops: checked as the kernels check
    *[P(f"{c.__name__}-x-torch-grad-width",
        lambda c=c: ffn(c)(T(XF[:, :7], requires_grad=True)), ShapeError, "x must", "got (3, 7)")
      for c in (SparseFFN, InputSparseFFN)],
    P("SparseFFN-x-torch-grad-complex64",
      lambda: ffn()(T(XF, dtype=_torch().complex64, requires_grad=True)), DTypeError, "x must",
      "got torch.complex64"),
    P("RangeIndex-keys-torch-int64", lambda: RangeIndex(T(KEYS).long()), DTypeError, "keys must",
      "got int64"),
    *rows("SlidingWindows", "targets['a']",
          lambda t: SlidingWindows(t[0], 3, targets={"a": t[1]}), [  # t: (frames, target)
        ("torch-complex64", lambda: (T(FRAMES), T(np.zeros(20), dtype=_torch().complex64)),
         DTypeError, "got torch.complex64"),
        ("str-torch-frames", lambda: (T(FRAMES), np.array(["a"] * 20)), DTypeError, "got <U1")]),
    P("SlidingWindows-targets-bfloat16-numpy-frames",
      lambda: SlidingWindows(FRAMES, 3, targets={"a": T(np.zeros(20)).bfloat16()}), DTypeError,
      "targets['a'] is a bfloat16 tensor"),
    P("SlidingWindows-frames-torch-3d", lambda: SlidingWindows(T(FRAMES)[None], 3), ShapeError,
      "frames must", "got (1, 20, 4)"),
    *rows("SlidingWindows.batches", "device", lambda v: sw().batches(2, device=v),
          scalars("tpu", [1])),
    *rows("QuantizedLinear.from_linear", "bits",
          lambda v: _torch_mod().QuantizedLinear.from_linear(_linear(), bits=v), scalars(5)),
    *rows("QuantizedLinear.from_linear", None,
          lambda v: _torch_mod().QuantizedLinear.from_linear(v), [
        ("conv", lambda: _torch().nn.Conv1d(2, 2, 1), ShapeError, "w must", "got (2, 2, 1)"),
        ("nan-weight", lambda: _linear().requires_grad_(False).apply(
            lambda m: m.weight.fill_(NAN)), ArgumentError, "w must", "got NaN"),
        ("str", "x", ArgumentError, "linear must be an nn.Linear", "got str"),
        ("nan-bias", lambda: _linear(nan_bias=True), ArgumentError, "bias must",
         "got NaN at index 0")]),
    *rows("QuantizedLinear", "x", lambda v: _ql()(v), [
        ("torch-int64", lambda: T(X64).long(), DTypeError, "got torch.int64"),
        ("torch-len", lambda: T(X64[:63]), ShapeError, "got (63,)"),
        ("torch-0d", lambda: T(np.float32(1)), ShapeError, "got ()"),
        ("numpy", X64, DTypeError, "got ndarray")]),
    P("quantize_model-skip-typo", lambda: _torch_mod().quantize_model(_mlp(), skip=["nope"]),
      ArgumentError, "skip pattern 'nope' must"),
    *rows("quantize_model", "bits", lambda v: _torch_mod().quantize_model(_mlp(), bits=v),
          scalars(7)),
    # (skip=None keeps no layer, as the default (): tests/test_quant.py)
    *rows("quantize_model", "model", lambda v: _torch_mod().quantize_model(v), [
        ("str", "x", ArgumentError, "got str"),
        ("linear", lambda: _torch().nn.Linear(64, 8), ArgumentError, "got an nn.Linear",
         "from_linear")]),
    *rows("quantize_model", None, lambda v: _torch_mod().quantize_model(_mlp(), skip=v), [
        ("skip-int", [1], ArgumentError, "skip patterns must be strings", "got 1"),
        ("skip-not-iterable", 5, ArgumentError, "skip must", "got 5")]),
    *rows("sparsify_mlp", "sparsity", lambda v: _torch_mod().sparsify_mlp(_mlp(), v),
          scalars(NAN, "a", None)),
    *rows("sparsify_mlp", "method", lambda v: _torch_mod().sparsify_mlp(_mlp(), 0.5, method=v),
          scalars("x")),
    # (an AttributeError on 'NoneType' before)
    *rows("sparsify_mlp", "model", lambda v: _torch_mod().sparsify_mlp(v, 0.0), [
        ("none", None, ArgumentError, "model must be a torch.nn.Module", "got NoneType")]),
]

HF_CASES = [
    *rows("sparse_decode_attention", "query", lambda v: sda(v, *_qkv()[1:], 0.3), [
        ("numpy", lambda: _qkv()[0].numpy(), DTypeError, "got ndarray"),
        ("int32", lambda: _qkv()[0].int(), DTypeError, "got torch.int32"),
        ("bool", lambda: _qkv()[0] > 0, DTypeError, "got torch.bool"),
        ("3d", lambda: _qkv()[0][0], ShapeError, "got (4, 1, 8)"),
        ("2-tokens", lambda: _qkv()[0].expand(2, 4, 2, 8), ShapeError, "got (2, 4, 2, 8)")]),
    P("sparse_decode_attention-query-heads-not-multiple",
      lambda: sda(_qkv()[0][:, :3], *_qkv()[1:], 0.3), ShapeError, "query heads must", "got 3"),
    P("sparse_decode_attention-key-list",
      lambda: sda(_qkv()[0], _qkv()[1].tolist(), _qkv()[2], 0.3), DTypeError, "key must",
      "got list"),
    P("sparse_decode_attention-key-0-kv-heads",
      lambda: sda(_qkv()[0], _qkv()[1][:, :0], _qkv()[2][:, :0], 0.3), ShapeError, "key must",
      "kv_heads >= 1", "got (2, 0, 10, 8)"),
    P("sparse_decode_attention-key-0-keys",
      lambda: sda(_qkv()[0], _qkv()[1][:, :, :0], _qkv()[2][:, :, :0], 0.3), ShapeError,
      "key must", "n >= 1", "got (2, 2, 0, 8)"),
    *rows("sparse_decode_attention", "value", lambda v: sda(*_qkv()[:2], v, 0.3), [
        ("complex64", lambda: _qkv()[2].to(_torch().complex64), DTypeError, "got torch.complex64"),
        ("shape", lambda: _qkv()[2][..., :7], ShapeError, "got (2, 2, 10, 7)")]),
    *rows("sparse_decode_attention", "scaling", lambda v: sda(*_qkv(), v), scalars(NAN, "a")),
    *keywords("sparse_decode_attention", lambda **kw: sda(*_qkv(), 0.3, **kw),
              strategy=("all",), top_p=(1.0, NAN), sinks=(-1,), window=(True,)),
    *keywords("sparse_decode_attention", lambda **kw: sda(*_qkv(), 0.3, strategy="top_k", **kw),
              top_k=(0, 2.0)),
    *keywords("sparse_decode_attention",
              lambda **kw: sda(*_qkv(), 0.3, strategy="threshold", **kw), threshold=(None, INF)),
    *rows("sparse_decode_attention", "attention_mask",  # query (2, 4, 1, 8), key (2, 2, 10, 8)
          lambda v: sda(*_qkv(), 0.3, attention_mask=v), [
              *[(k, lambda s=s: _torch().ones(*s).bool(), ShapeError, f"got {s}")
                for k, s in (("short", (2, 1, 1, 5)), ("batch", (3, 1, 1, 10)), ("2d", (2, 10)))],
              ("int64", lambda: _torch().ones(2, 1, 1, 10).long(), DTypeError, "got torch.int64"),
              ("numpy", np.ones((2, 1, 1, 10), bool), DTypeError, "got ndarray")]),
    *keywords("SparseCache", lambda **kw: _cache(**kw), strategy=("all",), top_p=(0.0,),
              sinks=(1.5,), method=("hnsw",)),
    *keywords("SparseCache", lambda **kw: _cache(strategy="top_k", **kw), top_k=(-2,)),
    *keywords("SparseCache", lambda **kw: _cache(strategy="threshold", **kw), threshold=(NAN,)),
    P("SparseCache-model-object", lambda: _hf().SparseCache(object()), ArgumentError,
      "model must", "got object"),
    *rows("cache_kwargs", "model", lambda v: _hf().cache_kwargs(v, None), [
        ("int", 3, ArgumentError, "got int")]),
]

MEMBRANE_CASES = [
    *rows("MembraneBank", "L", lambda v: _membrane().MembraneBank(v, 2, 2), [
        *scalars("8", 0, 8.0), ("3-hadamard", 3, ArgumentError, "power of two", "got 3")]),
    # extents whose sizes overflow (torch's RuntimeError 'Storage size calculation
    # overflowed', numpy's ValueError 'array is too big' were raised): refused
    # before any allocation, the message giving the bytes needed
    P("MembraneBank-H-W-2**40", lambda: _membrane().MembraneBank(8, 2**40, 2**40), ArgumentError,
      "H must", "bytes", f"got L=8, H={2**40}, W={2**40}"),
    P("MembraneBank-L-2**62-gaussian",
      lambda: _membrane().MembraneBank(2**62, 1, 1, codes="gaussian"), ArgumentError, "L must",
      "bytes", f"got L={2**62}"),
    *rows("MembraneBank", "codes", lambda v: _membrane().MembraneBank(8, 2, 2, codes=v), [
        *scalars("walsh"), ("None", None, ArgumentError, "got NoneType"),
        ("nan", lambda: V(8, 8) * NAN, ArgumentError, "got NaN at flat index 0"),
        ("int64", lambda: _torch().eye(8, dtype=_torch().int64), DTypeError, "got torch.int64")]),
    *keywords("MembraneBank", lambda **kw: _membrane().MembraneBank(8, 2, 2, **kw), K=(0,),
              readout=("x",), persistence=(NAN, "a"), device=("tpu",), seed=(-1,)),
    *rows("MembraneBank", "dtype", lambda v: _membrane().MembraneBank(8, 2, 2, dtype=v), [
        ("int64", lambda: _torch().int64, DTypeError, "got torch.int64"),
        ("str", "float32", DTypeError, "got float32")]),
    *rows("MembraneBank.store", "values", lambda v: bank().store(v), [
        ("list", [[1.0]], ArgumentError, "got list"),
        ("float64", lambda: V().double(), DTypeError, "got torch.float64"),
        ("int64", lambda: V().long(), DTypeError, "got torch.int64"),
        ("nan", lambda: V() * NAN, ArgumentError, "got 32 NaN or Inf entries"),
        ("2d", lambda: V(2, 2), ShapeError, "got (2, 2)"),
        ("hw", lambda: V(8, 1, 2), ShapeError, "got (8, 1, 2)"),
        ("0", lambda: V(0, 2, 2), ShapeError, "got shape (0, 2, 2)")]),
    P("MembraneBank.store-values-9-keys", lambda: bank().store(V(9, 2, 2)), ShapeError,
      "values hold 9 patterns"),
    *rows("MembraneBank.store", "keys", lambda v: bank().store(V(2, 2, 2), keys=v), [
        ("past-K", [0, 8], ArgumentError, "got 8"), ("neg", [0, -1], ArgumentError, "got -1"),
        ("float", [0.0, 1.0], DTypeError, "got dtype float64"),
        ("len", [0], ShapeError, "got shape (1,)")]),
    *rows("MembraneBank.store", "keys", lambda v: bank().store(V(1, 2, 2), keys=v), [
        ("uint64-max", np.array([2**64 - 1], np.uint64), ArgumentError, f"got {2**64 - 1}")]),
    *rows("MembraneBank.store", "alphas", lambda v: bank().store(V(), alphas=v), [
        *scalars(NAN, "x"), ("shape", lambda: _torch().ones(3), ShapeError, "got (3,)")]),
    *rows("MembraneBank.read", "keys", lambda v: bank().read(v), [
        ("past-K", [8], ArgumentError, "got 8"), ("empty", [], ShapeError, "got shape (0,)")]),
    *rows("MembraneBank.read", "readout", lambda v: bank().read(readout=v), scalars("x")),
    *keywords("MembraneBank.decay", lambda lam=0.5, **kw: bank().decay(lam, **kw),
              lam=(NAN, 0.0, "0.5"), steps=(-1,)),
    *rows("MembraneBank.grow", "K", lambda v: bank().grow(v), scalars(4)),
    *rows("psnr", None, lambda xy: _membrane().psnr(*xy), [  # xy: (x, y)
        ("y-shape", lambda: (V(), V(1, 2, 2)), ShapeError, "y must", "got (1, 2, 2)"),
        ("x-numpy", (np.ones(3), np.ones(3)), ArgumentError, "x must", "got ndarray"),
        ("y-int64", lambda: (V(3), _torch().ones(3, dtype=_torch().int64)), DTypeError,
         "y must be a floating tensor", "got torch.int64"),
        ("x-empty", lambda: (V(0, 2, 2),) * 2, ShapeError, "x must", "got shape (0, 2, 2)")]),
    P("psnr-data_range-nan", lambda: _membrane().psnr(V(), V(), data_range=NAN), ArgumentError,
      "data_range must", "got nan"),
    P("ssim-x-small", lambda: _membrane().ssim(V(1, 1), V(1, 1)), ShapeError, "x must",
      "got 1x1"),
    P("coherence_stats-C-1d", lambda: _membrane().coherence_stats(V(3)), ShapeError, "C must",
      "got (3,)"),
    *rows("HopfieldCleanup", "patterns", lambda v: _membrane().HopfieldCleanup(v), [
        ("numpy", np.ones((3, 2, 2)), ArgumentError, "got ndarray"),
        ("empty", lambda: V(0, 2, 2), ShapeError, "got (0, 2, 2)"),
        ("nan", lambda: V(3, 2, 2) * NAN, ArgumentError, "got 12 NaN or Inf entries"),
        ("int64", lambda: _torch().ones(3, 2, dtype=_torch().int64), DTypeError,
         "got torch.int64")]),
    P("HopfieldCleanup.similarity-y-numpy",
      lambda: _membrane().HopfieldCleanup(V(3, 2)).similarity(np.ones((2, 2))), ArgumentError,
      "y must be a torch.Tensor", "got ndarray"),
    *rows("AdaptivePersistence", "bank", lambda v: _membrane().AdaptivePersistence(v), [
        ("str", "x", ArgumentError, "got str")]),
]
TOP_LEVEL_CASES = [
    P("dot-b-len", lambda: neuropil.dot(X64, X64[:3]), ShapeError, "b must", "(64,)", "got (3,)"),
    P("dot-a-str", lambda: neuropil.dot("a", "b"), DTypeError, "a must", "got <U1"),
    P("dot-a-int64", lambda: neuropil.dot(np.ones(3, int), np.ones(3)), DTypeError, "a must",
      "got int64"),
    P("dot-a-2d", lambda: neuropil.dot(W, W), ShapeError, "a must", "got (8, 64)"),
    *rows("set_num_threads", "n", neuropil.set_num_threads, [
        *scalars(0, "2"), ("2**70", 2**70, ArgumentError, "at most 4096", f"got {2**70}")]),
]
# fmt: on


def marked(cases: list, mark: Any) -> list:
    return [pytest.param(*c.values, id=c.id, marks=[mark, *c.marks]) for c in cases]


BAD_ARGUMENTS = [*QUANT_CASES, *FLYHASH_CASES, *NEURONS_CASES, *RANGE_CASES, *WINDOWS_CASES,
                 *marked(TORCH_CASES, needs_torch), *marked(HF_CASES, needs_hf),
                 *marked(MEMBRANE_CASES, needs_torch)]  # fmt: skip


@pytest.mark.parametrize(("fn", "exc", "needles"), BAD_ARGUMENTS)
def test_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


@pytest.mark.parametrize(("fn", "exc", "needles"), TOP_LEVEL_CASES)
def test_top_level_bad_arguments(fn, exc, needles, restore_threads):
    expect(fn, exc, *needles)


# ------------------------------------------------------------------ real-number arguments
# Every argument read by errors._real takes any real number, as float() would:
# numpy scalars, fractions.Fraction, and a 0-d numpy array or torch tensor (a
# tensor's .quantile(0.9), torch.tensor(0.5)) read with .item(); each gives
# what the equal float gives. Bools, complex values and 1-element arrays are
# no real numbers: ArgumentError naming the argument.
# (id, name in the message, call(v) -> what v became, needs torch)


def _called(obj: Any, method: str, *args: Any) -> Any:
    """``obj`` after ``obj.method(*args)``."""
    getattr(obj, method)(*args)
    return obj


def _assigned(obj: Any, attr: str, v: Any) -> Any:
    """``obj`` after ``obj.attr = v``."""
    setattr(obj, attr, v)
    return obj


def _llama_mlp_model() -> Any:
    """A seeded module holding one Llama-style MLP (gate/up/down), no transformers."""
    torch = _torch()
    nn = torch.nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(D, H, bias=False)
            self.up_proj = nn.Linear(D, H, bias=False)
            self.down_proj = nn.Linear(H, D, bias=False)

        def forward(self, x: Any) -> Any:
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = MLP()

        def forward(self, x: Any) -> Any:
            return self.mlp(x)

    torch.manual_seed(0)
    return Model()


def _sparsify(v: Any, **kw: Any) -> dict:
    model = _llama_mlp_model()
    x = T(np.tile(XF, (8, 1)))
    return _torch_mod().sparsify_mlp(model, v, calibration=lambda: model(x), **kw)


REAL_ARGS = [
    ("SparseFFN-set_threshold", "threshold",
     lambda v: (lambda f: (f.threshold, f(XF)))(_called(ffn(), "set_threshold", v)), False),
    ("SparseFFN-threshold-setter", "threshold",
     lambda v: _assigned(ffn(), "threshold", v).threshold, False),
    ("SparseFFN-calibrate", "sparsity", lambda v: ffn().calibrate(XF, v), False),
    ("NeuronCache-decay", "decay", lambda v: NeuronCache(8, decay=v)._args["decay"], False),
    ("NeuronCache-hysteresis", "hysteresis",
     lambda v: NeuronCache(8, hysteresis=v)._args["hysteresis"], False),
    ("InputSparseFFN-thresholds", "t_in",
     lambda v: (lambda f: (f.t_in, f.t_hidden, f(XF)))(ffn(InputSparseFFN, thresholds=(v, v))),
     False),
    ("InputSparseFFN-set_thresholds", "t_hidden",
     lambda v: _called(ffn(InputSparseFFN), "set_thresholds", None, v).t_hidden, False),
    ("InputSparseFFN-t_in-setter", "t_in", lambda v: _assigned(ffn(InputSparseFFN), "t_in", v).t_in,
     False),
    ("InputSparseFFN-hidden", "t_in", lambda v: ffn(InputSparseFFN).hidden(XF, v), False),
    ("InputSparseFFN-calibrate", "hidden_sparsity",
     lambda v: ffn(InputSparseFFN).calibrate(XF, 0.5, v), False),
    ("RangeIndex-rebuild_fraction", "rebuild_fraction",
     lambda v: RangeIndex(KEYS, rebuild_fraction=v)._params["rebuild_fraction"], False),
    ("sparsify_mlp-sparsity", "sparsity", lambda v: _sparsify(v), True),
    ("sparsify_mlp-hidden_sparsity", "hidden_sparsity",
     lambda v: _sparsify(0.5, method="teal", hidden_sparsity=v), True),
]  # fmt: skip
REAL_VALUES = [
    ("np-0d", lambda: np.array(0.5), False),
    ("np-0d-float32", lambda: np.array(0.5, np.float32), False),
    ("torch-0d", lambda: _torch().tensor(0.5), True),
    ("torch-0d-quantile", lambda: _torch().tensor([0.0, 1.0]).quantile(0.5), True),
    ("torch-0d-requires-grad", lambda: _torch().tensor(0.5, requires_grad=True), True),
    ("np.float32", lambda: np.float32(0.5), False),
    ("Fraction", lambda: __import__("fractions").Fraction(1, 4), False),
]
NOT_REAL_VALUES = [
    ("torch-1d", lambda: _torch().tensor([0.5]), "tensor([0.5000])", True),
    ("np-1d", lambda: np.array([0.5]), "array([0.5])", False),
    ("np-0d-bool", lambda: np.array(True), "array(True)", False),
    ("torch-0d-bool", lambda: _torch().tensor(True), "tensor(True)", True),
    ("torch-0d-complex", lambda: _torch().tensor(0.5j), "0.5000j", True),
    ("np-0d-complex", lambda: np.array(0.5j), "0.5j", False),
    ("complex", lambda: 0.5j, "0.5j", False),
]


def _skip_without_torch(*needs: bool) -> None:
    if any(needs) and not HAS_TORCH:
        pytest.skip("needs torch")


def _same_result(a: Any, b: Any) -> bool:
    """``a`` and ``b`` equal: item by item, arrays exactly, numbers in type too."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(map(_same_result, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_result(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(("value", "vt"), [(v[1], v[2]) for v in REAL_VALUES],
                         ids=[v[0] for v in REAL_VALUES])  # fmt: skip
@pytest.mark.parametrize(("name", "call", "ct"), [(a[1], a[2], a[3]) for a in REAL_ARGS],
                         ids=[a[0] for a in REAL_ARGS])  # fmt: skip
def test_real_arguments_take_any_real_number(name, call, ct, value, vt):
    _skip_without_torch(ct, vt)
    v = value()
    as_float = float(v.item() if hasattr(v, "item") else v)
    assert _same_result(call(v), call(as_float))


@pytest.mark.parametrize(("value", "found", "vt"), [v[1:] for v in NOT_REAL_VALUES],
                         ids=[v[0] for v in NOT_REAL_VALUES])  # fmt: skip
@pytest.mark.parametrize(("name", "call", "ct"), [(a[1], a[2], a[3]) for a in REAL_ARGS],
                         ids=[a[0] for a in REAL_ARGS])  # fmt: skip
def test_real_arguments_refuse_what_is_no_real_number(name, call, ct, value, found, vt):
    _skip_without_torch(ct, vt)
    expect(lambda: call(value()), ArgumentError, f"{name} must", f"got {found}")


def _qkv(b: int = 2, heads: int = 4, kv: int = 2, n: int = 10, d: int = 8) -> tuple:
    torch = _torch()
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, heads, 1, d, generator=g),
        torch.randn(b, kv, n, d, generator=g),
        torch.randn(b, kv, n, d, generator=g),
    )


def sda(*args: Any, **kw: Any) -> Any:
    from neuropil.hf import sparse_decode_attention

    return sparse_decode_attention(*args, **kw)


def _tiny_llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def _hf() -> Any:
    return importlib.import_module("neuropil.hf")


def _cache(**kw: Any) -> Any:
    return _hf().SparseCache(_tiny_llama_config(), **kw)


@needs_hf
def test_hf_valid_edge_cases():
    """An empty batch, huge sinks and window, thresholds past float32 and a
    query that requires grad give results, not errors or warnings."""
    import warnings

    torch = _torch()
    q, k, v = _qkv()
    out, info = sda(q[:0], k[:0], v[:0], 0.3)
    assert out.shape == (0, 1, 4, 8) and info == {"fraction_read": 0.0, "dropped_bound": 0.0}
    # sinks/window past n read every key: the dense answer (2**70 used to overflow)
    dense, _ = sda(q, k, v, 0.3, strategy=None)
    for kw in ({"sinks": 2**70}, {"window": 2**70}):
        out, info = sda(q, k, v, 0.3, strategy="top_k", top_k=1, **kw)
        torch.testing.assert_close(out, dense)
        assert info["fraction_read"] == 1.0
    # a threshold no float32 logit reaches (1e300 overflowed torch.full_like)
    out, info = sda(q, k, v, 0.3, strategy="threshold", threshold=1e300, sinks=0, window=1)
    assert info["fraction_read"] == pytest.approx(1 / 10)
    out, info = sda(q, k, v, 0.3, strategy="threshold", threshold=-1e300)
    torch.testing.assert_close(out, dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, _ = sda(q.clone().requires_grad_(), k, v, 0.3)
        out.sum().backward()


@needs_hf
@pytest.mark.parametrize("threshold", [1e300, -1e300])
def test_hf_cpu_threshold_past_float32_generates(threshold):
    """The CPU decode path with a threshold beyond float32: it used to hand an
    infinite threshold to RangeIndex.search, which refused it mid-generate."""
    torch = _torch()
    from transformers import AutoModelForCausalLM

    from neuropil import hf

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        _tiny_llama_config(), attn_implementation=hf.ATTENTION
    ).eval()
    cache = hf.SparseCache(model, "threshold", threshold=threshold, sinks=1, window=1)
    ids = torch.randint(0, 100, (1, 6))
    out = model.generate(
        ids, **hf.cache_kwargs(model, cache), max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape == (1, 9)
    s = cache.summary()
    assert s["steps"] >= 1
    # -1e300: every key; 1e300: only the sink and the window (2 of 6-8 keys)
    if threshold < 0:
        assert s["fraction_read"] == 1.0
    else:
        assert s["fraction_read"] < 0.5


# ================================================================== valid edge cases
def _same(a: Any, b: Any) -> None:
    a = a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    np.testing.assert_array_equal(a, b)


# Each entry point on an input in a given layout must give exactly what it gives
# on the float32 C-contiguous array of the same values (converted once).
LAYOUT_CALLS = {
    "quant.matvec": (lambda x: qw().matvec(x), lambda: rng.standard_normal((3, 64))),
    "quant.matvec_rows": (lambda x: qw().matvec_rows(x, [7, 0, 7]), lambda: X64.copy()),
    "quant.quantize": (lambda x: quantize(x).dequantize(), lambda: W.copy()),
    "flyhash.encode": (lambda x: fh().encode(x), lambda: XFH.copy()),
    "flyhash.hash": (lambda x: fh().hash(x), lambda: XFH.copy()),
    "flyhash.encode_indices": (lambda x: fh().encode_indices(x), lambda: XFH.copy()),
    "SparseFFN": (lambda x: ffn(threshold=0.5)(x), lambda: XF.copy()),
    "InputSparseFFN": (lambda x: ffn(InputSparseFFN, thresholds=(0.3, 0.3))(x), lambda: XF.copy()),
    "RangeIndex.topk": (lambda x: rix().topk(x, 5), lambda: QUERIES.copy()),
    "RangeIndex.search": (lambda x: rix().search(x, np.full(3, 0.5)), lambda: QUERIES.copy()),
    "RangeIndex(keys)": (lambda x: RangeIndex(x, "flat").topk(QUERIES, 5), lambda: KEYS.copy()),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("call", list(LAYOUT_CALLS))
def test_layouts_give_the_contiguous_answer(call, layout):
    fn, make = LAYOUT_CALLS[call]
    x = make().astype(np.float32)
    if layout == "float16-exact":
        x = x.astype(np.float16).astype(np.float32)  # values float16 holds exactly
    variant = LAYOUTS[layout](x)
    want = fn(np.ascontiguousarray(variant, dtype=np.float32))
    got = fn(variant)
    for a, b in zip(
        got if isinstance(got, tuple) else (got,),
        want if isinstance(want, tuple) else (want,),
        strict=True,
    ):
        _same(a, b)


@needs_torch
@pytest.mark.parametrize("call", list(LAYOUT_CALLS))
def test_torch_cpu_tensors_give_the_numpy_answer(call):
    """A CPU tensor (also a transposed view, and one that requires grad) gives
    the numpy answer, as a tensor where the entry point returns its input's library."""
    torch = _torch()
    fn, make = LAYOUT_CALLS[call]
    x = make().astype(np.float32)
    want = fn(x)
    for t in (
        torch.from_numpy(x),
        torch.from_numpy(np.asfortranarray(x)),
        torch.from_numpy(x.copy()).requires_grad_(),
    ):
        got = fn(t)
        for a, b in zip(
            got if isinstance(got, tuple) else (got,),
            want if isinstance(want, tuple) else (want,),
            strict=True,
        ):
            a = a.detach().numpy() if hasattr(a, "detach") else a
            b = np.asarray(b)
            # (torch results of index methods are int64; SparseFFN with grad: torch ops)
            np.testing.assert_allclose(
                a.astype(np.float64), b.astype(np.float64), rtol=1e-5, atol=1e-5
            )


def test_empty_batches_give_empty_results_of_the_right_dtype():
    """n = 0 rows: every entry point that takes a batch gives (0, ...) of its
    usual dtype, as numpy's ``@`` would."""
    q = qw()
    assert q.matvec(np.zeros((0, 64), np.float32)).shape == (0, 8)
    assert q.matvec_rows(X64, []).shape == (0,)
    f = fh()
    for name, dtype, width in (
        ("encode", np.float32, f.output_dim),
        ("hash", np.uint8, 26),
        ("encode_indices", np.uint32, f.active_bits),
    ):
        out = getattr(f, name)(np.zeros((0, 16), np.float32))
        assert out.shape == (0, width) and out.dtype == dtype
    ix = bix()
    d, i = ix.search(np.zeros((0, 2), np.uint8), 3)
    assert d.shape == i.shape == (0, 3) and i.dtype == np.int64
    lims, d, i = ix.range_search(np.zeros((0, 2), np.uint8), 3)
    assert lims.tolist() == [0] and d.size == i.size == 0
    assert ix.remove([]) == 0
    before = len(ix)
    ix.add(np.zeros((0, 2), np.uint8))
    assert len(ix) == before
    for c in (SparseFFN, InputSparseFFN):
        y = ffn(c)(np.zeros((0, D), np.float32))
        assert y.shape == (0, D) and y.dtype == np.float32
    lims, ids, scores = rix().search(np.zeros((0, 8), np.float32), np.zeros(0))
    assert lims.tolist() == [0] and ids.size == 0
    ids, scores = rix().topk(np.zeros((0, 8), np.float32), 3)
    assert ids.shape == scores.shape == (0, 3)
    s = sw()
    b = s.take([])
    assert b["frames"].shape == (0, 3, 4) and b["a"].shape == (0,)
    c = NeuronCache(8, 3)
    c.record(np.zeros((0, 8), bool))
    c.record([])
    assert c.stats()["total_activations"] == 1  # the empty id list is one token


def test_references_on_small_inputs():
    """Results against numpy: the quantized mat-vec against the dequantized
    matrix, FlyHash's activations against its projection, Hamming search
    against brute force (duplicated ids included), the FFNs' dense path."""
    q = qw()
    x = rng.standard_normal((2, 64)).astype(np.float32)
    # (AVX-512 VNNI multiplies x rounded to int16 per group: near, not exactly, float32)
    np.testing.assert_allclose(q.matvec(x), x @ q.dequantize().T, rtol=1e-3, atol=5e-3)
    np.testing.assert_allclose(
        q.matvec(x, level="scalar"), x @ q.dequantize().T, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        q.matvec_rows(x[0], [5, 5, 0]), (q.dequantize() @ x[0])[[5, 5, 0]], rtol=1e-3, atol=5e-3
    )
    f = fh()
    bits = np.unpackbits(f.projection_arrays()["sign_bits"], axis=1, bitorder="little")[:, :16]
    proj = np.where(bits == 1, 1.0, -1.0)
    np.testing.assert_allclose(f.activations(XFH), XFH @ proj.T, rtol=1e-5, atol=1e-4)
    ix = BinaryIndex(12)
    codes = rng.integers(0, 256, (9, 2), dtype=np.uint8)
    codes[:, 1] &= 0x0F
    ix.add(codes, ids=[4, 4, 1, 2, 3, 0, 7, 7, 9])
    queries = codes[:3] ^ np.uint8(1)
    dist, ids = ix.search(queries, 20)
    brute = np.unpackbits(queries[:, None] ^ codes[None], axis=2).sum(2)
    np.testing.assert_array_equal(dist[:, :9], np.sort(brute, axis=1, kind="stable"))
    assert (ids[:, 9:] == -1).all() and (dist[:, 9:] == 2**31 - 1).all()
    assert ix.remove([4, 4, 2**40]) == 2 and len(ix) == 7
    for c in (SparseFFN, InputSparseFFN):
        h = np.maximum(XF @ UP.T, 0)
        y = c(None, UP, DOWN, activation="relu")(XF)
        np.testing.assert_allclose(y, h @ DOWN.T, rtol=1e-4, atol=1e-4)


def test_neuron_cache_byte_figures_are_exact_past_2_64():
    """bytes_per_neuron near 2**63: the byte figures used to wrap (hot_bytes 0)
    or saturate (bytes_fetched 2**64 - 1); now exact Python ints."""
    c = NeuronCache(8, 3, bytes_per_neuron=2**63)
    c.record([1, 2])
    c.reclassify()
    c.record([3, 4, 5])
    c.record([3, 4, 5])
    s = c.stats()
    assert s["hot_bytes"] == 2 * 2**63
    assert s["bytes_fetched"] == 6 * 2**63


def test_windows_oversized_batches_allocate_what_exists():
    """A batch size or prefetch past the epoch is one batch of every window, not
    buffers for windows that do not exist (batch_size=2**40 raised MemoryError;
    a huge prefetch hung building a list of buffers: tested out of process,
    RISKY["windows-prefetch-2**62"])."""
    s = sw()
    want = s.take(np.arange(len(s)))
    for kw in ({"batch_size": 2**40}, {"batch_size": 2**62, "prefetch": 0}, {"batch_size": 4}):
        # (copied as they come: a batch is valid until the iterator advances)
        frames = np.concatenate([b["frames"].copy() for b in s.batches(shuffle=False, **kw)])
        np.testing.assert_array_equal(frames, want["frames"])


def test_windows_big_endian_frames_save_and_load(tmp_path):
    """Big-endian frames are valid windows; save writes them little-endian (it
    used to refuse them, leaving an unsaveable object)."""
    s = SlidingWindows(FRAMES.astype(">f4"), 3, targets={"a": np.arange(20, dtype=">i4")})
    s.save(tmp_path / "w.safetensors")
    back = SlidingWindows.load(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(back.take([0, 5])["frames"], s.take([0, 5])["frames"])
    np.testing.assert_array_equal(back.take([0, 5])["a"], s.take([0, 5])["a"])
    with pytest.raises(ArgumentError, match=r"frames must have a dtype safetensors stores"):
        SlidingWindows(FRAMES.astype(np.longdouble), 3).save(tmp_path / "x.safetensors")


# ================================================================== files
def _savers() -> dict[str, tuple[Any, Any]]:
    """name -> (a small object to save, its loader)."""
    out: dict[str, tuple[Any, Any]] = {
        "quant": (qw(), QuantizedWeights.load),
        "quant.load_file": (qw(), neuropil.quant.load_file),
        "flyhash": (fh(), FlyHash.load),
        "binary-index": (bix(), BinaryIndex.load),
        "neuron-cache": (nc(), NeuronCache.load),
        "range": (rix(), RangeIndex.load),
        "windows-mmap": (sw(), SlidingWindows.load),
        "windows-read": (sw(), lambda p: SlidingWindows.load(p, mmap=False)),
    }
    if HAS_TORCH:
        out["membrane"] = (bank(), _membrane().MembraneBank.load)
    return out


LOADERS = [
    "quant",
    "quant.load_file",
    "flyhash",
    "binary-index",
    "neuron-cache",
    "range",
    "windows-mmap",
    "windows-read",
    pytest.param("membrane", marks=needs_torch),
]


def _good_file(name: str, tmp_path: pathlib.Path) -> tuple[pathlib.Path, bytes, Any]:
    obj, load = _savers()[name]
    path = tmp_path / f"{name}.safetensors"
    obj.save(path)
    return path, path.read_bytes(), load


CORRUPTIONS = {
    "empty": lambda good: b"",
    "7-bytes": lambda good: good[:7],
    "header-only": lambda good: good[: 8 + int.from_bytes(good[:8], "little")],
    "half": lambda good: good[: len(good) // 2],
    "last-byte-cut": lambda good: good[:-1],
    "huge-header-length": lambda good: (2**62).to_bytes(8, "little") + good[8:],
    "header-length-past-end": lambda good: (len(good)).to_bytes(8, "little") + good[8:],
    "header-not-json": lambda good: good[:8] + b"\xff" * (len(good) - 8),
    "random": lambda good: np.random.default_rng(len(good)).bytes(len(good)),
    "zeros": lambda good: bytes(len(good)),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("name", LOADERS)
def test_damaged_files_raise_format_error(name, corruption, tmp_path):
    path, good, load = _good_file(name, tmp_path)
    path.write_bytes(CORRUPTIONS[corruption](good))
    with pytest.raises(FormatError) as info:
        load(path)
    assert str(path) in str(info.value) or path.name in str(info.value)


@pytest.mark.parametrize("name", [*LOADERS[:-1], pytest.param("membrane", marks=needs_torch)])
def test_trailing_bytes_raise_format_error(name, tmp_path):
    path, good, load = _good_file(name, tmp_path)
    path.write_bytes(good + b"\0")
    with pytest.raises(FormatError):
        load(path)


@pytest.mark.parametrize("name", LOADERS)
def test_unopenable_paths_raise_the_oserror_open_would(name, tmp_path):
    _, _, load = _good_file(name, tmp_path)
    with pytest.raises(IsADirectoryError) as info:
        load(tmp_path)
    assert info.value.filename == str(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load(tmp_path / "missing" / "x.safetensors")
    assert info.value.filename == str(tmp_path / "missing" / "x.safetensors")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        load(tmp_path / "file" / "x.safetensors")
    with pytest.raises(TypeError, match=r"str, bytes or os\.PathLike"):
        load(None)


@pytest.mark.skipif(IS_ROOT or os.name != "posix", reason="root reads files of any mode")
@pytest.mark.parametrize("name", LOADERS)
def test_unreadable_file_raises_permission_error(name, tmp_path):
    path, _, load = _good_file(name, tmp_path)
    path.chmod(0)
    with pytest.raises(PermissionError):
        load(path)


@pytest.mark.parametrize("name", LOADERS)
def test_another_formats_file_raises_format_error(name, tmp_path):
    """Each loader refuses the files of the others (never loads garbage from them)."""

    def family(n: str) -> str:
        return n.split("-")[0].split(".")[0]

    _, _, load = _good_file(name, tmp_path)
    for other in ("quant", "flyhash", "binary-index", "neuron-cache", "range", "windows-read"):
        if family(other) != family(name):
            with pytest.raises(FormatError):
                load(_good_file(other, tmp_path)[0])


@pytest.mark.parametrize("name", LOADERS)
def test_saves_to_bad_paths_raise_oserror_and_keep_the_folder(name, tmp_path):
    obj, _ = _savers()[name]
    (tmp_path / "keep").write_bytes(b"keep")
    with pytest.raises(IsADirectoryError):
        obj.save(tmp_path)
    with pytest.raises(FileNotFoundError):
        obj.save(tmp_path / "missing" / "x.safetensors")
    with pytest.raises(NotADirectoryError):  # a folder in the path that is a file
        obj.save(tmp_path / "keep" / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no temporary file left
    assert (tmp_path / "keep").read_bytes() == b"keep"


def test_failed_saves_keep_the_old_file(tmp_path):
    """A save refused for its argument leaves the file it would replace as it was."""
    path = tmp_path / "w.safetensors"
    sw().save(path)
    good = path.read_bytes()
    with pytest.raises(ArgumentError):
        SlidingWindows(FRAMES.astype(np.longdouble), 3).save(path)
    with pytest.raises(ArgumentError):
        save_file(path, {"w": qw(), "w.scales": W})
    with pytest.raises(ArgumentError):
        save_file(path, {"__metadata__": W})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


# A save that fails while writing (the disk full): a fresh interpreter under a
# file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with
# EFBIG, for root too) saves a large object over a small good file.
_FSIZE_SETUP = """
import pathlib, resource, signal
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
d = pathlib.Path(FOLDER)
rng = np.random.default_rng(0)

def over_limit(small, large, name):
    p = d / f"{name}.safetensors"
    small.save(p)
    good = p.read_bytes()
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) + 64, resource.RLIM_INFINITY))
    try:
        large.save(p)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        intact = p.read_bytes() == good
        left = sorted(x.name for x in d.iterdir() if x.name.startswith("."))
        assert intact, f"{name}: the old file was changed by the failed save"
        assert not left, f"{name}: temporary files left: {left}"
"""

_FSIZE_CASES = {
    "quant": "from neuropil.quant import quantize\n"
    "over_limit(quantize(rng.standard_normal((8, 64)).astype(np.float32)), "
    "quantize(rng.standard_normal((256, 1024)).astype(np.float32)), 'quant')",
    "flyhash": "from neuropil.flyhash import FlyHash\n"
    "over_limit(FlyHash(8, 2, 0.25, seed=1), FlyHash(256, seed=1), 'flyhash')",
    "binary-index": "from neuropil.flyhash import BinaryIndex\n"
    "big = BinaryIndex(16); big.add(np.zeros((5000, 2), np.uint8))\n"
    "over_limit(BinaryIndex(16), big, 'binary-index')",
    "neuron-cache": "from neuropil.neurons import NeuronCache\n"
    "over_limit(NeuronCache(8, 2), NeuronCache(100000, 4), 'neuron-cache')",
    "range": "from neuropil.range import RangeIndex\n"
    "over_limit(RangeIndex(rng.standard_normal((20, 4)).astype(np.float32)), "
    "RangeIndex(rng.standard_normal((5000, 16)).astype(np.float32)), 'range')",
    "windows": "from neuropil.windows import SlidingWindows\n"
    "over_limit(SlidingWindows(np.zeros((5, 2), np.float32), 2), "
    "SlidingWindows(np.zeros((5000, 16), np.float32), 2), 'windows')",
    "membrane": "from neuropil.membrane import MembraneBank\n"
    "over_limit(MembraneBank(4, 2, 2), MembraneBank(64, 16, 16), 'membrane')",
}


@pytest.fixture(scope="module")
def fsize_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsize")
    setup = f"FOLDER = {str(d)!r}\n" + textwrap.dedent(_FSIZE_SETUP)
    cases = dict(_FSIZE_CASES)
    if not HAS_TORCH:
        cases.pop("membrane")
    return run_cases(setup, cases, timeout=120)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE")
@pytest.mark.parametrize(
    "name",
    [
        *[n for n in _FSIZE_CASES if n != "membrane"],
        pytest.param("membrane", marks=needs_torch),
    ],
)
def test_save_failing_mid_write_keeps_the_old_file(fsize_results, name):
    res = fsize_results[name]
    check_result(res, "OSError", ("File too large",))


# ================================================================== risky calls, out of process
# Huge extents and views that would be copied: each must be refused (or run)
# without a crash or a hang. The interpreter runs under a 16 GiB address-space
# limit, so a request that should have been refused fails fast instead of
# taking the machine's memory.
_RISKY_SETUP = """
import resource
import numpy as np
resource.setrlimit(resource.RLIMIT_AS, (16 << 30, resource.RLIM_INFINITY))
from neuropil.flyhash import BinaryIndex, FlyHash
from neuropil.neurons import InputSparseFFN, NeuronCache, SparseFFN
from neuropil.quant import QuantizedWeights, quantize
from neuropil.range import RangeIndex
from neuropil.windows import SlidingWindows

def B(shape, dtype=np.float32):  # a huge read-only view of one element
    return np.broadcast_to(np.ones(1, dtype), shape)

sw = SlidingWindows(np.arange(80, dtype=np.float32).reshape(20, 4), 3,
                    targets={"a": np.arange(20)}, target_offset=1)
fh = FlyHash(16, seed=0)
ix = BinaryIndex(16)
ix.add(np.zeros((4, 2), np.uint8))
w = np.ones((16, 8), np.float32)
"""

# label: (statement, expected exception class name or None, needles (see check_message))
# fmt: off
RISKY = {
    "windows-headroom-str": ("sw.memory_plan(headroom='a')", "ArgumentError",
                             ("headroom must", "got 'a'")),
    "windows-prefetch-2**62": (
        "assert sum(len(b['frames']) for b in sw.batches(2, prefetch=2**62)) == len(sw)", None, ()),
    "windows-batch-2**62": (
        "assert [len(b['frames']) for b in sw.batches(2**62, prefetch=3)] == [len(sw)]", None, ()),
    "windows-take-broadcast": ("sw.take(B((2**40,), np.int64))", "MemoryError", ()),
    "windows-frames-broadcast": ("SlidingWindows(B((2**40, 4)), 3)", "MemoryError", ()),
    "flyhash-dim-2**62": ("FlyHash(2**62, seed=0)", "ArgumentError", (
        "input_dim must be small enough for the sign projection to fit in 8 GiB",
        "(8589934592 bytes); got 4611686018427387904 (with expansion_ratio=13.0",
        "a projection of 3.456e37 bytes")),
    "flyhash-ratio-1e9": ("FlyHash(64, 1e9, seed=0)", "ArgumentError",
                          ("expansion_ratio must", "8 GiB", "got 1000000000.0")),
    "flyhash-encode-broadcast": ("fh.encode(B((2**34, 16)))", "ArgumentError",
                                 ("x must", "8 GiB", f"got {(2**34, 16)}")),
    "flyhash-hash-broadcast": ("fh.hash(B((2**36, 16)))", "ArgumentError",
                               ("x must", "8 GiB", f"got {(2**36, 16)}")),
    "binary-index-k-2**62": ("ix.search(np.zeros((1, 2), np.uint8), 2**62)", "ArgumentError",
                             ("k must", "8 GiB", f"got {2**62}")),
    "binary-index-nbits-2**62": ("BinaryIndex(2**62)", "ArgumentError",
                                 ("nbits must", f"got {2**62}")),
    "binary-index-broadcast-codes": ("ix.add(B((2**40, 2), np.uint8))", "MemoryError", ()),
    "binary-index-broadcast-queries": ("ix.search(B((2**40, 2), np.uint8), 1)", "MemoryError", ()),
    "quant-broadcast": ("quantize(B((2**40, 64)))", "MemoryError", ()),
    "quant-matvec-broadcast": (
        "quantize(np.ones((8, 64), np.float32)).matvec(B((2**40, 64)))", "MemoryError", ()),
    "quant-gguf-huge": ("QuantizedWeights.from_gguf(b'\\\\0' * 18, 'q4_0', (2**62, 2**62))",
                        "FormatError", (f"shape ({2**62}, {2**62}) is too large",)),
    "range-topk-2**62": ("RangeIndex(np.ones((4, 2), np.float32)).topk(np.ones((1, 2)), 2**62)",
                         "ArgumentError", ("k must", f"got {2**62}")),
    "range-broadcast-keys": ("RangeIndex(B((2**40, 8)))", "MemoryError", ()),
    "ffn-broadcast-x": ("SparseFFN(w, w, w.T)(B((2**40, 8)))", "MemoryError", ()),
    "input-sparse-broadcast-x": ("InputSparseFFN(w, w, w.T)(B((2**40, 8)))", "MemoryError", ()),
    "neuron-cache-window-2**62": (
        "c = NeuronCache(8, 3, policy='window', window=2**62)\n"
        "for i in range(5): c.record([i])\n"
        "c.reclassify(); assert c.hot_neurons().tolist() == [2, 3, 4]", None, ()),
    "neuron-cache-broadcast-mask": ("NeuronCache(8).record(B((2**40, 8), bool))", "MemoryError",
                                    ()),
    # refused before any thread starts (a million would take many minutes to start)
    "set_num_threads-10**6": ("import neuropil; neuropil.set_num_threads(10**6)", "ArgumentError",
                              ("n must", "at most 4096", "got 1000000")),
}
# fmt: on


@pytest.fixture(scope="module")
def risky_results():
    return run_cases(_RISKY_SETUP, {k: v[0] for k, v in RISKY.items()}, timeout=180)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_AS")
@pytest.mark.parametrize(
    "label", list(RISKY)
)
def test_risky_calls(risky_results, label):
    _, exc, needles = RISKY[label]
    check_result(risky_results[label], exc, needles)


def test_num_threads_env_var_past_the_bound():
    out = run_snippet(
        """
        import neuropil
        try:
            neuropil.get_num_threads()
        except neuropil.ArgumentError as e:
            print(e)
        """,
        env={"NEUROPIL_NUM_THREADS": "1000000"},
    )
    assert 'NEUROPIL_NUM_THREADS must be a positive integer at most 4096; got "1000000"' in out


def test_the_case_runner_reports_crashes_and_hangs():
    """The harness itself: a case that kills the interpreter or never ends is
    reported as such, and the cases around it keep their results."""
    import concurrent.futures

    res = run_cases(
        "import os, time",
        {
            "fine": "x = 1",
            "raises": "raise ValueError('v must')",
            "crash": "os.abort()",
            "after": "x = 2",
        },
    )
    assert res["fine"]["exc"] is None and res["raises"]["exc"] == "ValueError"
    assert res["crash"]["exc"] == "CRASH" and res["after"]["exc"] == "NOT RUN"
    assert res["crash"]["msg"].startswith("the interpreter exited with status -6, while running")
    assert "after 'crash': CRASH" in res["after"]["msg"]
    # setup dying: the first case gets the status (was NOT RUN with no reason)
    res = run_cases("import os; os.abort()", {"a": "x = 1", "b": "x = 2"})
    assert res["a"]["exc"] == "CRASH" and res["b"]["exc"] == "NOT RUN"
    assert "status -6, during setup, before any case started" in res["a"]["msg"]
    res = run_cases("import os", {"a": "x = 1", "quiet-exit": "os._exit(0)", "b": "x = 2"})
    assert res["a"]["exc"] is None and res["quiet-exit"]["exc"] == "CRASH"
    assert "status 0, while running this case" in res["quiet-exit"]["msg"]
    # Hangs, in a case and in setup: a sleep far past a timeout generous enough
    # for a loaded machine to start the interpreter (3 s was not); run side by side.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_case = pool.submit(
            run_cases, "import time", {"fine": "x = 1", "hang": "time.sleep(600)"}, 20
        )
        in_setup = pool.submit(run_cases, "import time; time.sleep(600)", {"a": "x = 1"}, 20)
        in_case, in_setup = in_case.result(), in_setup.result()
    assert in_case["fine"]["exc"] is None and in_case["hang"]["exc"] == "HANG"
    assert in_case["hang"]["msg"].startswith("no result within the 20 s timeout")
    assert "while running this case" in in_case["hang"]["msg"]
    assert in_setup["a"]["exc"] == "HANG", in_setup  # was NOT RUN with an empty message
    assert "20 s timeout" in in_setup["a"]["msg"] and "during setup" in in_setup["a"]["msg"]
    with pytest.raises(AssertionError, match="PanicException"):
        check_result({"exc": "PanicException", "mro": ["PanicException"], "msg": ""}, None, ())


# ================================================================== properties, out of process
# Random shapes, dtypes, layouts and SIMD levels through the kernels, against
# numpy references; each property runs in its own interpreter (a kernel that
# reads out of bounds would crash it, not the session).
_HYPOTHESIS_HEADER = """
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from neuropil import _native
from neuropil.errors import FormatError
LEVELS = _native.simd_levels()
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                    derandomize=DERANDOMIZE, print_blob=True,
                    suppress_health_check=list(HealthCheck))

def layout(a, kind):
    if kind == "C":
        return a
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "strided":
        return np.repeat(a, 2, axis=-1)[..., ::2]
    if kind == "negative":
        return np.ascontiguousarray(a[::-1])[::-1]
    if kind == "float64":
        return a.astype(np.float64)
    if kind == "big-endian":
        return a.astype(a.dtype.newbyteorder(">"))
    raise AssertionError(kind)

LAYOUT = st.sampled_from(["C", "F", "strided", "negative", "float64", "big-endian"])
"""


def run_property(body: str, max_examples: int = 50, timeout: float = 600) -> None:
    n = max_examples * HYPOTHESIS_SCALE
    header = _HYPOTHESIS_HEADER.replace("MAX_EXAMPLES", str(n)).replace(
        "DERANDOMIZE", str(not HYPOTHESIS_RANDOM)
    )
    out = run_snippet(
        textwrap.dedent(header) + textwrap.dedent(body) + "\nprint('ok')\n", timeout=timeout
    )
    assert out.strip().endswith("ok"), out


def test_property_flyhash_matches_its_projection():
    """activations = x @ W.T of the projection's own arrays (sign and sparse),
    equal at every SIMD level and for every layout; winners = the k largest
    activations, ties to the lower index; hash = the winners' bits."""
    run_property("""
    from neuropil.flyhash import FlyHash

    def matrix(fh):
        m, d = fh.output_dim, fh.input_dim
        arrs = fh.projection_arrays()
        if "sign_bits" in arrs:
            bits = np.unpackbits(arrs["sign_bits"], axis=1, bitorder="little")[:, :d]
            return np.where(bits == 1, 1.0, -1.0)
        idx, signs = arrs["indices"], arrs["signs"]
        c = idx.shape[1]
        neg = np.unpackbits(signs, axis=1, bitorder="little")[:, :c]
        w = np.zeros((m, d))
        for r in range(m):
            w[r, idx[r]] += np.where(neg[r] == 1, -1.0, 1.0)
        return w

    @SETTINGS
    @given(d=st.integers(1, 40), ratio=st.floats(1.0, 6.0), n=st.integers(0, 5),
           projection=st.sampled_from(["sign", "sparse", "seeded"]), seed=st.integers(0, 2**64 - 1),
           kind=LAYOUT, data=st.data())
    def prop(d, ratio, n, projection, seed, kind, data):
        m = int(np.floor(d * ratio))
        k = data.draw(st.integers(1, m))
        frac = (k + 0.5) / m
        fh = FlyHash(d, ratio, min(frac, 1.0), seed=seed, projection=projection,
                     connectivity=data.draw(st.floats(1.0 / d, 1.0)))
        k = fh.active_bits
        x = np.random.default_rng(seed % 1000).standard_normal((n, d)).astype(np.float32)
        x = np.round(x * 8) / 8  # exact sums: every level agrees bit for bit
        ref = x.astype(np.float64) @ matrix(fh).T
        for level in LEVELS:
            act = fh.activations(layout(x, kind), level=level)
            assert act.shape == (n, fh.output_dim) and act.dtype == np.float32
            np.testing.assert_array_equal(act, ref.astype(np.float32))
            idx = fh.encode_indices(layout(x, kind), level=level)
            want = np.sort(np.argsort(-act, axis=1, kind="stable")[:, :k], axis=1)
            np.testing.assert_array_equal(idx, want)
            bits = np.unpackbits(fh.hash(x, level=level), axis=1, bitorder="little")
            assert (np.flatnonzero(bits[0]) == idx[0]).all() if n else bits.shape[0] == 0
            enc = fh.encode(x, level=level)
            mask = np.zeros_like(act, bool)
            np.put_along_axis(mask, idx.astype(np.int64), True, axis=1)
            np.testing.assert_array_equal(enc, np.where(mask, act, 0))

    prop()
    """)


def test_property_binary_index_matches_brute_force():
    """Hamming and Jaccard top-k (ties by insertion order, missing neighbours
    as id -1), range search and remove against brute force, duplicate ids included."""
    run_property("""
    from neuropil.flyhash import BinaryIndex

    @SETTINGS
    @given(nbits=st.integers(1, 40), n=st.integers(0, 25), nq=st.integers(0, 4),
           k=st.integers(1, 30), r=st.integers(0, 40), seed=st.integers(0, 2**32),
           dup=st.booleans(), kind=st.sampled_from(["C", "F", "strided", "negative"]))
    def prop(nbits, n, nq, k, r, seed, dup, kind):
        g = np.random.default_rng(seed)
        nb = (nbits + 7) // 8
        bits = g.integers(0, 2, (n + nq, nb * 8), dtype=np.uint8)
        bits[:, nbits:] = 0
        codes = np.packbits(bits, axis=1, bitorder="little")
        base, queries = codes[:n], codes[n:]
        ids = g.integers(0, 5 if dup else 2**40, n)
        ix = BinaryIndex(nbits)
        ix.add(layout(base, kind), ids=ids)
        ham = np.unpackbits(queries[:, None] ^ base[None], axis=2).sum(2).astype(np.int64)
        for level in LEVELS:
            dist, got = ix._native.search(layout(queries, kind), k, "hamming", level)
            order = np.argsort(ham, axis=1, kind="stable")[:, :k]
            want_d = np.full((nq, k), 2**31 - 1)
            want_i = np.full((nq, k), -1)
            want_d[:, :order.shape[1]] = np.take_along_axis(ham, order, 1)
            want_i[:, :order.shape[1]] = ids[order]
            np.testing.assert_array_equal(dist, want_d)
            np.testing.assert_array_equal(got, want_i)
            lims, d2, i2 = ix._native.range_search(queries, r, level)
            for q in range(nq):
                sel = np.flatnonzero(ham[q] <= r)
                sel = sel[np.argsort(ham[q][sel], kind="stable")]
                np.testing.assert_array_equal(i2[lims[q]:lims[q + 1]], ids[sel])
                np.testing.assert_array_equal(d2[lims[q]:lims[q + 1]], ham[q][sel])
        inter = np.unpackbits(queries[:, None] & base[None], axis=2).sum(2)
        union = np.unpackbits(queries[:, None] | base[None], axis=2).sum(2)
        jac = np.where(union == 0, 0.0, 1.0 - inter / np.maximum(union, 1)).astype(np.float32)
        dist, got = ix.search(queries, k, metric="jaccard")
        m = min(k, n)
        np.testing.assert_allclose(dist[:, :m], np.sort(jac, axis=1)[:, :m], atol=1e-6)
        assert (got[:, m:] == -1).all() and np.isinf(dist[:, m:]).all()
        gone = ids[: n // 2]
        removed = ix.remove(gone)
        assert removed == int(np.isin(ids, gone).sum())
        left = ix.contents()[1]
        np.testing.assert_array_equal(left, ids[~np.isin(ids, gone)])

    prop()
    """)


def test_property_quantized_matvec_matches_the_dequantized_matrix():
    """matvec / matvec_rows against x @ dequantize().T for random shapes, bit
    widths, groups, layouts and levels (float32 at the scalar level; the
    int16-activation kernels of AVX-512 within their documented rounding)."""
    run_property("""
    from neuropil.quant import quantize

    @SETTINGS
    @given(rows=st.integers(1, 6), cols=st.integers(1, 300), n=st.integers(0, 5),
           bits=st.sampled_from([2, 3, 4, 8]), group=st.sampled_from([32, 64, 128, 256]),
           scheme=st.sampled_from(["asym", "sym"]), seed=st.integers(0, 2**32), kind=LAYOUT,
           data=st.data())
    def prop(rows, cols, n, bits, group, scheme, seed, kind, data):
        g = np.random.default_rng(seed)
        w = g.standard_normal((rows, cols)).astype(np.float32)
        q = quantize(w, bits, group, scheme)
        deq = q.dequantize()
        assert deq.shape == (rows, cols) and np.isfinite(deq).all()
        x = g.standard_normal((n, cols)).astype(np.float32)
        ref = x.astype(np.float64) @ deq.T.astype(np.float64)
        tol = 1e-4 * (1 + np.abs(x).sum(1, keepdims=True) * np.abs(deq).max())
        for level in LEVELS:
            y = q.matvec(layout(x, kind), level=level)
            assert y.shape == (n, rows) and y.dtype == np.float32
            slack = 1 if level == "scalar" else 200  # int16 activations: step max|x| / 32767
            assert (np.abs(y - ref) <= slack * tol).all(), (level, np.abs(y - ref).max())
        idx = data.draw(st.lists(st.integers(0, rows - 1), max_size=8))
        if n:
            y = q.matvec_rows(layout(x[:1], kind)[0], idx, level="scalar")
            np.testing.assert_allclose(y, ref[0][idx], rtol=1e-4, atol=tol[0, 0])

    prop()
    """)


def test_property_ffns_match_their_dense_reference():
    """SparseFFN and InputSparseFFN (all four weight formats, gated or not) in
    dense mode equal the numpy FFN of their stored weights; top_k = h and
    thresholds of 0 change nothing; an empty batch gives (0, d)."""
    run_property(
        """
    from scipy_free_gelu import gelu
    from neuropil.neurons import InputSparseFFN, SparseFFN

    ACT = {"relu": lambda v: np.maximum(v, 0), "silu": lambda v: v / (1 + np.exp(-v)),
           "gelu": gelu}

    @SETTINGS
    @given(h=st.integers(1, 12).map(lambda v: 2 * v), d=st.integers(1, 12).map(lambda v: 2 * v),
           n=st.integers(0, 4), gated=st.booleans(), act=st.sampled_from(sorted(ACT)),
           fmt=st.sampled_from([("float32", None), ("float16", None), ("float32", 8),
                                ("float32", 4)]),
           cls=st.sampled_from([SparseFFN, InputSparseFFN]), seed=st.integers(0, 2**32),
           kind=LAYOUT)
    def prop(h, d, n, gated, act, fmt, cls, seed, kind):
        g = np.random.default_rng(seed)
        gate = g.standard_normal((h, d)).astype(np.float32) if gated else None
        up = g.standard_normal((h, d)).astype(np.float32)
        down = g.standard_normal((d, h)).astype(np.float32)
        ub = None if gated else g.standard_normal(h).astype(np.float32)
        db = g.standard_normal(d).astype(np.float32)
        ffn = cls(gate, up, down, act, fmt[1], dtype=fmt[0], up_bias=ub, down_bias=db)
        G, U, Dn = (None if a is None else a.astype(np.float64) for a in ffn.weights())
        x = g.standard_normal((n, d)).astype(np.float32)
        xd = x.astype(np.float64)
        if gated:
            hid = ACT[act](xd @ G.T) * (xd @ U.T)
        else:
            hid = ACT[act](xd @ U.T + ub)
        ref = hid @ Dn.T + db
        tol = 1e-4 * (1 + np.abs(hid).sum(1, keepdims=True) * np.abs(Dn).max())
        y = ffn(layout(x, kind), dense=True)
        assert y.shape == (n, d) and y.dtype == np.float32
        assert (np.abs(y - ref) <= tol).all(), np.abs(y - ref).max()
        if cls is SparseFFN:
            ffn.top_k = h
        else:
            ffn.set_thresholds(0.0, 0.0)
        assert (np.abs(ffn(x) - ref) <= tol).all()
        if n:
            y1 = ffn(layout(x[0], kind))
            assert y1.shape == (d,) and (np.abs(y1 - ref[0]) <= tol[0]).all()

    prop()
    """.replace(
            "from scipy_free_gelu import gelu",
            """
    from math import erf
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / 2**0.5)), otypes=[float])""",
        )
    )


def test_property_range_index_is_exact():
    """search finds every key with q.k >= t and no other (up to float32
    rounding at the boundary), for every method; topk gives the k best."""
    run_property("""
    from neuropil.range import RangeIndex

    @SETTINGS
    @given(n=st.integers(1, 60), d=st.integers(1, 12), nq=st.integers(0, 4),
           method=st.sampled_from(["auto", "quant", "pca", "kmeans", "flat"]),
           leaf=st.integers(1, 40), seed=st.integers(0, 2**32), kind=LAYOUT, data=st.data())
    def prop(n, d, nq, method, leaf, seed, kind, data):
        g = np.random.default_rng(seed)
        keys = g.standard_normal((n, d)).astype(np.float32)
        ix = RangeIndex(layout(keys, kind), method, leaf=leaf, seed=seed)
        q = g.standard_normal((nq, d)).astype(np.float32)
        scores = q.astype(np.float64) @ keys.T.astype(np.float64)
        t = (np.quantile(scores, g.random(nq), axis=1).diagonal() if nq else np.zeros(0))
        lims, ids, got = ix.search(layout(q, kind), t)
        eps = 1e-4 * (1 + np.abs(q).sum(1)[:, None] * np.abs(keys).max())
        for r in range(nq):
            found = set(ids[lims[r]:lims[r + 1]].tolist())
            sure = set(np.flatnonzero(scores[r] >= t[r] + eps[r]).tolist())
            maybe = set(np.flatnonzero(scores[r] >= t[r] - eps[r]).tolist())
            assert sure <= found <= maybe, (r, sure - found, found - maybe)
        k = data.draw(st.integers(1, n))
        ids, top = ix.topk(q, k)
        assert ids.shape == (nq, k)
        want = -np.sort(-scores, axis=1)[:, :k]
        np.testing.assert_allclose(top, want, rtol=1e-4, atol=1e-4)

    prop()
    """)


def test_property_sliding_windows_match_numpy_slicing():
    """Every window is frames[s:s+W] with s the numpy-computed starts (episodes
    never crossed, the target's look-ahead inside the episode), for random
    dtypes, episodes, strides and offsets; an epoch visits every window once."""
    run_property("""
    from neuropil.windows import SlidingWindows

    @SETTINGS
    @given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=5), dim=st.integers(1, 3),
           window=st.integers(1, 6), stride=st.integers(1, 4), offset=st.integers(-5, 3),
           dtype=st.sampled_from(["float32", "float16", "int16", "uint8", "bool", ">f4"]),
           seed=st.integers(0, 2**32), bs=st.integers(1, 9))
    def prop(lengths, dim, window, stride, offset, dtype, seed, bs):
        n = sum(lengths)
        if n == 0:
            return
        offset = max(offset, -(window - 1))
        look = max(offset, 0)
        if max(lengths) < window + look:
            return
        g = np.random.default_rng(seed)
        frames = (g.standard_normal((n, dim)) * 10).astype(dtype)
        target = g.integers(0, 100, n)
        sw = SlidingWindows(frames, window, stride, episodes=lengths,
                            targets={"t": target}, target_offset=offset)
        starts, a = [], 0
        for ln in lengths:
            starts += list(range(a, a + ln - window - look + 1, stride))
            a += ln
        np.testing.assert_array_equal(sw.starts, starts)
        assert len(sw) == len(starts)
        b = sw.take(np.arange(len(sw)))
        want = np.stack([frames[s:s + window] for s in starts]) if starts else None
        if starts:
            np.testing.assert_array_equal(b["frames"], want)
            np.testing.assert_array_equal(b["t"], target[np.array(starts) + window - 1 + offset])
            assert b["frames"].dtype == frames.dtype
        seen = np.concatenate([x["t"].copy() for x in sw.batches(bs, seed=seed % 97, prefetch=1)]
                              or [np.zeros(0, int)])
        np.testing.assert_array_equal(np.sort(seen), np.sort(b["t"]))

    prop()
    """)


def test_property_neuron_cache_counts():
    """counts() equals numpy's bincount of what was recorded (id lists, masks and
    batches), and the hot set is a subset of the recorded neurons of size <= capacity."""
    run_property("""
    from neuropil.neurons import NeuronCache

    @SETTINGS
    @given(n=st.integers(1, 40), cap=st.integers(0, 40), seed=st.integers(0, 2**32),
           steps=st.integers(1, 8), policy=st.sampled_from(["frequency", "window", "static"]),
           every=st.integers(0, 3))
    def prop(n, cap, seed, steps, policy, every):
        cap = min(cap, n)
        g = np.random.default_rng(seed)
        kw = {"window": 3} if policy == "window" else {}
        c = NeuronCache(n, cap, policy=policy, reclassify_every=every, **kw)
        total = np.zeros(n, np.int64)
        tokens = 0
        for _ in range(steps):
            mask = g.random((int(g.integers(0, 4)), n)) < 0.3
            form = g.integers(0, 3)
            if form == 0:
                for row in mask:
                    c.record(np.flatnonzero(row))
            elif form == 1:
                for row in mask:
                    c.record(row)
            else:
                c.record(mask)
            total += mask.sum(0)
            tokens += len(mask)
        np.testing.assert_array_equal(c._c.counts(), total)
        assert c.stats()["total_activations"] == tokens
        c.reclassify()
        hot = c.hot_neurons()
        assert len(hot) <= cap and (np.diff(hot) > 0).all()
        assert set(hot.tolist()) | set(c.cold_neurons().tolist()) == set(range(n))

    prop()
    """)


def test_property_loaders_refuse_mutated_files(tmp_path):
    """Files with random bit flips, cuts, insertions (and random bytes) load
    or raise FormatError, whatever the loader: never another exception, a panic,
    a crash or a hang."""
    run_property(
        f"""
    import os, pathlib
    from neuropil.quant import QuantizedWeights, load_file, quantize
    from neuropil.flyhash import BinaryIndex, FlyHash
    from neuropil.neurons import NeuronCache
    from neuropil.range import RangeIndex
    from neuropil.windows import SlidingWindows

    d = pathlib.Path({str(tmp_path)!r})
    rng = np.random.default_rng(0)
    ix = BinaryIndex(20)
    ix.add(np.zeros((3, 3), np.uint8), ids=[5, 6, 7])
    nc = NeuronCache(10, 3)
    nc.record([1, 2]); nc.reclassify()
    objs = {{
        "quant": (quantize(rng.standard_normal((4, 64)).astype(np.float32)),
                  [QuantizedWeights.load, load_file]),
        "flyhash": (FlyHash(6, 3, 0.3, seed=3, projection="sparse", connectivity=0.5),
                    [FlyHash.load]),
        "index": (ix, [BinaryIndex.load]),
        "cache": (nc, [NeuronCache.load]),
        "range": (RangeIndex(rng.standard_normal((30, 3)).astype(np.float32)), [RangeIndex.load]),
        "windows": (SlidingWindows(rng.standard_normal((6, 2)).astype(np.float32), 2,
                                   targets={{"y": np.arange(6)}}, target_offset=1),
                    [SlidingWindows.load, lambda p: SlidingWindows.load(p, mmap=False)]),
    }}
    goods = {{}}
    for name, (obj, _) in objs.items():
        obj.save(d / name)
        goods[name] = (d / name).read_bytes()

    @SETTINGS
    @given(name=st.sampled_from(sorted(objs)), data=st.data())
    def prop(name, data):
        good = bytearray(goods[name])
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "random", "header"]))
        if how == "flip":
            for pos in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=4)):
                good[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "cut":
            good = good[:data.draw(st.integers(0, len(good) - 1))]
        elif how == "insert":
            pos = data.draw(st.integers(0, len(good)))
            good[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif how == "random":
            good = bytearray(data.draw(st.binary(max_size=300)))
        else:  # a mutation inside the JSON header only
            n = int.from_bytes(good[:8], "little")
            pos = data.draw(st.integers(8, 8 + n - 1))
            good[pos] = data.draw(st.sampled_from(list(b'{{}}[]:,"0-9e.x \\\\')))
        path = d / f"{{name}}.bad"
        path.write_bytes(bytes(good))
        for load in objs[name][1]:
            try:
                load(path)
            except FormatError:
                pass

    prop()
    """,
        max_examples=150,
    )

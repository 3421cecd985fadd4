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
reason; the test passes (XPASS fails) once they are fixed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

import neuropil
from neuropil import ArgumentError, DTypeError, FormatError, NeuropilError, ShapeError
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


def xfail(reason: str) -> pytest.MarkDecorator:
    """A defect in a module this audit does not own: expected to fail until fixed."""
    return pytest.mark.xfail(strict=True, reason=reason)


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


def expect(fn: Any, exc: type[BaseException] | tuple, *needles: str) -> BaseException:
    """``fn()`` raises ``exc`` whose message holds every needle (the argument's
    name, the expected and the found value)."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in the message: {msg!r}"
    return info.value


def check_result(res: dict, exc: str | None, needles: tuple[str, ...]) -> None:
    """A :func:`run_cases` result raised ``exc`` (a class name in its MRO)
    with every needle in its message (``exc=None``: the call succeeded)."""
    assert res["exc"] not in ("CRASH", "HANG", "NOT RUN"), f"{res['exc']}:\n{res['msg']}"
    assert "PanicException" not in res["mro"], res
    if exc is None:
        assert res["exc"] is None, res
        return
    assert exc in res["mro"], res
    for n in needles:
        assert n in res["msg"], f"{n!r} not in the message: {res['msg']!r}"


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
# (thunk, expected exception, needles): the needles are the argument's name
# (as "<name> must"), the expected and the found value.
def P(id_: str, fn: Any, exc: Any, *needles: str, marks: Any = ()) -> Any:
    return pytest.param(fn, exc, needles, id=id_, marks=marks)


QUANT_CASES = [
    P("w-str", lambda: quantize("abc"), DTypeError, "w must", "float32", "<U3"),
    P("w-None", lambda: quantize(None), DTypeError, "w must", "object"),
    P("w-ragged", lambda: quantize([[1.0] * 64, [1.0]]), DTypeError, "w must", "list"),
    P("w-object", lambda: quantize(W.astype(object)), DTypeError, "w must", "object"),
    P("w-complex", lambda: quantize(W.astype(np.complex64)), DTypeError, "w must", "complex64"),
    P("w-int64", lambda: quantize(W.astype(np.int64)), DTypeError, "w must", "int64"),
    P("w-uint8", lambda: quantize(W.astype(np.uint8)), DTypeError, "w must", "uint8"),
    P("w-bool", lambda: quantize(W > 0), DTypeError, "w must", "bool"),
    P("w-0d", lambda: quantize(np.float32(1)), ShapeError, "w must", "(rows, cols)", "()"),
    P("w-1d", lambda: quantize(W[0]), ShapeError, "w must", "(64,)"),
    P("w-3d", lambda: quantize(W[None]), ShapeError, "w must", "(1, 8, 64)"),
    P("w-0-rows", lambda: quantize(W[:0]), ShapeError, "w must", "empty", "(0, 64)"),
    P("w-0-cols", lambda: quantize(W[:, :0]), ShapeError, "w must", "empty", "(8, 0)"),
    P("w-nan", lambda: quantize(np.where(W > 1, np.nan, W)), ArgumentError, "w must", "NaN"),
    P("w-inf", lambda: quantize(np.where(W > 1, -np.inf, W)), ArgumentError, "w must", "-inf"),
    P("w-beyond-float16", lambda: quantize(W * 1e30), ArgumentError, "w must", "float32"),
    P("bits-bool", lambda: quantize(W, bits=True), ArgumentError, "bits must", "True"),
    P("bits-float", lambda: quantize(W, bits=4.0), ArgumentError, "bits must", "4.0"),
    P("bits-neg", lambda: quantize(W, bits=-1), ArgumentError, "bits must", "-1"),
    P("bits-5", lambda: quantize(W, bits=5), ArgumentError, "bits must", "2, 3, 4, 8", "5"),
    P("bits-2**62", lambda: quantize(W, bits=2**62), ArgumentError, "bits must", str(2**62)),
    P("group-0", lambda: quantize(W, group_size=0), ArgumentError, "group_size must", "0"),
    P("group-2**62", lambda: quantize(W, group_size=2**62), ArgumentError, "group_size must"),
    P("scheme-None", lambda: quantize(W, scheme=None), ArgumentError, "scheme must", "None"),
    P("q4_0-48-cols", lambda: quantize(W[:, :48], scheme="q4_0"), ArgumentError, "32", "48"),
    P("scale-f64", lambda: quantize(W, scale_dtype="float64"), ArgumentError, "scale_dtype must"),
    P("scale-None", lambda: quantize(W, scale_dtype=None), ArgumentError, "scale_dtype must"),
    P(
        "search-str",
        lambda: quantize(W, search="no"),
        ArgumentError,
        "search must",
        "'no'",
    ),
    P("matvec-str", lambda: qw().matvec("x"), DTypeError, "x must", "<U1"),
    P("matvec-None", lambda: qw().matvec(None), DTypeError, "x must", "object"),
    P("matvec-len", lambda: qw().matvec(X64[:63]), ShapeError, "x must", "(64,)", "(63,)"),
    P("matvec-0d", lambda: qw().matvec(np.float32(1)), ShapeError, "x must", "()"),
    P("matvec-3d", lambda: qw().matvec(X64[None, None]), ShapeError, "x must", "(1, 1, 64)"),
    P("matvec-int64", lambda: qw().matvec(X64.astype(np.int64)), DTypeError, "x must", "int64"),
    P("matvec-bool", lambda: qw().matvec(X64 > 0), DTypeError, "x must", "bool"),
    P(
        "matvec-complex",
        lambda: qw().matvec(X64.astype(np.complex128)),
        DTypeError,
        "x must",
        "complex128",
    ),
    P("matvec-object", lambda: qw().matvec(X64.astype(object)), DTypeError, "x must", "object"),
    P("matvec-nan", lambda: qw().matvec(X64 * np.nan), ArgumentError, "x must", "NaN"),
    P("matvec-level-name", lambda: qw().matvec(X64, level="sse"), ArgumentError, "level must"),
    P(
        "matvec-level-int",
        lambda: qw().matvec(X64, level=3),
        ArgumentError,
        "level must",
        "got 3",
    ),
    P("rows-str", lambda: qw().matvec_rows(X64, "a"), ArgumentError, "rows must", "<U1"),
    P("rows-float", lambda: qw().matvec_rows(X64, [1.0]), ArgumentError, "rows must", "float64"),
    P("rows-bool", lambda: qw().matvec_rows(X64, np.array([True])), ArgumentError, "rows must"),
    P("rows-None", lambda: qw().matvec_rows(X64, None), ArgumentError, "rows must", "object"),
    P("rows-neg", lambda: qw().matvec_rows(X64, [-1]), IndexError, "-1", "out of range"),
    P("rows-past-end", lambda: qw().matvec_rows(X64, [8]), IndexError, "8", "out of range"),
    P(
        "rows-uint64-2**63",
        lambda: qw().matvec_rows(X64, np.array([2**63], np.uint64)),
        IndexError,
        "index 9223372036854775808 ",
    ),
    P(
        "rows-2d",
        lambda: qw().matvec_rows(X64, [[1, 2], [3, 4]]),
        ShapeError,
        "rows must",
        "(2, 2)",
    ),
    P("rows-x-2d", lambda: qw().matvec_rows(XF[:2, :1].repeat(64, 1), [1]), ShapeError, "x must"),
    P(
        "gguf-short",
        lambda: QuantizedWeights.from_gguf(b"\0" * 10, "q4_0", (1, 32)),
        FormatError,
        "18 bytes",
        "10",
    ),
    P(
        "gguf-neg-shape",
        lambda: QuantizedWeights.from_gguf(b"\0" * 18, "q4_0", (-1, 32)),
        ArgumentError,
        "shape must",
        "-1",
    ),
    P(
        "gguf-huge-shape",
        lambda: QuantizedWeights.from_gguf(b"\0" * 18, "q4_0", (2**62, 2**62)),
        FormatError,
        "too large",
    ),
    P(
        "gguf-str",
        lambda: QuantizedWeights.from_gguf("abc", "q4_0", (1, 32)),
        DTypeError,
        "raw must",
        "<U3",
    ),
    P(
        "gguf-nan-scale",
        lambda: QuantizedWeights.from_gguf(
            np.frombuffer(np.float16(np.nan).tobytes() + b"\0" * 16, np.uint8), "q4_0", (1, 32)
        ),
        FormatError,
        "non-finite scale",
    ),
    P(
        "ctor-huge-shape",
        lambda: QuantizedWeights(qw().data, qw().scales, qw().mins, (2**62, 2**62), 4, 64, "asym"),
        ArgumentError,
        "shape must",
    ),
    P(
        "ctor-short-data",
        lambda: QuantizedWeights(qw().data[:3], qw().scales, qw().mins, (8, 64), 4, 64, "asym"),
        ShapeError,
        "data must",
        "(96,)",
    ),
    P(
        "ctor-data-f32",
        lambda: QuantizedWeights(
            qw().data.astype(np.float32), qw().scales, qw().mins, (8, 64), 4, 64, "asym"
        ),
        DTypeError,
        "data must",
        "float32",
    ),
    P(
        "ctor-mins-None",
        lambda: QuantizedWeights(qw().data, qw().scales, None, (8, 64), 4, 64, "asym"),
        ArgumentError,
        "mins must",
    ),
    P(
        "ctor-nan-scales",
        lambda: QuantizedWeights(
            qw().data, np.full_like(qw().scales, np.nan), qw().mins, (8, 64), 4, 64, "asym"
        ),
        ArgumentError,
        "scales must be finite",
        "nan at (0, 0)",
    ),
    P(
        "ctor-scales-wrong-2d-shape",
        lambda: QuantizedWeights(
            qw().data,
            qw().scales.reshape(1, -1),
            qw().mins.reshape(1, -1),
            (8, 64),
            4,
            64,
            "asym",
        ),
        ShapeError,
        "scales must",
        "(8, 1)",
        "(1, 8)",
    ),
    P("to_gguf-asym", lambda: qw().to_gguf(), ArgumentError, "scheme must", "asym"),
    P(
        "save_file-reserved",
        lambda: save_file("/nonexistent/x", {"__metadata__": W}),
        ArgumentError,
        "__metadata__",
    ),
    P("save_file-int-key", lambda: save_file("/nonexistent/x", {1: W}), ArgumentError, "keys must"),
]


@pytest.mark.parametrize(("fn", "exc", "needles"), QUANT_CASES)
def test_quant_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


FLYHASH_CASES = [
    P("dim-str", lambda: FlyHash("16"), ArgumentError, "input_dim must", "'16'"),
    P("dim-float", lambda: FlyHash(16.0), ArgumentError, "input_dim must", "16.0"),
    P("dim-bool", lambda: FlyHash(True), ArgumentError, "input_dim must", "True"),
    P("dim-0", lambda: FlyHash(0), ArgumentError, "input_dim must", ">= 1", "0"),
    P("dim-neg", lambda: FlyHash(-3), ArgumentError, "input_dim must", "-3"),
    P(
        "dim-2**62",
        lambda: FlyHash(2**62, seed=0),
        ArgumentError,
        "input_dim must be small enough for the sign projection to fit in 8 GiB "
        "(8589934592 bytes); got 4611686018427387904 (with expansion_ratio=13.0: ",
        "a projection of 3.456e37 bytes)",
    ),
    P("dim-2**70", lambda: FlyHash(2**70, seed=0), ArgumentError, "input_dim must", str(2**70)),
    P(
        "ratio-nan",
        lambda: FlyHash(16, float("nan"), seed=0),
        ArgumentError,
        "expansion_ratio must",
        "NaN",
    ),
    P(
        "ratio-inf",
        lambda: FlyHash(16, float("inf"), seed=0),
        ArgumentError,
        "expansion_ratio must",
    ),
    P("ratio-neg", lambda: FlyHash(16, -1.0, seed=0), ArgumentError, "expansion_ratio must", "-1"),
    P(
        "ratio-str",
        lambda: FlyHash(16, "13", seed=0),
        ArgumentError,
        "expansion_ratio must",
        "'13'",
    ),
    P(
        "ratio-huge-int",
        lambda: FlyHash(16, 10**400, seed=0),
        ArgumentError,
        "expansion_ratio must",
        "finite",
    ),
    P("ratio-1e300", lambda: FlyHash(16, 1e300, seed=0), ArgumentError, "8 GiB"),
    P(
        "fraction-nan",
        lambda: FlyHash(16, active_fraction=float("nan"), seed=0),
        ArgumentError,
        "active_fraction must",
        "NaN",
    ),
    P(
        "fraction-0",
        lambda: FlyHash(16, active_fraction=0, seed=0),
        ArgumentError,
        "active_fraction must",
        "(0, 1]",
    ),
    P(
        "fraction-1.5",
        lambda: FlyHash(16, active_fraction=1.5, seed=0),
        ArgumentError,
        "active_fraction must",
        "1.5",
    ),
    P(
        "fraction-tiny",
        lambda: FlyHash(16, active_fraction=1e-9, seed=0),
        ArgumentError,
        "active_fraction must",
        "active_bits = 0",
    ),
    P("seed-neg", lambda: FlyHash(16, seed=-1), ArgumentError, "seed must", "-1"),
    P("seed-2**64", lambda: FlyHash(16, seed=2**64), ArgumentError, "seed must", str(2**64)),
    P("seed-float", lambda: FlyHash(16, seed=1.0), ArgumentError, "seed must", "1.0"),
    P(
        "projection-bad",
        lambda: FlyHash(16, seed=0, projection="dense"),
        ArgumentError,
        "projection must",
        "'dense'",
    ),
    P(
        "projection-None",
        lambda: FlyHash(16, seed=0, projection=None),
        ArgumentError,
        "projection must",
        "None",
    ),
    # connectivity is read by sparse projections only, but a NaN is refused for
    # every projection (it used to be kept, saved and loaded)
    *[
        P(
            f"connectivity-{bad}-{proj}",
            lambda bad=bad, proj=proj: FlyHash(
                16, seed=0, projection=proj, connectivity=float(bad)
            ),
            ArgumentError,
            "connectivity must",
            "(0, 1]",
        )
        for bad in ("nan", "inf", "0", "2")
        for proj in ("sign", "sparse", "seeded")
    ],
    P(
        "connectivity-tiny",
        lambda: FlyHash(16, seed=0, projection="sparse", connectivity=1e-9),
        ArgumentError,
        "connectivity must",
        "0 connections",
    ),
    P(
        "sparse-dim-70000",
        lambda: FlyHash(70000, 1.0, seed=0, projection="sparse", connectivity=0.01),
        ArgumentError,
        "input_dim must",
        "65535",
    ),
    P("binary-str", lambda: FlyHash(16, seed=0, binary="yes"), ArgumentError, "binary must"),
    P("binary-sign", lambda: FlyHash(16, seed=0, binary=True), ArgumentError, "binary must"),
]
for _m in ("encode", "activations", "encode_indices", "hash"):
    FLYHASH_CASES += [
        P(f"{_m}-str", lambda m=_m: getattr(fh(), m)("abc"), DTypeError, "x must", "str"),
        P(f"{_m}-None", lambda m=_m: getattr(fh(), m)(None), DTypeError, "x must", "NoneType"),
        P(
            f"{_m}-ragged",
            lambda m=_m: getattr(fh(), m)([[0.5] * 16, [1.0]]),
            ShapeError,
            "x must",
            "ragged",
        ),
        P(
            f"{_m}-object",
            lambda m=_m: getattr(fh(), m)(XFH.astype(object)),
            DTypeError,
            "x must",
            "object",
        ),
        P(
            f"{_m}-complex",
            lambda m=_m: getattr(fh(), m)(XFH.astype(np.complex64)),
            DTypeError,
            "x must",
            "complex64",
        ),
        P(
            f"{_m}-int64",
            lambda m=_m: getattr(fh(), m)(XFH.astype(np.int64)),
            DTypeError,
            "x must",
            "int64",
        ),
        P(
            f"{_m}-uint8",
            lambda m=_m: getattr(fh(), m)(XFH.astype(np.uint8)),
            DTypeError,
            "x must",
            "uint8",
        ),
        P(f"{_m}-bool", lambda m=_m: getattr(fh(), m)(XFH > 0), DTypeError, "x must", "bool"),
        P(f"{_m}-0d", lambda m=_m: getattr(fh(), m)(np.float32(1)), ShapeError, "x must", "()"),
        P(f"{_m}-3d", lambda m=_m: getattr(fh(), m)(XFH[None]), ShapeError, "x must", "(1, 5, 16)"),
        P(
            f"{_m}-width",
            lambda m=_m: getattr(fh(), m)(XFH[:, :15]),
            ShapeError,
            "x must",
            "(n, 16)",
            "(5, 15)",
        ),
        P(
            f"{_m}-1d-width",
            lambda m=_m: getattr(fh(), m)(XFH[0, :15]),
            ShapeError,
            "x must",
            "(15,)",
        ),
        P(f"{_m}-0-cols", lambda m=_m: getattr(fh(), m)(XFH[:, :0]), ShapeError, "x must"),
        P(f"{_m}-nan", lambda m=_m: getattr(fh(), m)(XFH * np.nan), ArgumentError, "x must", "NaN"),
        P(f"{_m}-inf", lambda m=_m: getattr(fh(), m)(XFH * np.inf), ArgumentError, "x must"),
        P(
            f"{_m}-level-name",
            lambda m=_m: getattr(fh(), m)(XFH, level="sse"),
            ArgumentError,
            "level must",
            "sse",
        ),
        P(
            f"{_m}-level-int",
            lambda m=_m: getattr(fh(), m)(XFH, level=1),
            ArgumentError,
            "level must",
            "1",
        ),
    ]

BINARY_INDEX_CASES = [
    P("nbits-str", lambda: BinaryIndex("16"), ArgumentError, "nbits must", "'16'"),
    P("nbits-0", lambda: BinaryIndex(0), ArgumentError, "nbits must", "0"),
    P("nbits-float", lambda: BinaryIndex(16.0), ArgumentError, "nbits must", "16.0"),
    P("nbits-2**62", lambda: BinaryIndex(2**62), ArgumentError, "nbits must", "2^30"),
    P("nbits-2**70", lambda: BinaryIndex(2**70), ArgumentError, "nbits must", str(2**70)),
    P(
        "add-float",
        lambda: bix().add(CODES.astype(np.float32)),
        DTypeError,
        "codes must",
        "uint8",
        "float32",
    ),
    P("add-int8", lambda: bix().add(CODES.astype(np.int8)), DTypeError, "codes must", "int8"),
    P("add-bool", lambda: bix().add(CODES > 0), DTypeError, "codes must", "bool"),
    P("add-str", lambda: bix().add("ab"), DTypeError, "codes must", "str"),
    P("add-None", lambda: bix().add(None), DTypeError, "codes must", "NoneType"),
    P("add-3d", lambda: bix().add(CODES[None]), ShapeError, "codes must", "(1, 6, 2)"),
    P("add-width", lambda: bix().add(CODES[:, :1]), ShapeError, "codes must", "(n, 2)", "(6, 1)"),
    P("add-ids-neg", lambda: bix().add(CODES, ids=[-1] * 6), ArgumentError, "ids must", "-1"),
    P(
        "add-ids-float",
        lambda: bix().add(CODES, ids=np.arange(6.0)),
        DTypeError,
        "ids must",
        "float64",
    ),
    P("add-ids-len", lambda: bix().add(CODES, ids=[1, 2]), ShapeError, "ids must", "(6,)", "(2,)"),
    P("add-ids-2d", lambda: bix().add(CODES, ids=[list(range(6))]), ShapeError, "ids must"),
    P(
        "add-ids-uint64-2**63",
        lambda: bix().add(CODES, ids=np.full(6, 2**63, np.uint64)),
        ArgumentError,
        "ids must",
        "9223372036854775808",
    ),
    P(
        "add-ids-int64-max",
        lambda: bix().add(CODES, ids=np.full(6, 2**63 - 1)),
        ArgumentError,
        "ids must",
    ),
    P("add-ids-bool", lambda: bix().add(CODES, ids=np.ones(6, bool)), DTypeError, "ids must"),
    P("add-ids-scalar", lambda: bix().add(CODES[:1], ids=3), ShapeError, "ids must", "()"),
    P(
        "add-bits-past-nbits",
        lambda: BinaryIndex(12).add(np.full((1, 2), 255, np.uint8)),
        ArgumentError,
        "codes must",
        "bit 12",
    ),
    P("k-0", lambda: bix().search(CODES, 0), ArgumentError, "k must", "0"),
    P("k-neg", lambda: bix().search(CODES, -1), ArgumentError, "k must", "-1"),
    P("k-float", lambda: bix().search(CODES, 2.0), ArgumentError, "k must", "2.0"),
    P("k-bool", lambda: bix().search(CODES, True), ArgumentError, "k must", "True"),
    P("k-2**62", lambda: bix().search(CODES, 2**62), ArgumentError, "k must", "8 GiB"),
    P("k-2**70", lambda: bix().search(CODES, 2**70), ArgumentError, "k must", str(2**70)),
    P(
        "metric-bad",
        lambda: bix().search(CODES, 3, metric="l2"),
        ArgumentError,
        "metric must",
        "l2",
    ),
    P(
        "metric-None",
        lambda: bix().search(CODES, 3, metric=None),
        ArgumentError,
        "metric must",
        "None",
    ),
    P(
        "queries-float",
        lambda: bix().search(CODES.astype(np.float32), 3),
        DTypeError,
        "queries must",
        "float32",
    ),
    P("radius-neg", lambda: bix().range_search(CODES, -1), ArgumentError, "max_distance must"),
    P(
        "radius-2**40",
        lambda: bix().range_search(CODES, 2**40),
        ArgumentError,
        "max_distance must",
        str(2**40),
    ),
    P("radius-float", lambda: bix().range_search(CODES, 1.5), ArgumentError, "max_distance must"),
    P("remove-str", lambda: bix().remove("a"), DTypeError, "ids must", "<U1"),
    P("remove-float", lambda: bix().remove([1.0]), DTypeError, "ids must", "float64"),
    P("remove-None", lambda: bix().remove(None), DTypeError, "ids must", "object"),
    P("remove-bool", lambda: bix().remove(np.array([True])), DTypeError, "ids must", "bool"),
    P("remove-2d", lambda: bix().remove([[1, 2]]), ShapeError, "ids must", "(1, 2)"),
    P("remove-ragged", lambda: bix().remove([[1], [1, 2]]), ShapeError, "ids must", "ragged"),
]


@pytest.mark.parametrize(("fn", "exc", "needles"), FLYHASH_CASES + BINARY_INDEX_CASES)
def test_flyhash_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


def nc() -> NeuronCache:
    return NeuronCache(8, 3)


NEURON_CACHE_CASES = [
    P("n-str", lambda: NeuronCache("8"), ArgumentError, "num_neurons must", "'8'"),
    P("n-0", lambda: NeuronCache(0), ArgumentError, "num_neurons must", ">= 1", "0"),
    P("n-float", lambda: NeuronCache(8.0), ArgumentError, "num_neurons must", "8.0"),
    P("n-bool", lambda: NeuronCache(True), ArgumentError, "num_neurons must", "True"),
    P("n-2**40", lambda: NeuronCache(2**40), ArgumentError, "num_neurons must", "2^32"),
    P("n-2**70", lambda: NeuronCache(2**70), ArgumentError, "num_neurons must", str(2**70)),
    P("capacity-above-n", lambda: NeuronCache(8, 9), ArgumentError, "capacity must", "8", "9"),
    P("capacity-neg", lambda: NeuronCache(8, -1), ArgumentError, "capacity must", "-1"),
    P("capacity-float", lambda: NeuronCache(8, 2.0), ArgumentError, "capacity must", "2.0"),
    P(
        "capacity-bytes-no-bpn",
        lambda: NeuronCache(8, capacity_bytes=10),
        ArgumentError,
        "bytes_per_neuron",
    ),
    P(
        "bytes-per-neuron-2**70",
        lambda: NeuronCache(8, bytes_per_neuron=2**70),
        ArgumentError,
        "bytes_per_neuron must",
        str(2**70),
    ),
    P("policy-bad", lambda: NeuronCache(8, policy="lru"), ArgumentError, "policy must", "'lru'"),
    P("policy-list", lambda: NeuronCache(8, policy=[]), ArgumentError, "policy must", "[]"),
    P("decay-nan", lambda: NeuronCache(8, decay=float("nan")), ArgumentError, "decay must", "nan"),
    P("decay-0", lambda: NeuronCache(8, decay=0.0), ArgumentError, "decay must", "(0, 1]"),
    P("decay-2", lambda: NeuronCache(8, decay=2), ArgumentError, "decay must", "2"),
    P("decay-str", lambda: NeuronCache(8, decay="0.5"), ArgumentError, "decay must", "'0.5'"),
    P(
        "decay-underflows-float32",
        lambda: NeuronCache(8, decay=1e-50),
        ArgumentError,
        "decay must",
        "1e-50",
    ),
    P(
        "window-0",
        lambda: NeuronCache(8, policy="window", window=0),
        ArgumentError,
        "window must",
        "0",
    ),
    P("window-missing", lambda: NeuronCache(8, policy="window"), ArgumentError, "window must"),
    P(
        "window-2**70",
        lambda: NeuronCache(8, policy="window", window=2**70),
        ArgumentError,
        "window must",
        str(2**70),
    ),
    P(
        "hysteresis-nan",
        lambda: NeuronCache(8, hysteresis=float("nan")),
        ArgumentError,
        "hysteresis must",
        "nan",
    ),
    P("hysteresis-neg", lambda: NeuronCache(8, hysteresis=-1), ArgumentError, "hysteresis must"),
    P(
        "hysteresis-str",
        lambda: NeuronCache(8, hysteresis="x"),
        ArgumentError,
        "hysteresis must",
        "'x'",
    ),
    P(
        "hysteresis-None",
        lambda: NeuronCache(8, hysteresis=None),
        ArgumentError,
        "hysteresis must",
        "None",
    ),
    # 1e300 is finite, but inf as the core's float32: the message shows what was passed
    P(
        "hysteresis-1e300",
        lambda: NeuronCache(8, hysteresis=1e300),
        ArgumentError,
        "hysteresis must",
        "1e+300",
    ),
    P(
        "reclassify-neg",
        lambda: NeuronCache(8, reclassify_every=-1),
        ArgumentError,
        "reclassify_every must",
        "-1",
    ),
    P(
        "reclassify-2**64",
        lambda: NeuronCache(8, reclassify_every=2**64),
        ArgumentError,
        "reclassify_every must",
        str(2**64),
    ),
    P("record-str", lambda: nc().record("ab"), DTypeError, "active must", "<U2"),
    P("record-None", lambda: nc().record(None), DTypeError, "active must", "object"),
    P("record-float", lambda: nc().record([1.0]), DTypeError, "active must", "float64"),
    P("record-complex", lambda: nc().record(np.ones(2, np.complex64)), DTypeError, "active must"),
    P("record-neg", lambda: nc().record([-1]), IndexError, "-1", "out of range"),
    P("record-past-end", lambda: nc().record([8]), IndexError, "8", "out of range"),
    P("record-int8-neg", lambda: nc().record(np.array([-3], np.int8)), IndexError, "-3"),
    P(
        "record-uint64-max",
        lambda: nc().record(np.array([2**64 - 1], np.uint64)),
        IndexError,
        "18446744073709551615",
    ),
    P("record-2d-ids", lambda: nc().record([[1, 2]]), ShapeError, "ids must", "(1, 2)"),
    P("record-0d", lambda: nc().record(3), ShapeError, "ids must", "()"),
    P("record-ragged", lambda: nc().record([[1], [1, 2]]), ShapeError, "active must", "ragged"),
    P(
        "record-mask-width",
        lambda: nc().record(np.ones(7, bool)),
        ShapeError,
        "active mask must",
        "(7,)",
    ),
    P(
        "record-mask-3d",
        lambda: nc().record(np.ones((1, 2, 8), bool)),
        ShapeError,
        "active mask must",
    ),
    P("set_hot-repeated", lambda: nc().set_hot([1, 1]), ArgumentError, "hot must", "1 repeated"),
    P("set_hot-too-many", lambda: nc().set_hot([1, 2, 3, 4]), ArgumentError, "hot must", "4"),
    P("set_hot-neg", lambda: nc().set_hot([-1]), IndexError, "-1"),
    P("set_hot-past-end", lambda: nc().set_hot([8]), IndexError, "8"),
    P("set_hot-float", lambda: nc().set_hot([1.5]), DTypeError, "ids must", "float64"),
    P("set_hot-bool", lambda: nc().set_hot(np.array([True])), DTypeError, "ids must", "bool"),
    P("set_hot-2d", lambda: nc().set_hot([[1, 2]]), ShapeError, "ids must", "(1, 2)"),
    P("frequency-str", lambda: nc().activation_frequency("a"), ArgumentError, "neuron must"),
    P("frequency-neg", lambda: nc().activation_frequency(-1), IndexError, "-1"),
    P("frequency-2**70", lambda: nc().activation_frequency(2**70), IndexError, str(2**70)),
]


def ffn(cls: type = SparseFFN, **kw: Any) -> Any:
    return cls(GATE, UP, DOWN, **kw)


FFN_CASES: list[Any] = []
for _c in (SparseFFN, InputSparseFFN):
    _n = _c.__name__
    FFN_CASES += [
        P(f"{_n}-gate-str", lambda c=_c: c("a", UP, DOWN), DTypeError, "gate must", "<U1"),
        P(f"{_n}-up-None", lambda c=_c: c(GATE, None, DOWN), DTypeError, "up must", "object"),
        P(
            f"{_n}-gate-int64",
            lambda c=_c: c(GATE.astype(np.int64), UP, DOWN),
            DTypeError,
            "gate must",
            "int64",
        ),
        P(f"{_n}-gate-bool", lambda c=_c: c(GATE > 0, UP, DOWN), DTypeError, "gate must", "bool"),
        P(
            f"{_n}-gate-complex",
            lambda c=_c: c(GATE + 0j, UP, DOWN),
            DTypeError,
            "gate must",
            "complex",
        ),
        P(
            f"{_n}-gate-nan",
            lambda c=_c: c(GATE * np.nan, UP, DOWN),
            ArgumentError,
            "gate must",
            "NaN",
        ),
        P(f"{_n}-down-inf", lambda c=_c: c(GATE, UP, DOWN * np.inf), ArgumentError, "down must"),
        P(
            f"{_n}-gate-shape",
            lambda c=_c: c(GATE[:, :7], UP, DOWN),
            ShapeError,
            "gate must",
            "(16, 8)",
            "(16, 7)",
        ),
        # a transposed down holds as many values: it must be refused, not read
        # in the wrong layout (InputSparseFFN did, giving wrong answers)
        P(
            f"{_n}-down-transposed",
            lambda c=_c: c(GATE, UP, DOWN.T),
            ShapeError,
            "down must",
            "(8, 16)",
            "(16, 8)",
        ),
        P(f"{_n}-gate-3d", lambda c=_c: c(GATE[None], UP, DOWN), ShapeError, "gate must"),
        P(
            f"{_n}-0-neurons",
            lambda c=_c: c(GATE[:0], UP[:0], DOWN[:, :0]),
            ShapeError,
            "up must",
            "(0, 8)",
        ),
        P(
            f"{_n}-activation-bad",
            lambda c=_c: ffn(c, activation="tanh"),
            ArgumentError,
            "activation must",
            "tanh",
        ),
        P(
            f"{_n}-activation-None",
            lambda c=_c: ffn(c, activation=None),
            ArgumentError,
            "activation must",
            "None",
        ),
        P(f"{_n}-bits-3", lambda c=_c: ffn(c, bits=3), ArgumentError, "bits must", "3"),
        P(f"{_n}-bits-float", lambda c=_c: ffn(c, bits=4.0), ArgumentError, "bits must", "4.0"),
        P(f"{_n}-bits-bool", lambda c=_c: ffn(c, bits=True), ArgumentError, "bits must", "True"),
        P(f"{_n}-dtype", lambda c=_c: ffn(c, dtype="bfloat16"), ArgumentError, "dtype must"),
        P(
            f"{_n}-up_bias-gated",
            lambda c=_c: ffn(c, up_bias=np.zeros(H, np.float32)),
            ArgumentError,
            "up_bias must",
        ),
        P(
            f"{_n}-up_bias-len",
            lambda c=_c: c(None, UP, DOWN, up_bias=np.zeros(H + 1)),
            ShapeError,
            "up_bias must",
            "(17,)",
        ),
        P(
            f"{_n}-down_bias-str",
            lambda c=_c: ffn(c, down_bias="x"),
            DTypeError,
            "down_bias must",
            "<U1",
        ),
        P(
            f"{_n}-down_bias-nan",
            lambda c=_c: ffn(c, down_bias=np.full(D, np.nan)),
            ArgumentError,
            "down_bias must",
        ),
        P(f"{_n}-x-str", lambda c=_c: ffn(c)("a"), DTypeError, "x must", "<U1"),
        P(f"{_n}-x-None", lambda c=_c: ffn(c)(None), DTypeError, "x must", "object"),
        P(f"{_n}-x-ragged", lambda c=_c: ffn(c)([[1.0] * 8, [1.0]]), ShapeError, "ragged"),
        P(f"{_n}-x-int64", lambda c=_c: ffn(c)(XF.astype(np.int64)), DTypeError, "x must", "int64"),
        P(f"{_n}-x-bool", lambda c=_c: ffn(c)(XF > 0), DTypeError, "x must", "bool"),
        P(f"{_n}-x-0d", lambda c=_c: ffn(c)(np.float32(1)), ShapeError, "x must", "()"),
        P(f"{_n}-x-3d", lambda c=_c: ffn(c)(XF[None]), ShapeError, "x must", "(1, 3, 8)"),
        P(f"{_n}-x-width", lambda c=_c: ffn(c)(XF[:, :7]), ShapeError, "x must", "(3, 7)"),
        P(f"{_n}-x-1d-width", lambda c=_c: ffn(c)(XF[0, :7]), ShapeError, "x must", "(7,)"),
        P(f"{_n}-x-nan", lambda c=_c: ffn(c)(XF * np.nan), ArgumentError, "x must", "NaN"),
        P(
            f"{_n}-sparsity-nan",
            lambda c=_c: ffn(c).calibrate(XF, float("nan")),
            ArgumentError,
            "sparsity must",
            "nan",
        ),
        P(
            f"{_n}-sparsity-1",
            lambda c=_c: ffn(c).calibrate(XF, 1.0),
            ArgumentError,
            "sparsity must",
            "1.0",
        ),
        P(
            f"{_n}-sparsity-str",
            lambda c=_c: ffn(c).calibrate(XF, "0.5"),
            ArgumentError,
            "sparsity must",
            "'0.5'",
        ),
        P(
            f"{_n}-samples-nan",
            lambda c=_c: ffn(c).calibrate(XF * np.nan, 0.5),
            ArgumentError,
            "samples must",
        ),
        P(
            f"{_n}-samples-empty",
            lambda c=_c: ffn(c).calibrate(XF[:0], 0.5),
            ShapeError,
            "samples must",
            "(0, 8)",
        ),
        P(
            f"{_n}-samples-int",
            lambda c=_c: ffn(c).calibrate(XF.astype(int), 0.5),
            DTypeError,
            "samples must",
        ),
    ]
FFN_CASES += [
    P(
        "SparseFFN-hot_capacity-neg",
        lambda: ffn(hot_capacity=-1),
        ArgumentError,
        "hot_capacity must",
    ),
    P(
        "SparseFFN-hot_capacity-above-h",
        lambda: ffn(hot_capacity=H + 1),
        ArgumentError,
        "hot_capacity must",
        "17",
    ),
    P(
        "SparseFFN-threshold-nan",
        lambda: ffn(threshold=float("nan")),
        ArgumentError,
        "threshold must",
        "nan",
    ),
    P(
        "SparseFFN-threshold-str",
        lambda: ffn(threshold="a"),
        ArgumentError,
        "threshold must",
        "'a'",
    ),
    P("SparseFFN-top_k-0", lambda: ffn(top_k=0), ArgumentError, "top_k must", "0"),
    P("SparseFFN-top_k-above-h", lambda: ffn(top_k=H + 1), ArgumentError, "top_k must", "17"),
    P("SparseFFN-top_k-float", lambda: ffn(top_k=2.0), ArgumentError, "top_k must", "2.0"),
    # the setters check as the constructor does (they used to store anything:
    # int(2.7) kept 2, a negative k reached the core as 0)
    P(
        "SparseFFN-set-threshold-nan",
        lambda: setattr(ffn(), "threshold", float("nan")),
        ArgumentError,
        "threshold must",
        "nan",
    ),
    P(
        "SparseFFN-set-threshold-str",
        lambda: setattr(ffn(), "threshold", "a"),
        ArgumentError,
        "threshold must",
        "'a'",
    ),
    P(
        "SparseFFN-set-top_k-2.7",
        lambda: setattr(ffn(), "top_k", 2.7),
        ArgumentError,
        "top_k must",
        "2.7",
    ),
    P(
        "SparseFFN-set-top_k-neg",
        lambda: setattr(ffn(), "top_k", -1),
        ArgumentError,
        "top_k must",
        "-1",
    ),
    P(
        "SparseFFN-set-top_k-2**70",
        lambda: setattr(ffn(), "top_k", 2**70),
        ArgumentError,
        "top_k must",
        str(2**70),
    ),
    P("SparseFFN-set_hot-repeated", lambda: ffn().set_hot([1, 1]), ArgumentError, "hot must"),
    P("SparseFFN-set_hot-neg", lambda: ffn().set_hot([-1]), ArgumentError, "ids must", "-1"),
    P(
        "SparseFFN-set_hot-float",
        lambda: ffn().set_hot([1.5]),
        ArgumentError,
        "ids must",
        "float64",
    ),
    P("SparseFFN-set_hot-2d", lambda: ffn().set_hot([[1, 2]]), ShapeError, "ids must"),
    P("SparseFFN-set_hot-past-end", lambda: ffn().set_hot([H]), IndexError, "16"),
    P(
        "InputSparseFFN-thresholds-nan",
        lambda: ffn(InputSparseFFN, thresholds=(np.nan, None)),
        ArgumentError,
        "t_in must",
        "nan",
    ),
    P(
        "InputSparseFFN-thresholds-str",
        lambda: ffn(InputSparseFFN, thresholds=(None, "a")),
        ArgumentError,
        "t_hidden must",
        "'a'",
    ),
    P(
        "InputSparseFFN-thresholds-one",
        lambda: ffn(InputSparseFFN, thresholds=(1.0,)),
        ArgumentError,
        "thresholds must",
        "(1.0,)",
    ),
    P(
        "InputSparseFFN-thresholds-scalar",
        lambda: ffn(InputSparseFFN, thresholds=1.0),
        ArgumentError,
        "thresholds must",
        "1.0",
    ),
    P(
        "InputSparseFFN-set-t_in-neg",
        lambda: setattr(ffn(InputSparseFFN), "t_in", -1),
        ArgumentError,
        "t_in must",
        "-1",
    ),
    P(
        "InputSparseFFN-hidden-t_in-str",
        lambda: ffn(InputSparseFFN).hidden(XF, "a"),
        ArgumentError,
        "t_in must",
        "'a'",
    ),
    P(
        "InputSparseFFN-int4-odd",
        lambda: InputSparseFFN(GATE[:15], UP[:15], DOWN[:, :15], bits=4),
        ArgumentError,
        "divisible by 2",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "needles"), NEURON_CACHE_CASES + FFN_CASES)
def test_neurons_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


RANGE_CASES = [
    P("keys-str", lambda: RangeIndex("a"), DTypeError, "keys must", "<U1"),
    P("keys-None", lambda: RangeIndex(None), DTypeError, "keys must", "object"),
    P("keys-ragged", lambda: RangeIndex([[1.0], [1.0, 2.0]]), ShapeError, "keys must", "ragged"),
    P("keys-int64", lambda: RangeIndex(KEYS.astype(np.int64)), DTypeError, "keys must", "int64"),
    P("keys-bool", lambda: RangeIndex(KEYS > 0), DTypeError, "keys must", "bool"),
    P("keys-complex", lambda: RangeIndex(KEYS + 0j), DTypeError, "keys must", "complex"),
    P("keys-0d", lambda: RangeIndex(np.float32(1)), ShapeError, "keys must", "()"),
    P("keys-1d", lambda: RangeIndex(KEYS[0]), ShapeError, "keys must", "(8,)"),
    P("keys-0-rows", lambda: RangeIndex(KEYS[:0]), ShapeError, "keys must", "(0, 8)"),
    P("keys-0-cols", lambda: RangeIndex(KEYS[:, :0]), ShapeError, "keys must", "(100, 0)"),
    P("keys-nan", lambda: RangeIndex(KEYS * np.nan), ArgumentError, "keys must", "NaN"),
    P("method-bad", lambda: RangeIndex(KEYS, "hnsw"), ArgumentError, "method must", "'hnsw'"),
    P("method-None", lambda: RangeIndex(KEYS, None), ArgumentError, "method must", "None"),
    P("leaf-0", lambda: RangeIndex(KEYS, leaf=0), ArgumentError, "leaf must", "0"),
    P("leaf-2**64", lambda: RangeIndex(KEYS, leaf=2**64), ArgumentError, "leaf must"),
    P("leaf-float", lambda: RangeIndex(KEYS, leaf=64.0), ArgumentError, "leaf must", "64.0"),
    P(
        "branching-1",
        lambda: RangeIndex(KEYS, "kmeans", branching=1),
        ArgumentError,
        "branching must",
    ),
    P(
        "rebuild-nan",
        lambda: RangeIndex(KEYS, rebuild_fraction=float("nan")),
        ArgumentError,
        "rebuild_fraction must",
        "NaN",
    ),
    P(
        "rebuild-neg",
        lambda: RangeIndex(KEYS, rebuild_fraction=-1),
        ArgumentError,
        "rebuild_fraction must",
    ),
    *[
        P(
            f"rebuild-{bad!r}",
            lambda bad=bad: RangeIndex(KEYS, rebuild_fraction=bad),
            ArgumentError,
            "rebuild_fraction must",
        )
        for bad in ("a", None)
    ],
    P("seed-neg", lambda: RangeIndex(KEYS, seed=-1), ArgumentError, "seed must", "-1"),
    P(
        "thresholds-nan",
        lambda: rix().search(QUERIES, np.full(3, np.nan)),
        ArgumentError,
        "thresholds must",
        "NaN",
    ),
    P(
        "thresholds-len",
        lambda: rix().search(QUERIES, np.zeros(2)),
        ShapeError,
        "thresholds must",
        "(3,)",
        "(2,)",
    ),
    P(
        "thresholds-2d",
        lambda: rix().search(QUERIES, np.zeros((3, 1))),
        ShapeError,
        "thresholds must",
    ),
    P("thresholds-str", lambda: rix().search(QUERIES, "a"), DTypeError, "thresholds must"),
    P("queries-1d", lambda: rix().search(QUERIES[0], 0.0), ShapeError, "queries must", "(8,)"),
    P(
        "queries-width",
        lambda: rix().search(QUERIES[:, :7], np.zeros(3)),
        ShapeError,
        "queries must",
        "(3, 7)",
    ),
    P(
        "queries-nan",
        lambda: rix().search(QUERIES * np.nan, np.zeros(3)),
        ArgumentError,
        "queries must",
    ),
    P(
        "queries-int",
        lambda: rix().search(QUERIES.astype(int), np.zeros(3)),
        DTypeError,
        "queries must",
        "int64",
    ),
    P("topk-0", lambda: rix().topk(QUERIES, 0), ArgumentError, "k must", "0"),
    P("topk-past-n", lambda: rix().topk(QUERIES, 101), ArgumentError, "k must", "101"),
    P("topk-2**70", lambda: rix().topk(QUERIES, 2**70), ArgumentError, "k must", str(2**70)),
    P("topk-float", lambda: rix().topk(QUERIES, 2.0), ArgumentError, "k must", "2.0"),
    P("topk-str", lambda: rix().topk(QUERIES, "3"), ArgumentError, "k must", "'3'"),
    P("add-width", lambda: RangeIndex(KEYS).add(KEYS[:, :7]), ShapeError, "keys must", "(100, 7)"),
    P("add-nan", lambda: RangeIndex(KEYS).add(KEYS * np.nan), ArgumentError, "keys must"),
    P("add-1d", lambda: RangeIndex(KEYS).add(KEYS[0]), ShapeError, "keys must", "(8,)"),
]


@pytest.mark.parametrize(("fn", "exc", "needles"), RANGE_CASES)
def test_range_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


WINDOWS_CASES = [
    P("frames-str", lambda: SlidingWindows("a", 3), DTypeError, "frames must", "<U1"),
    P("frames-None", lambda: SlidingWindows(None, 3), DTypeError, "frames must", "object"),
    P(
        "frames-ragged",
        lambda: SlidingWindows([[1.0], [1.0, 2.0]], 3),
        ShapeError,
        "frames must",
        "ragged",
    ),
    P(
        "frames-complex",
        lambda: SlidingWindows(FRAMES + 0j, 3),
        DTypeError,
        "frames must",
        "complex",
    ),
    P(
        "frames-object",
        lambda: SlidingWindows(FRAMES.astype(object), 3),
        DTypeError,
        "frames must",
        "object",
    ),
    P(
        "frames-datetime",
        lambda: SlidingWindows(np.zeros((5, 2), "M8[s]"), 2),
        DTypeError,
        "frames must",
        "datetime64",
    ),
    P("frames-0d", lambda: SlidingWindows(np.float32(1), 3), ShapeError, "frames must", "()"),
    P("frames-1d", lambda: SlidingWindows(FRAMES[0], 3), ShapeError, "frames must", "(4,)"),
    P("frames-3d", lambda: SlidingWindows(FRAMES[None], 3), ShapeError, "frames must"),
    P("frames-0-rows", lambda: SlidingWindows(FRAMES[:0], 3), ShapeError, "frames must", "(0, 4)"),
    P("frames-0-cols", lambda: SlidingWindows(FRAMES[:, :0], 3), ShapeError, "frames must"),
    P("window-0", lambda: SlidingWindows(FRAMES, 0), ArgumentError, "window must", "0"),
    P("window-float", lambda: SlidingWindows(FRAMES, 3.0), ArgumentError, "window must", "3.0"),
    P("window-bool", lambda: SlidingWindows(FRAMES, True), ArgumentError, "window must", "True"),
    P("window-str", lambda: SlidingWindows(FRAMES, "3"), ArgumentError, "window must", "'3'"),
    P("window-21", lambda: SlidingWindows(FRAMES, 21), ArgumentError, "window must", "21"),
    P("window-2**62", lambda: SlidingWindows(FRAMES, 2**62), ArgumentError, "window must"),
    P(
        "window-2**64",
        lambda: SlidingWindows(FRAMES, 2**64),
        ArgumentError,
        "window must",
        str(2**64),
    ),
    P("stride-0", lambda: SlidingWindows(FRAMES, 3, 0), ArgumentError, "stride must", "0"),
    P(
        "episodes-neg",
        lambda: SlidingWindows(FRAMES, 3, episodes=[-1, 21]),
        ArgumentError,
        "episodes must",
        "-1",
    ),
    P(
        "episodes-float",
        lambda: SlidingWindows(FRAMES, 3, episodes=[10.0, 10.0]),
        DTypeError,
        "episodes must",
        "float64",
    ),
    P(
        "episodes-sum",
        lambda: SlidingWindows(FRAMES, 3, episodes=[10, 11]),
        ArgumentError,
        "episodes must",
        "21",
    ),
    P(
        "episodes-2d",
        lambda: SlidingWindows(FRAMES, 3, episodes=[[10, 10]]),
        ShapeError,
        "episodes must",
    ),
    P(
        "episodes-empty",
        lambda: SlidingWindows(FRAMES, 3, episodes=[]),
        ArgumentError,
        "episodes must",
    ),
    P(
        "episodes-overflowing-sum",
        lambda: SlidingWindows(FRAMES, 3, episodes=np.array([2**62] * 4 + [20])),
        ArgumentError,
        "episodes must",
    ),
    P(
        "episodes-uint64-max",
        lambda: SlidingWindows(FRAMES, 3, episodes=np.array([2**64 - 1], np.uint64)),
        IndexError,
        "18446744073709551615",
    ),
    P(
        "targets-len",
        lambda: SlidingWindows(FRAMES, 3, targets={"a": np.zeros(19)}),
        ShapeError,
        "targets['a'] must",
        "(19,)",
    ),
    P(
        "targets-str",
        lambda: SlidingWindows(FRAMES, 3, targets={"a": "x"}),
        DTypeError,
        "targets['a'] must",
    ),
    P(
        "targets-ragged",
        lambda: SlidingWindows(FRAMES, 3, targets={"a": [[1], [1, 2]]}),
        ShapeError,
        "targets['a'] must",
        "ragged",
    ),
    P(
        "targets-key-int",
        lambda: SlidingWindows(FRAMES, 3, targets={1: np.zeros(20)}),
        ArgumentError,
        "targets keys must",
        "1",
    ),
    P(
        "targets-list",
        lambda: SlidingWindows(FRAMES, 3, targets=[("a", np.zeros(20))]),
        ArgumentError,
        "targets must",
        "list",
    ),
    P(
        "target_offset-too-negative",
        lambda: SlidingWindows(FRAMES, 3, targets={"a": np.zeros(20)}, target_offset=-3),
        ArgumentError,
        "target_offset['a'] must",
        "-3",
    ),
    P(
        "target_offset-float",
        lambda: SlidingWindows(FRAMES, 3, targets={"a": np.zeros(20)}, target_offset=1.0),
        ArgumentError,
        "target_offset['a'] must",
        "1.0",
    ),
    P(
        "target_offset-unknown",
        lambda: SlidingWindows(FRAMES, 3, targets={"a": np.zeros(20)}, target_offset={"b": 1}),
        ArgumentError,
        "target_offset",
        "'b'",
    ),
    P("take-past-end", lambda: sw().take([17]), IndexError, "17", "out of range"),
    P("take-before-start", lambda: sw().take([-18]), IndexError, "-18", "out of range"),
    P("take-float", lambda: sw().take([1.0]), DTypeError, "indices must", "float64"),
    P("take-str", lambda: sw().take("a"), DTypeError, "indices must", "<U1"),
    P("take-None", lambda: sw().take(None), DTypeError, "indices must", "object"),
    P("take-2d", lambda: sw().take([[1]]), ShapeError, "indices must", "(1, 1)"),
    P("take-bool", lambda: sw().take(np.array([True])), DTypeError, "indices must", "bool"),
    P(
        "take-uint64-max",
        lambda: sw().take(np.array([2**64 - 1], np.uint64)),
        IndexError,
        "18446744073709551615",
    ),
    P("take-scalar", lambda: sw().take(1), ShapeError, "indices must", "()"),
    P("getitem-past-end", lambda: sw()[17], IndexError, "17"),
    P("getitem-2**70", lambda: sw()[2**70], IndexError, str(2**70)),
    P("getitem-float", lambda: sw()[1.0], ArgumentError, "i must", "1.0"),
    P("getitem-list", lambda: sw()[[1, 2]], ArgumentError, "i must", "[1, 2]"),
    P("target-name", lambda: sw().target("b", 0), ArgumentError, "name must", "'b'"),
    P("batch_size-0", lambda: sw().batches(0), ArgumentError, "batch_size must", "0"),
    P("batch_size-float", lambda: sw().batches(2.0), ArgumentError, "batch_size must", "2.0"),
    P("seed-neg", lambda: sw().batches(2, seed=-1), ArgumentError, "seed must", "-1"),
    P("seed-2**64", lambda: sw().batches(2, seed=2**64), ArgumentError, "seed must"),
    P("rank-past-world", lambda: sw().batches(2, rank=1), ArgumentError, "rank must", "1"),
    P("world_size-0", lambda: sw().batches(2, world_size=0), ArgumentError, "world_size must"),
    P(
        "world_size-2**64",
        lambda: sw().batches(2, world_size=2**64),
        ArgumentError,
        "world_size must",
        str(2**64),
    ),
    P("epoch-2**64", lambda: sw().batches(2, epoch=2**64), ArgumentError, "epoch must", str(2**64)),
    P(
        "epoch_order-epoch-2**64",
        lambda: sw().epoch_order(epoch=2**64),
        ArgumentError,
        "epoch must",
    ),
    P("epoch_order-rank-neg", lambda: sw().epoch_order(rank=-1), ArgumentError, "rank must"),
    P("prefetch-neg", lambda: sw().batches(2, prefetch=-1), ArgumentError, "prefetch must", "-1"),
    P(
        "memory_plan-batch_size-neg",
        lambda: sw().memory_plan(batch_size=-1),
        ArgumentError,
        "batch_size must",
        "-1",
    ),
    P(
        "memory_plan-batch_size-str",
        lambda: sw().memory_plan(batch_size="a"),
        ArgumentError,
        "batch_size must",
        "'a'",
    ),
    P(
        "memory_plan-prefetch-neg",
        lambda: sw().memory_plan(prefetch=-5),
        ArgumentError,
        "prefetch must",
        "-5",
    ),
    P(
        "memory_plan-available-neg",
        lambda: sw().memory_plan(available=-5),
        ArgumentError,
        "available must",
        "-5",
    ),
    P(
        "memory_plan-available-str",
        lambda: sw().memory_plan(available="a"),
        ArgumentError,
        "available must",
        "'a'",
    ),
    P(
        "memory_plan-headroom-nan",
        lambda: sw().memory_plan(headroom=float("nan")),
        ArgumentError,
        "headroom must",
        "nan",
    ),
    P(
        "memory_plan-headroom-0",
        lambda: sw().memory_plan(headroom=0),
        ArgumentError,
        "headroom must",
        "0",
    ),
    P("materialize-chunk-0", lambda: sw().materialize(chunk=0), ArgumentError, "chunk must"),
    P(
        "materialize-available-nan",
        lambda: sw().materialize(available=float("nan")),
        ArgumentError,
        "available must",
        "nan",
    ),
]


@pytest.mark.parametrize(("fn", "exc", "needles"), WINDOWS_CASES)
def test_windows_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


# ------------------------------------------------------------------ torch inputs
def _torch():
    import torch

    return torch


def T(a: np.ndarray, **kw: Any) -> Any:
    """``a`` as a torch tensor (``requires_grad``, ``dtype`` ... as keywords)."""
    torch = _torch()
    grad = kw.pop("requires_grad", False)
    return torch.tensor(a, **kw).requires_grad_(grad)


TORCH_INPUT_CASES = [
    *[
        P(
            f"quant-{name}",
            fn,
            DTypeError,
            needle,
            marks=pytest.mark.filterwarnings("ignore:Casting complex values"),
        )
        for name, fn, needle in [
            ("matvec-int", lambda: qw().matvec(T(X64).long()), "x must"),
            ("matvec-bool", lambda: qw().matvec(T(X64) > 0), "x must"),
            ("matvec-complex", lambda: qw().matvec(T(X64).to(_torch().complex64)), "x must"),
            ("quantize-int", lambda: quantize(T(W).long()), "w must"),
        ]
    ],
    P("quant-matvec-width", lambda: qw().matvec(T(X64[:63])), ShapeError, "x must", "(63,)"),
    P("flyhash-int", lambda: fh().encode(T(XFH).long()), DTypeError, "x must", "int64"),
    P("flyhash-bool", lambda: fh().hash(T(XFH) > 0), DTypeError, "x must", "bool"),
    P(
        "flyhash-complex",
        lambda: fh().encode(T(XFH).to(_torch().complex64)),
        DTypeError,
        "x must",
        "complex64",
    ),
    P("flyhash-nan", lambda: fh().encode(T(XFH) * float("nan")), ArgumentError, "x must", "NaN"),
    P("flyhash-3d", lambda: fh().encode(T(XFH)[None]), ShapeError, "x must", "(1, 5, 16)"),
    P("flyhash-0d", lambda: fh().encode(T(np.float32(1))), ShapeError, "x must", "()"),
    P("binary-index-int", lambda: bix().add(T(CODES).long()), DTypeError, "codes must", "int64"),
    P("neurons-record-float", lambda: nc().record(T(np.ones(3))), DTypeError, "active must"),
    P("ffn-x-int", lambda: ffn()(T(XF).long()), DTypeError, "x must", "int64"),
    # a tensor that requires grad takes the torch ops: checked as the kernels check
    P(
        "ffn-grad-width",
        lambda: ffn()(T(XF[:, :7], requires_grad=True)),
        ShapeError,
        "x must",
        "(3, 7)",
    ),
    P(
        "input-sparse-grad-width",
        lambda: ffn(InputSparseFFN)(T(XF[:, :7], requires_grad=True)),
        ShapeError,
        "x must",
        "(3, 7)",
    ),
    P(
        "ffn-grad-complex",
        lambda: ffn()(T(XF, dtype=_torch().complex64, requires_grad=True)),
        DTypeError,
        "x must",
        "complex64",
    ),
    P("range-int-keys", lambda: RangeIndex(T(KEYS).long()), DTypeError, "keys must"),
    P(
        "windows-complex-target",
        lambda: SlidingWindows(
            T(FRAMES), 3, targets={"a": T(np.zeros(20), dtype=_torch().complex64)}
        ),
        DTypeError,
        "targets['a'] must",
        "complex64",
    ),
    P(
        "windows-str-target",
        lambda: SlidingWindows(T(FRAMES), 3, targets={"a": np.array(["a"] * 20)}),
        DTypeError,
        "targets['a'] must",
        "<U1",
    ),
    P(
        "windows-bf16-target-numpy-frames",
        lambda: SlidingWindows(FRAMES, 3, targets={"a": T(np.zeros(20)).bfloat16()}),
        DTypeError,
        "targets['a']",
        "bfloat16",
    ),
    P("windows-3d-frames", lambda: SlidingWindows(T(FRAMES)[None], 3), ShapeError, "frames must"),
    P(
        "windows-device-bad",
        lambda: sw().batches(2, device="tpu"),
        ArgumentError,
        "device must",
        "'tpu'",
    ),
    P(
        "windows-device-int-type",
        lambda: sw().batches(2, device=[1]),
        ArgumentError,
        "device must",
        "[1]",
    ),
]


@needs_torch
@pytest.mark.parametrize(("fn", "exc", "needles"), TORCH_INPUT_CASES)
def test_torch_inputs_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


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
    import neuropil.torch as nt

    return nt


TORCH_MODULE_CASES = [
    P(
        "from_linear-bits",
        lambda: _torch_mod().QuantizedLinear.from_linear(_linear(), bits=5),
        ArgumentError,
        "bits must",
        "5",
    ),
    P(
        "from_linear-conv",
        lambda: _torch_mod().QuantizedLinear.from_linear(_torch().nn.Conv1d(2, 2, 1)),
        ShapeError,
        "w must",
    ),
    P(
        "from_linear-nan-weight",
        lambda: _torch_mod().QuantizedLinear.from_linear(
            _linear().requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan")))
        ),
        ArgumentError,
        "w must",
        "NaN",
    ),
    P(
        "from_linear-str",
        lambda: _torch_mod().QuantizedLinear.from_linear("x"),
        ArgumentError,
        "linear must be an nn.Linear",
        "got str",
    ),
    P(
        "from_linear-nan-bias",
        lambda: _torch_mod().QuantizedLinear.from_linear(_linear(nan_bias=True)),
        ArgumentError,
        "bias must",
        "NaN",
    ),
    P("forward-int", lambda: _ql()(T(X64).long()), DTypeError, "x must", "int64"),
    P("forward-width", lambda: _ql()(T(X64[:63])), ShapeError, "x must", "(63,)"),
    P(
        "forward-0d",
        lambda: _ql()(T(np.float32(1))),
        ShapeError,
        "x must",
        "()",
    ),
    P(
        "forward-numpy",
        lambda: _ql()(X64),
        (DTypeError, ArgumentError),
        "x must",
        "ndarray",
    ),
    P(
        "quantize_model-skip-typo",
        lambda: _torch_mod().quantize_model(_mlp(), skip=["nope"]),
        ArgumentError,
        "skip pattern 'nope' must",
    ),
    P(
        "quantize_model-bits",
        lambda: _torch_mod().quantize_model(_mlp(), bits=7),
        ArgumentError,
        "bits must",
        "7",
    ),
    # (skip=None keeps no layer, as the default (): tests/test_quant.py)
    *[
        P(f"quantize_model-{name}", fn, (ArgumentError, DTypeError), *needles)
        for name, fn, needles in [
            ("str", lambda: _torch_mod().quantize_model("x"), ("model must", "str")),
            (
                "skip-int",
                lambda: _torch_mod().quantize_model(_mlp(), skip=[1]),
                ("skip", "must be strings", "got 1"),
            ),
            (
                "skip-not-iterable",
                lambda: _torch_mod().quantize_model(_mlp(), skip=5),
                ("skip must", "got 5"),
            ),
        ]
    ],
    P(
        "sparsify-nan",
        lambda: _torch_mod().sparsify_mlp(_mlp(), float("nan")),
        ArgumentError,
        "sparsity must",
        "nan",
    ),
    P(
        "sparsify-method",
        lambda: _torch_mod().sparsify_mlp(_mlp(), 0.5, method="x"),
        ArgumentError,
        "method must",
    ),
    *[
        P(
            f"sparsify-sparsity-{bad!r}",
            lambda bad=bad: _torch_mod().sparsify_mlp(_mlp(), bad),
            ArgumentError,
            "sparsity must",
        )
        for bad in ("a", None)
    ],
]


@needs_torch
@pytest.mark.parametrize(("fn", "exc", "needles"), TORCH_MODULE_CASES)
def test_torch_modules_bad_arguments(fn, exc, needles):
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
    expect(lambda: call(value()), ArgumentError, f"{name} must", found)


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
    from neuropil import hf

    return hf


def _cache(**kw: Any) -> Any:
    return _hf().SparseCache(_tiny_llama_config(), **kw)


HF_CASES = [
    P(
        "query-numpy",
        lambda: sda(_qkv()[0].numpy(), *_qkv()[1:], 0.3),
        DTypeError,
        "query must",
        "ndarray",
    ),
    P(
        "key-list",
        lambda: sda(_qkv()[0], _qkv()[1].tolist(), _qkv()[2], 0.3),
        DTypeError,
        "key must",
        "list",
    ),
    P(
        "query-int",
        lambda: sda(_qkv()[0].int(), *_qkv()[1:], 0.3),
        DTypeError,
        "query must",
        "int32",
    ),
    P("query-bool", lambda: sda(_qkv()[0] > 0, *_qkv()[1:], 0.3), DTypeError, "query must"),
    P(
        "value-complex",
        lambda: sda(*_qkv()[:2], _qkv()[2].to(_torch().complex64), 0.3),
        DTypeError,
        "value must",
        "complex64",
    ),
    P("query-3d", lambda: sda(_qkv()[0][0], *_qkv()[1:], 0.3), ShapeError, "query must"),
    P(
        "query-2-tokens",
        lambda: sda(_qkv()[0].expand(2, 4, 2, 8), *_qkv()[1:], 0.3),
        ShapeError,
        "query must",
        "(2, 4, 2, 8)",
    ),
    P(
        "heads-not-multiple",
        lambda: sda(_qkv()[0][:, :3], *_qkv()[1:], 0.3),
        ShapeError,
        "query heads must",
        "3",
    ),
    P(
        "kv-heads-0",
        lambda: sda(_qkv()[0], _qkv()[1][:, :0], _qkv()[2][:, :0], 0.3),
        ShapeError,
        "key must",
        "kv_heads >= 1",
    ),
    P(
        "keys-0",
        lambda: sda(_qkv()[0], _qkv()[1][:, :, :0], _qkv()[2][:, :, :0], 0.3),
        ShapeError,
        "key must",
        "n >= 1",
    ),
    P("value-shape", lambda: sda(*_qkv()[:2], _qkv()[2][..., :7], 0.3), ShapeError, "value must"),
    P("scaling-nan", lambda: sda(*_qkv(), float("nan")), ArgumentError, "scaling must", "nan"),
    P("scaling-str", lambda: sda(*_qkv(), "a"), ArgumentError, "scaling must", "'a'"),
    P(
        "strategy-bad",
        lambda: sda(*_qkv(), 0.3, strategy="all"),
        ArgumentError,
        "strategy must",
        "'all'",
    ),
    P("top_p-1", lambda: sda(*_qkv(), 0.3, top_p=1.0), ArgumentError, "top_p must", "1.0"),
    P("top_p-nan", lambda: sda(*_qkv(), 0.3, top_p=float("nan")), ArgumentError, "top_p must"),
    P(
        "top_k-0",
        lambda: sda(*_qkv(), 0.3, strategy="top_k", top_k=0),
        ArgumentError,
        "top_k must",
        "0",
    ),
    P(
        "top_k-float",
        lambda: sda(*_qkv(), 0.3, strategy="top_k", top_k=2.0),
        ArgumentError,
        "top_k must",
        "2.0",
    ),
    P(
        "threshold-None",
        lambda: sda(*_qkv(), 0.3, strategy="threshold"),
        ArgumentError,
        "threshold must",
        "None",
    ),
    P(
        "threshold-inf",
        lambda: sda(*_qkv(), 0.3, strategy="threshold", threshold=float("inf")),
        ArgumentError,
        "threshold must",
        "inf",
    ),
    P("sinks-neg", lambda: sda(*_qkv(), 0.3, sinks=-1), ArgumentError, "sinks must", "-1"),
    P("window-bool", lambda: sda(*_qkv(), 0.3, window=True), ArgumentError, "window must"),
    P(
        "mask-short",
        lambda: sda(*_qkv(), 0.3, attention_mask=_torch().ones(2, 1, 1, 5).bool()),
        ShapeError,
        "attention_mask must",
        "(2, 1, 1, 5)",
    ),
    P(
        "mask-batch",
        lambda: sda(*_qkv(), 0.3, attention_mask=_torch().ones(3, 1, 1, 10).bool()),
        ShapeError,
        "attention_mask must",
        "(3, 1, 1, 10)",
    ),
    P(
        "mask-2d",
        lambda: sda(*_qkv(), 0.3, attention_mask=_torch().ones(2, 10).bool()),
        ShapeError,
        "attention_mask must",
        "(2, 10)",
    ),
    P(
        "mask-int",
        lambda: sda(*_qkv(), 0.3, attention_mask=_torch().ones(2, 1, 1, 10).long()),
        DTypeError,
        "attention_mask must",
        "int64",
    ),
    P(
        "mask-numpy",
        lambda: sda(*_qkv(), 0.3, attention_mask=np.ones((2, 1, 1, 10), bool)),
        DTypeError,
        "attention_mask must",
        "ndarray",
    ),
    P("cache-strategy", lambda: _cache(strategy="all"), ArgumentError, "strategy must"),
    P("cache-top_p", lambda: _cache(top_p=0.0), ArgumentError, "top_p must", "0.0"),
    P("cache-top_k", lambda: _cache(strategy="top_k", top_k=-2), ArgumentError, "top_k must"),
    P(
        "cache-threshold",
        lambda: _cache(strategy="threshold", threshold=float("nan")),
        ArgumentError,
        "threshold must",
    ),
    P("cache-sinks", lambda: _cache(sinks=1.5), ArgumentError, "sinks must", "1.5"),
    P("cache-method", lambda: _cache(method="hnsw"), ArgumentError, "method must", "'hnsw'"),
    P(
        "cache-model",
        lambda: _hf().SparseCache(object()),
        NeuropilError,
        "SparseCache needs",
    ),
    P(
        "cache_kwargs-model",
        lambda: _hf().cache_kwargs(3, None),
        ArgumentError,
        "model must",
    ),
]


@needs_hf
@pytest.mark.parametrize(("fn", "exc", "needles"), HF_CASES)
def test_hf_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


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


def _membrane() -> Any:
    import neuropil.membrane as m

    return m


def bank() -> Any:
    return _membrane().MembraneBank(8, 2, 2)


def V(*shape: int, **kw: Any) -> Any:
    return _torch().rand(*(shape or (8, 2, 2)), generator=_torch().Generator().manual_seed(0), **kw)


MEMBRANE_CASES = [
    P("L-str", lambda: _membrane().MembraneBank("8", 2, 2), ArgumentError, "L must", "'8'"),
    P("L-0", lambda: _membrane().MembraneBank(0, 2, 2), ArgumentError, "L must", "0"),
    P("L-float", lambda: _membrane().MembraneBank(8.0, 2, 2), ArgumentError, "L must", "8.0"),
    P(
        "L-3-hadamard",
        lambda: _membrane().MembraneBank(3, 2, 2),
        ArgumentError,
        "L must",
        "power of two",
    ),
    # extents whose sizes overflow (torch's RuntimeError 'Storage size calculation
    # overflowed', numpy's ValueError 'array is too big' were raised): refused
    # before any allocation, the message giving the bytes needed
    *[
        P(f"huge-{name}", fn, (ArgumentError, ShapeError), needle, "bytes")
        for name, fn, needle in [
            ("H-W", lambda: _membrane().MembraneBank(8, 2**40, 2**40), "H must"),
            (
                "L-gaussian",
                lambda: _membrane().MembraneBank(2**62, 1, 1, codes="gaussian"),
                "L must",
            ),
        ]
    ],
    P(
        "codes-name",
        lambda: _membrane().MembraneBank(8, 2, 2, codes="walsh"),
        ArgumentError,
        "codes must",
        "'walsh'",
    ),
    P(
        "codes-None",
        lambda: _membrane().MembraneBank(8, 2, 2, codes=None),
        ArgumentError,
        "codes must",
        "NoneType",
    ),
    P(
        "codes-nan",
        lambda: _membrane().MembraneBank(8, 2, 2, codes=V(8, 8) * float("nan")),
        ArgumentError,
        "codes must",
    ),
    P(
        "codes-int",
        lambda: _membrane().MembraneBank(8, 2, 2, codes=_torch().eye(8, dtype=_torch().int64)),
        DTypeError,
        "codes must",
        "int64",
    ),
    P("K-0", lambda: _membrane().MembraneBank(8, 2, 2, K=0), ArgumentError, "K must", "0"),
    P(
        "readout",
        lambda: _membrane().MembraneBank(8, 2, 2, readout="x"),
        ArgumentError,
        "readout must",
    ),
    P(
        "persistence-nan",
        lambda: _membrane().MembraneBank(8, 2, 2, persistence=float("nan")),
        ArgumentError,
        "persistence must",
    ),
    P(
        "persistence-str",
        lambda: _membrane().MembraneBank(8, 2, 2, persistence="a"),
        ArgumentError,
        "persistence must",
        "'a'",
    ),
    P(
        "device",
        lambda: _membrane().MembraneBank(8, 2, 2, device="tpu"),
        ArgumentError,
        "device must",
        "'tpu'",
    ),
    P(
        "dtype-int",
        lambda: _membrane().MembraneBank(8, 2, 2, dtype=_torch().int64),
        DTypeError,
        "dtype must",
        "int64",
    ),
    P(
        "dtype-str",
        lambda: _membrane().MembraneBank(8, 2, 2, dtype="float32"),
        DTypeError,
        "dtype must",
    ),
    P("seed-neg", lambda: _membrane().MembraneBank(8, 2, 2, seed=-1), ArgumentError, "seed must"),
    P("store-list", lambda: bank().store([[1.0]]), ArgumentError, "values must", "list"),
    P("store-f64", lambda: bank().store(V().double()), DTypeError, "values must", "float64"),
    P("store-int", lambda: bank().store(V().long()), DTypeError, "values must", "int64"),
    P("store-nan", lambda: bank().store(V() * float("nan")), ArgumentError, "values must"),
    P("store-2d", lambda: bank().store(V(2, 2)), ShapeError, "values must", "(2, 2)"),
    P("store-hw", lambda: bank().store(V(8, 1, 2)), ShapeError, "values must", "(8, 1, 2)"),
    P("store-0", lambda: bank().store(V(0, 2, 2)), ShapeError, "values must"),
    P("store-9-keys", lambda: bank().store(V(9, 2, 2)), ShapeError, "values", "9"),
    P(
        "store-keys-past-K",
        lambda: bank().store(V(2, 2, 2), keys=[0, 8]),
        ArgumentError,
        "keys must",
        "8",
    ),
    P(
        "store-keys-neg",
        lambda: bank().store(V(2, 2, 2), keys=[0, -1]),
        ArgumentError,
        "keys must",
        "-1",
    ),
    P(
        "store-keys-float",
        lambda: bank().store(V(2, 2, 2), keys=[0.0, 1.0]),
        DTypeError,
        "keys must",
        "float64",
    ),
    P("store-keys-len", lambda: bank().store(V(2, 2, 2), keys=[0]), ShapeError, "keys must"),
    P(
        "store-keys-uint64-max",
        lambda: bank().store(V(1, 2, 2), keys=np.array([2**64 - 1], np.uint64)),
        ArgumentError,
        "keys must",
        "18446744073709551615",
    ),
    P(
        "store-alphas-nan",
        lambda: bank().store(V(), alphas=float("nan")),
        ArgumentError,
        "alphas must",
    ),
    P("store-alphas-str", lambda: bank().store(V(), alphas="x"), ArgumentError, "alphas must"),
    P(
        "store-alphas-shape",
        lambda: bank().store(V(), alphas=_torch().ones(3)),
        ShapeError,
        "alphas must",
    ),
    P("read-keys-past-K", lambda: bank().read([8]), ArgumentError, "keys must", "8"),
    P("read-keys-empty", lambda: bank().read([]), ShapeError, "keys must"),
    P("read-readout", lambda: bank().read(readout="x"), ArgumentError, "readout must"),
    P("decay-nan", lambda: bank().decay(float("nan")), ArgumentError, "lam must", "nan"),
    P("decay-0", lambda: bank().decay(0.0), ArgumentError, "lam must"),
    P("decay-str", lambda: bank().decay("0.5"), ArgumentError, "lam must", "'0.5'"),
    P("decay-steps-neg", lambda: bank().decay(0.5, -1), ArgumentError, "steps must", "-1"),
    P("grow-smaller", lambda: bank().grow(4), ArgumentError, "K must", "4"),
    P("psnr-shape", lambda: _membrane().psnr(V(), V(1, 2, 2)), ShapeError, "y must"),
    P("psnr-numpy", lambda: _membrane().psnr(np.ones(3), np.ones(3)), ArgumentError, "x must"),
    P(
        "psnr-range-nan",
        lambda: _membrane().psnr(V(), V(), data_range=float("nan")),
        ArgumentError,
        "data_range must",
    ),
    P("psnr-empty", lambda: _membrane().psnr(V(0, 2, 2), V(0, 2, 2)), ShapeError, "x must"),
    P("ssim-small", lambda: _membrane().ssim(V(1, 1), V(1, 1)), ShapeError, "x must"),
    P("coherence-1d", lambda: _membrane().coherence_stats(V(3)), ShapeError, "C must"),
    P(
        "hopfield-numpy",
        lambda: _membrane().HopfieldCleanup(np.ones((3, 2, 2))),
        ArgumentError,
        "patterns must",
    ),
    P(
        "hopfield-empty",
        lambda: _membrane().HopfieldCleanup(V(0, 2, 2)),
        ShapeError,
        "patterns must",
    ),
    P(
        "hopfield-nan",
        lambda: _membrane().HopfieldCleanup(V(3, 2, 2) * float("nan")),
        ArgumentError,
        "patterns must",
        "NaN",
    ),
    P(
        "adaptive-bank",
        lambda: _membrane().AdaptivePersistence("x"),
        ArgumentError,
        "bank must",
        "str",
    ),
]


@needs_torch
@pytest.mark.parametrize(("fn", "exc", "needles"), MEMBRANE_CASES)
def test_membrane_bad_arguments(fn, exc, needles):
    expect(fn, exc, *needles)


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

RISKY = {
    # label: (statement, expected exception class name or None, needles)
    "windows-headroom-str": ("sw.memory_plan(headroom='a')", "ArgumentError", ("headroom must",)),
    "windows-prefetch-2**62": (
        "assert sum(len(b['frames']) for b in sw.batches(2, prefetch=2**62)) == len(sw)",
        None,
        (),
    ),
    "windows-batch-2**62": (
        "assert [len(b['frames']) for b in sw.batches(2**62, prefetch=3)] == [len(sw)]",
        None,
        (),
    ),
    "windows-take-broadcast": ("sw.take(B((2**40,), np.int64))", "MemoryError", ()),
    "windows-frames-broadcast": ("SlidingWindows(B((2**40, 4)), 3)", "MemoryError", ()),
    "flyhash-dim-2**62": (
        "FlyHash(2**62, seed=0)",
        "ArgumentError",
        (
            "input_dim must be small enough for the sign projection to fit in 8 GiB",
            "(8589934592 bytes); got 4611686018427387904 (with expansion_ratio=13.0",
            "a projection of 3.456e37 bytes",
        ),
    ),
    "flyhash-ratio-1e9": ("FlyHash(64, 1e9, seed=0)", "ArgumentError", ("8 GiB",)),
    "flyhash-encode-broadcast": ("fh.encode(B((2**34, 16)))", "ArgumentError", ("x must", "8 GiB")),
    "flyhash-hash-broadcast": ("fh.hash(B((2**36, 16)))", "ArgumentError", ("x must", "8 GiB")),
    "binary-index-k-2**62": (
        "ix.search(np.zeros((1, 2), np.uint8), 2**62)",
        "ArgumentError",
        ("k must", "8 GiB"),
    ),
    "binary-index-nbits-2**62": ("BinaryIndex(2**62)", "ArgumentError", ("nbits must",)),
    "binary-index-broadcast-codes": ("ix.add(B((2**40, 2), np.uint8))", "MemoryError", ()),
    "binary-index-broadcast-queries": ("ix.search(B((2**40, 2), np.uint8), 1)", "MemoryError", ()),
    "quant-broadcast": ("quantize(B((2**40, 64)))", "MemoryError", ()),
    "quant-matvec-broadcast": (
        "quantize(np.ones((8, 64), np.float32)).matvec(B((2**40, 64)))",
        "MemoryError",
        (),
    ),
    "quant-gguf-huge": (
        "QuantizedWeights.from_gguf(b'\\\\0' * 18, 'q4_0', (2**62, 2**62))",
        "FormatError",
        ("too large",),
    ),
    "range-topk-2**62": (
        "RangeIndex(np.ones((4, 2), np.float32)).topk(np.ones((1, 2)), 2**62)",
        "ArgumentError",
        ("k must",),
    ),
    "range-broadcast-keys": ("RangeIndex(B((2**40, 8)))", "MemoryError", ()),
    "ffn-broadcast-x": ("SparseFFN(w, w, w.T)(B((2**40, 8)))", "MemoryError", ()),
    "input-sparse-broadcast-x": ("InputSparseFFN(w, w, w.T)(B((2**40, 8)))", "MemoryError", ()),
    "neuron-cache-window-2**62": (
        "c = NeuronCache(8, 3, policy='window', window=2**62)\n"
        "for i in range(5): c.record([i])\n"
        "c.reclassify(); assert c.hot_neurons().tolist() == [2, 3, 4]",
        None,
        (),
    ),
    "neuron-cache-broadcast-mask": (
        "NeuronCache(8).record(B((2**40, 8), bool))",
        "MemoryError",
        (),
    ),
    # refused before any thread starts (a million would take many minutes to start)
    "set_num_threads-10**6": (
        "import neuropil; neuropil.set_num_threads(10**6)",
        "ArgumentError",
        ("n must", "at most 4096", "1000000"),
    ),
}


@pytest.fixture(scope="module")
def risky_results():
    return run_cases(_RISKY_SETUP, {k: v[0] for k, v in RISKY.items()}, timeout=180)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_AS")
@pytest.mark.parametrize("label", list(RISKY))
def test_risky_calls(risky_results, label):
    _, exc, needles = RISKY[label]
    check_result(risky_results[label], exc, needles)


TOP_LEVEL_CASES = [
    P("dot-lengths", lambda: neuropil.dot(X64, X64[:3]), ShapeError, "b must", "(3,)"),
    P("dot-str", lambda: neuropil.dot("a", "b"), DTypeError, "a must", "<U1"),
    P("dot-int", lambda: neuropil.dot(np.ones(3, int), np.ones(3)), DTypeError, "a must", "int64"),
    P("dot-2d", lambda: neuropil.dot(W, W), ShapeError, "a must", "(8, 64)"),
    P("threads-0", lambda: neuropil.set_num_threads(0), ArgumentError, "n must", "0"),
    P("threads-str", lambda: neuropil.set_num_threads("2"), ArgumentError, "n must", "'2'"),
    P(
        "threads-2**70",
        lambda: neuropil.set_num_threads(2**70),
        ArgumentError,
        "n must",
        "at most 4096",
        str(2**70),
    ),
]


@pytest.mark.parametrize(("fn", "exc", "needles"), TOP_LEVEL_CASES)
def test_top_level_bad_arguments(fn, exc, needles, restore_threads):
    expect(fn, exc, *needles)


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

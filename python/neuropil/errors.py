"""The exceptions neuropil raises.

Every error raised on bad input is a :class:`NeuropilError`, except an index
out of range, which raises ``IndexError`` as Python's sequences do. The subclasses also
derive from the matching built-in, so ``except ValueError`` keeps working for
code that does not know neuropil. Messages name the argument, the expected and
the found value, e.g. ``x must have shape (n, 1536); got (3, 1535)``.

A file that cannot be opened at all (missing, a directory, no permission) is not
bad input but an operating-system condition: every ``load`` and ``save`` raises
the ``OSError`` subclass Python's own ``open`` would (``FileNotFoundError``,
``IsADirectoryError``, ``PermissionError``), with ``filename`` set. A file that
was read and is malformed raises :class:`FormatError`.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["ArgumentError", "DTypeError", "FormatError", "NeuropilError", "ShapeError"]


class NeuropilError(Exception):
    """Base class of every neuropil exception."""


class ShapeError(NeuropilError, ValueError):
    """An array has the wrong rank or extent."""


class DTypeError(NeuropilError, TypeError):
    """An array has an unsupported element type."""


class ArgumentError(NeuropilError, ValueError):
    """An argument's value is out of its domain (NaN, unsupported option...)."""


class FormatError(NeuropilError, ValueError):
    """A file is malformed, truncated, tampered with or of an unknown version."""


def _shown(value: Any) -> str:
    """``repr(value)`` for a message's found value, with numpy scalars written
    as Python writes numbers (``1.5``, ``3``, ``True``), not as numpy 2's
    ``np.float32(1.5)``; the items of a tuple or list too (a shape of numpy ints)."""
    if isinstance(value, np.generic):
        if isinstance(value, (np.number, np.bool_)):
            return str(value)  # np.float32(0.1): "0.1" (its .item() is 0.10000000149011612)
        return repr(value.item())
    if type(value) is list:
        return f"[{', '.join(map(_shown, value))}]"
    if type(value) is tuple:
        return f"({_shown(value[0])},)" if len(value) == 1 else f"({', '.join(map(_shown, value))})"
    return repr(value)


def _check_level(level: Any) -> None:
    """``level`` is None or a name (the core checks which); other types would
    reach the bindings and fail there without naming the argument."""
    if level is not None and not isinstance(level, str):
        raise ArgumentError(
            f"level must be None or a SIMD level name ('scalar', 'avx2', 'avx512', 'neon'); "
            f"got {_shown(level)}"
        )


def _real(name: str, v: Any, want: str) -> float:
    """``v`` as a float, or ArgumentError (``{name} must be {want}; got ...``)
    for what is no real number: a string, None, a bool, a list, a complex
    (``float()`` would parse ``"0.5"`` or raise an error that names no argument).

    Any :class:`numbers.Real` is one (int, float, numpy scalars,
    ``fractions.Fraction``), and so is a 0-d numpy array or torch tensor of a
    real integer or floating dtype (``torch.tensor(0.5)``, a tensor's
    ``.quantile(0.9)``), read with ``.item()``. torch is detected by the
    type's module: this module must not import it."""
    if type(v) is float:  # the common case, first
        return v
    if isinstance(v, (bool, np.bool_)):
        raise ArgumentError(f"{name} must be {want}; got {_shown(v)}")
    if not isinstance(v, numbers.Real):
        if not _real_0d(v):
            raise ArgumentError(f"{name} must be {want}; got {_shown(v)}")
        v = v.item()
    try:
        return float(v)
    except OverflowError:  # an int past float's range
        raise ArgumentError(f"{name} must be {want}; got {v}") from None


def _real_0d(v: Any) -> bool:
    """Whether ``v`` is a 0-d numpy array or torch tensor of a real integer or
    floating dtype (not bool, not complex)."""
    if isinstance(v, np.ndarray):
        return v.ndim == 0 and v.dtype.kind in "iuf"
    if type(v).__module__.startswith("torch"):
        try:
            dtype = v.dtype
            return v.ndim == 0 and (
                dtype.is_floating_point or str(dtype).startswith(("torch.int", "torch.uint"))
            )
        except AttributeError:  # no tensor (a torch.dtype, a module...)
            return False
    return False


def _non_finite(name: str, a: Any) -> ArgumentError:
    """The error for an array or tensor ``a`` holding NaN or Inf, naming the
    first one as the core's ``validate::finite`` does ("got NaN at flat index
    12"). Called only once a check failed, so the search (and on a GPU its
    sync) costs nothing on the good path."""
    if type(a).__module__.startswith("torch"):
        flat = a.detach().reshape(-1)
        i = int((~flat.isfinite()).nonzero()[0, 0])
        v = float(flat[i])
    else:
        flat = np.asarray(a).reshape(-1)
        i = int(np.flatnonzero(~np.isfinite(flat))[0])
        v = float(flat[i])
    shown = "NaN" if v != v else ("inf" if v > 0 else "-inf")
    return ArgumentError(f"{name} must be finite (no NaN or Inf); got {shown} at flat index {i}")


def _check_format_version(
    where: Any, found: Any, supported: int, field: str = "format_version"
) -> None:
    """FormatError unless ``found`` (a file's ``field``: an int, or its decimal
    string as the safetensors metadata stores it) is ``supported``. A version
    newer than this neuropil reads says so and what to do
    (``x.st: format_version 3 is newer than this neuropil (0.1.0) reads (up to
    2): upgrade neuropil``); anything else (older, missing, not a version)
    gives ``x.st: format_version must be 2; got '0'``."""
    version: int | None = None
    if type(found) is int:
        version = found
    elif isinstance(found, str) and found.isascii() and found.isdigit() and len(found) <= 30:
        # (canonical ASCII digits only: int() would take "+1", " 1", "1_0", fullwidth digits)
        if str(int(found)) == found:
            version = int(found)
    if version == supported:
        return
    if version is not None and version > supported:
        from . import _native  # (lazily: the bindings import this module)

        raise FormatError(
            f"{where}: {field} {version} is newer than this neuropil ({_native.__version__}) "
            f"reads (up to {supported}): upgrade neuropil"
        )
    raise FormatError(f"{where}: {field} must be {supported}; got {found!r}")

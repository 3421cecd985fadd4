"""The exceptions neuropil raises.

Every error raised on bad input is a :class:`NeuropilError`. The subclasses also
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


def _real(name: str, v: Any, want: str) -> float:
    """``v`` as a float, or ArgumentError (``{name} must be {want}; got ...``)
    for what is no real number: a string, None, a bool, a list (``float()``
    would parse ``"0.5"`` or raise an error that names no argument)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ArgumentError(f"{name} must be {want}; got {_shown(v)}")
    try:
        return float(v)
    except OverflowError:  # an int past float's range
        raise ArgumentError(f"{name} must be {want}; got {v}") from None

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

"""Lazy registries behind ``neuropil tour`` and ``neuropil bench``.

Each capability adds one entry per registry: a name and the ``module:function``
that runs it. Modules are imported only when their entry runs, so a missing
optional dependency (torch, transformers) affects only its own section.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ArgumentError


def resolve(target: str) -> Callable[..., Any]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module, package="neuropil"), func)


def select(registry: dict[str, str], names: Sequence[str] | None, what: str) -> list[str]:
    """The registry keys to run: all when ``names`` is empty, else ``names`` checked."""
    if not names:
        return list(registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ArgumentError(f"{what} must be among {', '.join(registry)}; got {', '.join(unknown)}")
    return list(names)

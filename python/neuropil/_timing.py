"""Timing and memory helpers shared by ``neuropil bench`` and the tour."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class _Thunk(Protocol):
    """A call with no arguments. (Not ``Callable[[], Any]``: mypy cannot infer a
    lambda with default arguments, ``lambda lv=level: ...``, in that context,
    python/mypy#15459; with a protocol it types the lambda alone, then checks it.)"""

    def __call__(self) -> Any: ...


def median_seconds(
    fn: _Thunk,
    *,
    repeat: int = 7,
    warmup: int = 1,
    min_time: float = 0.0,
    warmup_time: float = 0.1,
) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs, after warm-up runs.

    Warm-up: at least ``warmup`` runs and ``warmup_time`` seconds of them. On a
    VM, an idle vCPU can take tens of milliseconds to be scheduled again, so a
    multithreaded call timed right after single-threaded setup measures one
    core; a short busy warm-up gives the steady state, for every contender alike.

    A run that takes less than ``min_time`` is repeated in a loop and divided, so
    microsecond calls are not dominated by timer resolution.
    """
    t_end = time.perf_counter() + warmup_time
    done = 0
    while done < warmup or time.perf_counter() < t_end:
        fn()
        done += 1
    inner = 1
    if min_time > 0:
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        inner = max(1, int(min_time / max(once, 1e-9)))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


@dataclass
class Row:
    """One line of a side-by-side benchmark table.

    ``neuropil`` and each baseline are in ``unit`` (higher is better unless
    ``lower_is_better``); ``ratio`` is neuropil over the first baseline.
    """

    case: str
    unit: str
    neuropil: float
    baselines: dict[str, float] = field(default_factory=dict)
    limit: str = ""
    lower_is_better: bool = False

    def ratios(self) -> dict[str, float]:
        out = {}
        for name, value in self.baselines.items():
            if value > 0 and self.neuropil > 0:
                r = value / self.neuropil if self.lower_is_better else self.neuropil / value
                out[name] = r
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "unit": self.unit,
            "neuropil": self.neuropil,
            "baselines": self.baselines,
            "ratios": self.ratios(),
            "limit": self.limit,
        }


def format_table(rows: list[Row]) -> str:
    """Renders rows as a Markdown table (readable in a terminal too)."""
    lines = ["| case | neuropil | baseline(s) | ratio | limit |", "|---|---|---|---|---|"]
    for r in rows:
        base = ", ".join(f"{k}: {_num(v)}" for k, v in r.baselines.items()) or "-"
        ratio = ", ".join(f"{v:.2f}x vs {k}" for k, v in r.ratios().items()) or "-"
        lines.append(f"| {r.case} | {_num(r.neuropil)} {r.unit} | {base} | {ratio} | {r.limit} |")
    return "\n".join(lines)


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"

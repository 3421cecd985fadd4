"""``neuropil bench [NAME]``: side-by-side ratios against the baselines installed.

Each benchmark returns :class:`~neuropil._timing.Row` objects: neuropil's
figure, the baselines' figures measured in the same run, and their ratio.
"""

from __future__ import annotations

import json
import platform
import time
from inspect import signature

from ._registry import resolve, select
from ._timing import Row, format_table

# name -> "module:function(quick) -> list[Row]". Capabilities add their benchmark here.
BENCHES: dict[str, str] = {
    "simd": "._bench_system:simd",
    "membrane": "._bench_membrane:membrane",
    "windows": "._bench_windows:windows",
    "flyhash": "._bench_flyhash:flyhash",
    "quant": "._bench_quant:quant",
    "range": "._bench_range:range_bench",
    "neurons": "._bench_neurons:neurons",
}


def machine() -> str:
    """CPU model and core count, for the record."""
    import os

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def run(
    names: list[str] | None = None,
    as_json: bool = False,
    quick: bool = False,
    quality: bool = False,
) -> int:
    from . import info

    chosen = select(BENCHES, names, "NAME")
    env = info()
    env["machine"] = machine()
    env["date"] = time.strftime("%Y-%m-%d")
    results: dict[str, list[Row]] = {}
    for name in chosen:
        if not as_json:
            print(f"\n== {name} ==")
        fn = resolve(BENCHES[name])
        extra = {"quality": True} if quality and "quality" in signature(fn).parameters else {}
        rows = fn(quick=quick, verbose=not as_json, **extra)
        results[name] = rows
        if not as_json:
            print(format_table(rows))
    if as_json:
        payload = {
            "environment": env,
            "results": {k: [r.as_dict() for r in v] for k, v in results.items()},
        }
        print(json.dumps(payload, indent=2))
    else:
        print(
            f"\nmachine: {env['machine']}; SIMD {env['simd_level']}; "
            f"threads {env['threads']}; {env['date']}"
        )
    return 0

"""``neuropil tour``: every capability run on real data, with a short report.

Sections run in order; each returns a dict of findings that ``--json`` prints.
A section whose optional dependency is missing is reported as skipped, never
as a silent success.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ._registry import resolve, select

# name -> "module:function(out_dir) -> dict". Capabilities add their section here.
SECTIONS: dict[str, str] = {
    "system": "._tour_system:system",
    "kernels": "._tour_system:kernels",
    "membrane": "._tour_membrane:membrane",
    "windows": "._tour_windows:windows",
    "flyhash": "._tour_flyhash:flyhash",
    "quant": "._tour_quant:quant",
    "range": "._tour_range:range_tour",
    "neurons": "._tour_neurons:neurons",
}


def run(
    only: list[str] | None = None, as_json: bool = False, out_dir: str = "neuropil-tour"
) -> int:
    names = select(SECTIONS, only, "--only")
    out = Path(out_dir)
    # Made first: a path that cannot be a folder fails here (OSError: one
    # "neuropil: error:" line), not in the section that writes the first figure.
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    failed = 0
    for name in names:
        if not as_json:
            print(f"\n== {name} ==")
        t0 = time.perf_counter()
        try:
            result = resolve(SECTIONS[name])(out, verbose=not as_json)
        except ModuleNotFoundError as e:
            result = {"skipped": f"missing optional dependency: {e.name}"}
            if not as_json:
                print(f"skipped: {result['skipped']}")
        except Exception as e:  # a failing section is reported, and fails the tour
            failed += 1
            result = {"error": f"{type(e).__name__}: {e}"}
            if not as_json:
                print(f"FAILED: {result['error']}")
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report[name] = result
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"\n{len(names) - failed}/{len(names)} sections ran; report folder: {out}")
    return 1 if failed else 0

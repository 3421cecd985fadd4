"""Peak memory and time of one ``neuropil quantize`` conversion, in this process.

    python benches/python/quantize_memory.py IN OUT [--bits B] [--group-size G] [--scheme S]

Prints JSON: the wall time of ``convert``, ``VmHWM`` (peak resident set, the
input's memory-mapped pages included: those are the file's, which the kernel
can drop) and the peak of ``RssAnon`` (the process's own memory, sampled every
millisecond by a thread) above its value before the call. Run each case in a
fresh process (Linux only: it reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def _status() -> dict[str, int]:
    """Fields of /proc/self/status in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--bits", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--scheme", default="asym")
    args = p.parse_args()
    from neuropil import _quant_cli  # (imported before the baseline is read)

    before = _status()["RssAnon"]
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _status()["RssAnon"])
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    _quant_cli.convert(args.src, args.dst, args.bits, args.group_size, args.scheme, progress=False)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "wall_s": round(wall, 2),
                "VmHWM_MiB": _status()["VmHWM"],
                "RssAnon_peak_above_start_MiB": peak - before,
            }
        )
    )


if __name__ == "__main__":
    main()

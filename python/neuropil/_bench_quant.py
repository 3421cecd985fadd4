"""``neuropil bench quant``: packed mat-vec against memory bandwidth, torch's int4
CPU kernel and fp32 ``F.linear``; mat-mul against torch fp32; quantize and
dequantize against the ``gguf`` package; the CUDA path against fp16 ``F.linear``.

All baselines run in the same process, right after neuropil, on the same data.
"""

from __future__ import annotations

import numpy as np

from . import _native
from ._timing import Row, median_seconds
from .quant import QuantizedWeights, quantize


def _stack(q: QuantizedWeights, n: int) -> list[QuantizedWeights]:
    """``n`` copies of ``q`` in distinct memory (a stack of layers)."""
    return [
        QuantizedWeights(
            q.data.copy(),
            q.scales.copy(),
            None if q.mins is None else q.mins.copy(),
            q.shape,
            q.bits,
            q.group_size,
            q.scheme,
        )
        for _ in range(n)
    ]


def quant(quick: bool = False, verbose: bool = True) -> list[Row]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(_native.get_num_threads())
    rows: list[Row] = []
    rng = np.random.default_rng(0)
    layers, dim = (4, 1024) if quick else (16, 4096)
    repeat = 3 if quick else 7
    threads = _native.get_num_threads()

    # ---- batch-1 mat-vec over a stack of layers, against the read bandwidth.
    # A VM's memory bandwidth drifts between runs (other tenants): the two are
    # measured in alternation, five rounds, and each reported as its median.
    w = rng.standard_normal((dim, dim), dtype=np.float32)
    q = quantize(w, 4, 64)
    stack = _stack(q, layers)
    packed = sum(s.memory_bytes for s in stack)
    x = rng.standard_normal(dim, dtype=np.float32)
    bws, tms = [], []
    for _ in range(2 if quick else 5):
        bws.append(_native.memory_read_bandwidth(64 if quick else 1024, 3 if quick else 7))
        tms.append(median_seconds(lambda: [s.matvec(x) for s in stack], repeat=repeat))
    bw, t_np = float(np.median(bws)), float(np.median(tms))
    rows.append(
        Row(f"memory read bandwidth ({threads} threads)", "GB/s", bw, limit="the mat-vec limit")
    )
    gbs = packed / t_np / 1e9
    case = f"mat-vec batch 1, {layers} x {dim}x{dim} 4-bit g64 ({packed >> 20} MiB packed)"
    rows.append(
        Row(
            case + ", weight bytes/s",
            "GB/s",
            gbs,
            {"memory read": bw},
            limit=f"{gbs / bw:.0%} of read",
        )
    )

    # torch int4 (the same codes, group 64), float32 and bfloat16 activations
    codes = torch.from_numpy(rng.integers(0, 16, (dim, dim), dtype=np.int32))
    tw = [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.clone(), 1) for _ in range(layers)
    ]
    sz = torch.stack([torch.rand(dim // 64, dim) + 0.5, torch.randn(dim // 64, dim)], -1)
    xt = torch.from_numpy(x).reshape(1, dim)
    xb = xt.to(torch.bfloat16)
    szb = sz.to(torch.bfloat16)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    with torch.no_grad():
        t_i4 = median_seconds(lambda tw=tw: [mm(xt, p, 64, sz) for p in tw], repeat=repeat)
        t_i4b = median_seconds(lambda tw=tw: [mm(xb, p, 64, szb) for p in tw], repeat=repeat)
        del tw
        wt = [torch.from_numpy(w).clone() for _ in range(layers)]
        t_fp = median_seconds(lambda wt=wt: [F.linear(xt, m) for m in wt], repeat=repeat)
        del wt
    rows.append(
        Row(
            case + ", time",
            "ms",
            t_np * 1e3,
            {
                "torch int4 (f32 x)": t_i4 * 1e3,
                "torch int4 (bf16 x)": t_i4b * 1e3,
                "torch fp32 F.linear": t_fp * 1e3,
            },
            lower_is_better=True,
        )
    )

    # other widths and levels, one layer set each
    small = _stack(q, 1)[0]
    for bits in (2, 3, 8):
        qb = _stack(quantize(w, bits, 64), layers)
        nb = sum(s.memory_bytes for s in qb)
        t = median_seconds(lambda qb=qb: [s.matvec(x) for s in qb], repeat=repeat)
        rows.append(
            Row(
                f"mat-vec batch 1, {bits}-bit g64, weight bytes/s",
                "GB/s",
                nb / t / 1e9,
                {"memory read": bw},
            )
        )
    for level in _native.simd_levels():
        t = median_seconds(lambda lv=level: small.matvec(x, level=lv), repeat=repeat)
        rows.append(
            Row(f"mat-vec 4-bit, level={level}, one layer", "GB/s", small.memory_bytes / t / 1e9)
        )

    # ---- mat-mul, batch n
    wt1 = torch.from_numpy(w)
    for n in (64, 256) if quick else (64, 256, 512):
        xn = rng.standard_normal((n, dim), dtype=np.float32)
        xtn = torch.from_numpy(xn)
        t_q = median_seconds(lambda xn=xn: small.matvec(xn), repeat=repeat)
        with torch.no_grad():
            t_t = median_seconds(lambda xtn=xtn: xtn @ wt1.T, repeat=repeat)
        rows.append(
            Row(
                f"mat-mul n={n}, {dim}x{dim} 4-bit g64",
                "ms",
                t_q * 1e3,
                {"torch fp32 matmul": t_t * 1e3},
                lower_is_better=True,
            )
        )

    # ---- quantize / dequantize vs the gguf package
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as g_deq
    from gguf.quants import quantize as g_q

    wq = w if not quick else w[:512]
    gb = wq.nbytes / 1e9
    t_a = median_seconds(lambda: quantize(wq, 4, 64), repeat=repeat)
    t_40 = median_seconds(lambda: quantize(wq, scheme="q4_0"), repeat=repeat)
    t_g = median_seconds(
        lambda: g_q(wq, GGMLQuantizationType.Q4_0), repeat=1 if not quick else 3, warmup=0
    )
    rows.append(
        Row(
            f"quantize q4_0 ({threads} threads), fp32 input",
            "GB/s",
            gb / t_40,
            {"gguf package": gb / t_g},
            limit=f"{gb / t_40 / threads:.2f} GB/s per core",
        )
    )
    rows.append(
        Row(
            f"quantize 4-bit g64 asym ({threads} threads), fp32 input",
            "GB/s",
            gb / t_a,
            {"gguf package q4_0": gb / t_g},
            limit=f"{gb / t_a / threads:.2f} GB/s per core",
        )
    )
    q40 = quantize(wq, scheme="q4_0")
    raw = q40.to_gguf().reshape(wq.shape[0], -1)
    t_d = median_seconds(q40.dequantize, repeat=repeat)
    t_gd = median_seconds(lambda: g_deq(raw, GGMLQuantizationType.Q4_0), repeat=3, warmup=0)
    rows.append(Row("dequantize q4_0, fp32 output", "GB/s", gb / t_d, {"gguf package": gb / t_gd}))

    # ---- CUDA: the torch path on the GPU
    if torch.cuda.is_available():
        rows.extend(_cuda_rows(q, w, layers, dim, repeat))
    return rows


def _cuda_rows(q: QuantizedWeights, w: np.ndarray, layers: int, dim: int, repeat: int) -> list[Row]:
    import torch
    import torch.nn.functional as F

    from .torch import QuantizedLinear

    dev = torch.device("cuda")

    def gpu_seconds(fn, calls: int = 20) -> float:
        """Median GPU time of one call, from events around ``calls`` queued calls."""
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(repeat, 5)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(calls):
                fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3 / calls)
        return float(np.median(times))

    big = torch.empty(1 << 28, dtype=torch.float32, device=dev)  # 1 GiB
    hbm = big.numel() * 4 / gpu_seconds(lambda big=big: big.sum(), calls=5) / 1e9
    del big
    rows = [Row("CUDA read bandwidth (torch sum of 1 GiB)", "GB/s", hbm)]
    mods = [QuantizedLinear.from_quantized(q).to(dev) for _ in range(layers)]
    ws = [torch.from_numpy(w).to(dev, torch.float16) for _ in range(layers)]
    x = torch.randn(1, dim, device=dev, dtype=torch.float16)
    packed = sum(m.memory_bytes for m in mods)
    with torch.no_grad():
        t_q = gpu_seconds(lambda: [m(x) for m in mods], calls=3)
        t_h = gpu_seconds(lambda: [F.linear(x, m) for m in ws], calls=3)
        # The same stacks replayed as CUDA graphs (no Python or launch gaps).
        graphs = []
        for fn in (lambda: [m(x) for m in mods], lambda: [F.linear(x, m) for m in ws]):
            fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graphs.append(gpu_seconds(g.replay, calls=10))
    rows += [
        Row(
            f"CUDA mat-vec batch 1, {layers} x {dim}x{dim} 4-bit g64, from Python",
            "GB/s",
            packed / t_q / 1e9,
            {"HBM read": hbm},
            limit=f"{packed / t_q / 1e9 / hbm:.0%} of HBM",
        ),
        Row(
            f"CUDA mat-vec batch 1, {layers} x {dim}x{dim}, from Python, time",
            "ms",
            t_q * 1e3,
            {"torch fp16 F.linear": t_h * 1e3},
            lower_is_better=True,
        ),
        Row(
            f"CUDA mat-vec batch 1, {layers} x {dim}x{dim}, in a CUDA graph, time",
            "ms",
            graphs[0] * 1e3,
            {"torch fp16 F.linear (graph)": graphs[1] * 1e3},
            lower_is_better=True,
            limit=f"{packed / graphs[0] / 1e9 / hbm:.0%} of HBM",
        ),
    ]
    mods.clear()  # free the stack before the large layer
    ws.clear()
    # One layer large enough (4096 x 4096 x 16 rows) that the kernel, not the launch, is timed.
    rows_big = dim * 16
    wb = np.random.default_rng(1).standard_normal((rows_big, dim), dtype=np.float32)
    mod = QuantizedLinear.from_quantized(quantize(wb, bits=4, group_size=64)).to(dev)
    wh = torch.from_numpy(wb).to(dev, torch.float16)
    del wb
    with torch.no_grad():
        t_b = gpu_seconds(lambda: mod(x))
        t_bh = gpu_seconds(lambda: F.linear(x, wh))
    rows += [
        Row(
            f"CUDA mat-vec batch 1, one {rows_big}x{dim} 4-bit g64 layer",
            "GB/s",
            mod.memory_bytes / t_b / 1e9,
            {"HBM read": hbm},
            limit=f"{mod.memory_bytes / t_b / 1e9 / hbm:.0%} of HBM",
        ),
        Row(
            f"CUDA mat-vec batch 1, one {rows_big}x{dim} layer, time",
            "ms",
            t_b * 1e3,
            {"torch fp16 F.linear": t_bh * 1e3},
            lower_is_better=True,
        ),
    ]
    return rows

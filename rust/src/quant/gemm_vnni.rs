//! 4-bit mat-mul with int16 activations on AVX-512 VNNI, register-blocked.
//!
//! The batch-n counterpart of `super::vnni`'s mat-vec. Each activation row
//! is quantized per weight group to int16 (`x_k = dx_k * xq`,
//! `dx_k = max|x_k| / 32767`, round half away from zero), and `vpdpwssd`
//! multiplies the weight codes (as i16) with `xq`: 32 products per instruction,
//! twice the f32 FMA rate, which with 8x fewer weight bytes is why a packed
//! 4-bit GEMM can outrun an fp32 SGEMM.
//!
//! Why int16 and not ggml's int8: LLM hidden states carry a few outlier
//! channels ~100x the rest; an int8 step of `max / 127` erases the other
//! values of an outlier's group. Measured on SmolLM2-135M (4-bit g32 weights,
//! GPL-3 perplexity over 256 tokens): int8 activations move perplexity by 1.4%,
//! int16 activations by less than the 0.1% the library promises.
//!
//! Layout. Weight rows go in tiles of 16: a tile's codes are unpacked once into a
//! *panel* where one 64-byte vector holds 2 consecutive codes (i16) of each of
//! the 16 rows (lane `l` = row `l`), so `vpdpwssd` against 2 broadcast
//! activations yields 16 per-row partial sums with no horizontal reduction. A
//! panel (16 x cols x 2 bytes, 128 KiB at 4,096 columns) is reused by every
//! activation row; 8 activation rows run together so each panel vector is
//! loaded once per 8 `vpdpwssd`. Per group, the 16 integer sums become floats:
//! `y += sum * scale_k * dx_k + min_k * dx_k * sum(xq_k)` (for symmetric schemes
//! `min_k = -2^(bits-1) * scale_k`), so the result is exactly the product of the
//! dequantized weights with the quantized activations, up to f32 rounding.
//! Integer sums cannot overflow: `|code * xq| <= 15 * 32767` and a group holds
//! at most 256 products, under 2^27.

use rayon::prelude::*;

use super::format::QuantRef;
use crate::error::Result;

/// Weight rows per panel (one AVX-512 register of i32 lanes).
const TILE: usize = 16;
/// Activation rows per register block.
const BATCH: usize = 8;
/// Tiles per task: their panels (4 x 128 KiB at 4,096 columns) stay in L2
/// while every activation row passes over them.
const TILES_PER_TASK: usize = 4;

/// Whether [`matmul4`] runs here: AVX-512 F/BW/VL + VNNI and 4-bit weights.
pub fn applies(q: &QuantRef<'_>) -> bool {
    q.params.bits == 4 && super::vnni::available()
}

/// Activations quantized per group, rows padded to a multiple of [`BATCH`].
struct Activations {
    /// `xq[i * padded_cols + c]`, zeros past `cols` and in padding rows.
    xq: Vec<i16>,
    /// `dx[i * groups + k]`.
    dx: Vec<f32>,
    /// `dx_k * sum(xq_k)`, same layout.
    sums: Vec<f32>,
}

fn quantize_activations(x: &[f32], n: usize, cols: usize, g: usize, ng: usize) -> Activations {
    let np = n.div_ceil(BATCH) * BATCH;
    let pc = ng * g;
    let mut a = Activations {
        xq: vec![0i16; np * pc],
        dx: vec![0f32; np * ng],
        sums: vec![0f32; np * ng],
    };
    for i in 0..n {
        let row = &x[i * cols..(i + 1) * cols];
        for k in 0..ng {
            let src = &row[(k * g).min(cols)..((k + 1) * g).min(cols)];
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 32767.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut total = 0i32;
            for (o, v) in a.xq[i * pc + k * g..].iter_mut().zip(src) {
                *o = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
                total += *o as i32;
            }
            a.dx[i * ng + k] = d;
            a.sums[i * ng + k] = d * total as f32;
        }
    }
    a
}

/// One tile's codes, scales and mins, interleaved for the kernel.
struct Panel {
    /// `codes[((k * g / 2 + c) * 16 + l) * 2 + j]`: code `2c + j` of group `k`, row `l`.
    codes: Vec<i16>,
    /// `scales[k * 16 + l]`, `mins[k * 16 + l]` (zeros for missing rows).
    scales: Vec<f32>,
    mins: Vec<f32>,
}

fn build_panel(q: &QuantRef<'_>, r0: usize, panel: &mut Panel) {
    let g = q.params.group_size;
    let h = g / 2;
    let ng = q.groups();
    let m = TILE.min(q.rows - r0);
    let off = -(q.params.offset() as f32);
    panel.codes.clear();
    panel.codes.resize(ng * g * TILE, 0);
    panel.scales.clear();
    panel.scales.resize(ng * TILE, 0.0);
    panel.mins.clear();
    panel.mins.resize(ng * TILE, 0.0);
    for l in 0..m {
        let r = r0 + l;
        let row = q.row(r);
        for k in 0..ng {
            let grp = &row[k * h..(k + 1) * h];
            let base = k * g * TILE;
            // Code v of a group: low nibble of byte v for v < h, else the high
            // nibble of byte v - h (GGUF order).
            for (b, &byte) in grp.iter().enumerate() {
                let (vl, vh) = (b, b + h);
                panel.codes[base + ((vl / 2) * TILE + l) * 2 + vl % 2] = (byte & 0x0f) as i16;
                panel.codes[base + ((vh / 2) * TILE + l) * 2 + vh % 2] = (byte >> 4) as i16;
            }
            let s = q.scales.get(r * ng + k);
            panel.scales[k * TILE + l] = s;
            panel.mins[k * TILE + l] = match q.mins {
                Some(mins) => mins.get(r * ng + k),
                None => off * s,
            };
        }
    }
}

/// `out (n, rows) = x (n, cols) . W^T` for 4-bit weights. Caller checked shapes
/// and [`applies`].
pub fn matmul4(q: &QuantRef<'_>, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    debug_assert!(applies(q));
    let (rows, cols) = (q.rows, q.cols);
    let g = q.params.group_size;
    let ng = q.groups();
    let a = quantize_activations(x, n, cols, g, ng);
    let tiles = rows.div_ceil(TILE);
    let tasks = tiles.div_ceil(TILES_PER_TASK);
    // Each task fills an (n, its rows) block; copied into `out` after.
    let blocks: Vec<(usize, Vec<f32>)> = crate::threads::install(|| {
        (0..tasks)
            .into_par_iter()
            .map(|t| {
                let t0 = t * TILES_PER_TASK;
                let t1 = (t0 + TILES_PER_TASK).min(tiles);
                let panels: Vec<Panel> = (t0..t1)
                    .map(|ti| {
                        let mut p = Panel {
                            codes: Vec::new(),
                            scales: Vec::new(),
                            mins: Vec::new(),
                        };
                        build_panel(q, ti * TILE, &mut p);
                        p
                    })
                    .collect();
                let width = (t1 - t0) * TILE;
                let np = a.dx.len() / ng;
                let mut y = vec![0f32; np * width];
                for i0 in (0..n).step_by(BATCH) {
                    for (pi, p) in panels.iter().enumerate() {
                        let mut acc = [[0f32; TILE]; BATCH];
                        // SAFETY: `applies` saw AVX-512 F/BW/VL + VNNI; the panel
                        // holds ng groups of g codes for 16 lanes; the activations
                        // hold rows i0..i0 + BATCH (padded) of ng * g codes.
                        unsafe { kernel(p, &a, ng, g, i0, &mut acc) };
                        for (b, row) in acc.iter().enumerate() {
                            let at = (i0 + b) * width + pi * TILE;
                            y[at..at + TILE].copy_from_slice(row);
                        }
                    }
                }
                (t0 * TILE, y)
            })
            .collect()
    })?;
    for (r0, y) in blocks {
        let width = y.len() / (a.dx.len() / ng);
        let m = width.min(rows - r0);
        for i in 0..n {
            out[i * rows + r0..i * rows + r0 + m].copy_from_slice(&y[i * width..i * width + m]);
        }
    }
    Ok(())
}

/// 16 weight rows x [`BATCH`] activation rows starting at `i0`.
///
/// # Safety
/// AVX-512 F/BW/VL + VNNI; `p` built for `ng` groups of `g` codes; `a` holds at
/// least `i0 + BATCH` rows of `ng * g` codes, `dx` and `sums`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn kernel(
    p: &Panel,
    a: &Activations,
    ng: usize,
    g: usize,
    i0: usize,
    out: &mut [[f32; TILE]; BATCH],
) {
    use std::arch::x86_64::*;
    let pc = ng * g;
    let g2 = g / 2;
    debug_assert!(p.codes.len() >= ng * g * TILE && a.xq.len() >= (i0 + BATCH) * pc);
    let mut facc = [_mm512_setzero_ps(); BATCH];
    let xq = a.xq.as_ptr();
    let w0 = p.codes.as_ptr();
    for k in 0..ng {
        let mut acc = [_mm512_setzero_si512(); BATCH];
        for c in 0..g2 {
            // SAFETY: ((k * g2 + c) + 1) * 32 <= ng * g * 16 i16 = the panel's codes.
            let w = unsafe { _mm512_loadu_si512(w0.add((k * g2 + c) * 32) as *const _) };
            for (b, s) in acc.iter_mut().enumerate() {
                // SAFETY: row i0 + b < padded rows; element (k * g2 + c) * 2 + 1 < pc.
                let two = unsafe {
                    (xq.add((i0 + b) * pc + (k * g2 + c) * 2) as *const i32).read_unaligned()
                };
                *s = _mm512_dpwssd_epi32(*s, w, _mm512_set1_epi32(two));
            }
        }
        // SAFETY: scales and mins hold ng * 16 floats.
        let (sv, mv) = unsafe {
            (
                _mm512_loadu_ps(p.scales.as_ptr().add(k * TILE)),
                _mm512_loadu_ps(p.mins.as_ptr().add(k * TILE)),
            )
        };
        for (b, f) in facc.iter_mut().enumerate() {
            let (d, sm) = (a.dx[(i0 + b) * ng + k], a.sums[(i0 + b) * ng + k]);
            let v = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(acc[b]),
                _mm512_mul_ps(sv, _mm512_set1_ps(d)),
                *f,
            );
            *f = _mm512_fmadd_ps(mv, _mm512_set1_ps(sm), v);
        }
    }
    for (o, f) in out.iter_mut().zip(facc) {
        // SAFETY: each output row holds exactly 16 f32.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), f) };
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(
    _p: &Panel,
    _a: &Activations,
    _ng: usize,
    _g: usize,
    _i0: usize,
    _out: &mut [[f32; TILE]; BATCH],
) {
    unreachable!("applies() is false off x86_64")
}

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
//! *panel* where one 64-byte vector holds 2 codes (i16) of each of the 16 rows
//! (lane `l` = row `l`), so `vpdpwssd` against 2 broadcast activations yields 16
//! per-row partial sums with no horizontal reduction. The 2 codes of a lane are
//! the low and high nibble of one packed byte (codes `c` and `c + g/2` of a group,
//! GGUF order), so a panel is built by transposing 16 x 16 byte blocks in
//! registers and splitting nibbles, with no scattered stores; the activations are
//! laid out in the same pairs. A
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
    // Rows in parallel: n x cols values per call, serial it held back 16 cores.
    a.xq.par_chunks_mut(pc)
        .zip(a.dx.par_chunks_mut(ng).zip(a.sums.par_chunks_mut(ng)))
        .zip(x.par_chunks(cols))
        .for_each(|((xq, (dx, sums)), row)| quantize_row(row, g, xq, dx, sums));
    a
}

/// One activation row's int16 codes, steps and `dx_k * sum(xq_k)` per group.
fn quantize_row(row: &[f32], g: usize, xq: &mut [i16], dx: &mut [f32], sums: &mut [f32]) {
    let cols = row.len();
    let mut tmp = [0i16; 256];
    let h = g / 2;
    for k in 0..dx.len() {
        let src = &row[(k * g).min(cols)..((k + 1) * g).min(cols)];
        tmp.fill(0);
        let (d, total) = super::act16::quantize_group(src, &mut tmp[..src.len()], 32767.0);
        // Pair c of the group: values c and c + g/2, as in the panel.
        for (c, pair) in xq[k * g..(k + 1) * g].chunks_exact_mut(2).enumerate() {
            pair[0] = tmp[c];
            pair[1] = tmp[c + h];
        }
        dx[k] = d;
        sums[k] = d * total as f32;
    }
}

/// Headroom (see `headroom.rs`): the group sums overflow for huge activations
/// as the mat-vec's do, so a row with `max|x| >= 2^96` is quantized again from
/// `x * 2^-e`, each row by its own `e`; returns the rows and exponents whose
/// outputs must be scaled back. Rows are told apart by their int16 steps
/// (`ng` compares a row) rather than by another pass over `x`.
fn rescale_huge_rows(
    a: &mut Activations,
    x: &[f32],
    cols: usize,
    g: usize,
    ng: usize,
) -> Vec<(usize, i32)> {
    let pc = ng * g;
    let mut shifted = Vec::new();
    for (i, row) in x.chunks(cols.max(1)).enumerate() {
        if !super::headroom::steps_may_be_huge(&a.dx[i * ng..(i + 1) * ng]) {
            continue;
        }
        if let Some(e) = super::headroom::shift(row) {
            let (xq, dx, sums) = (
                &mut a.xq[i * pc..(i + 1) * pc],
                &mut a.dx[i * ng..(i + 1) * ng],
                &mut a.sums[i * ng..(i + 1) * ng],
            );
            quantize_row(&super::headroom::scaled(row, e), g, xq, dx, sums);
            shifted.push((i, e));
        }
    }
    shifted
}

/// One tile's codes, scales and mins, interleaved for the kernel.
struct Panel {
    /// `codes[((k * g / 2 + c) * 16 + l) * 2 + j]`: the low (`j = 0`) or high
    /// (`j = 1`) nibble of byte `c` of group `k` in row `l`, i.e. code `c` or
    /// `c + g/2` of the group.
    codes: Vec<i16>,
    /// `scales[k * 16 + l]`, `mins[k * 16 + l]` (zeros for missing rows).
    scales: Vec<f32>,
    mins: Vec<f32>,
}

impl Panel {
    fn new() -> Panel {
        Panel {
            codes: Vec::new(),
            scales: Vec::new(),
            mins: Vec::new(),
        }
    }

    /// Sizes the panel for the tile at row `r0` and fills its scales and mins;
    /// the codes are left zeroed.
    fn prepare(&mut self, q: &QuantRef<'_>, r0: usize) {
        let ng = q.groups();
        let m = TILE.min(q.rows - r0);
        let off = -(q.params.offset() as f32);
        self.codes.clear();
        self.codes.resize(ng * q.params.group_size * TILE, 0);
        self.scales.clear();
        self.scales.resize(ng * TILE, 0.0);
        self.mins.clear();
        self.mins.resize(ng * TILE, 0.0);
        for l in 0..m {
            let r = r0 + l;
            for k in 0..ng {
                let s = q.scales.get(r * ng + k);
                self.scales[k * TILE + l] = s;
                self.mins[k * TILE + l] = match q.mins {
                    Some(mins) => mins.get(r * ng + k),
                    None => off * s,
                };
            }
        }
    }
}

/// Fills `panel` with the tile of rows `r0..r0 + 16` (missing rows are zeros).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; 4-bit weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn build_panel(q: &QuantRef<'_>, r0: usize, panel: &mut Panel) {
    use std::arch::x86_64::*;
    panel.prepare(q, r0);
    let rb = q.params.row_bytes(q.cols);
    let m = TILE.min(q.rows - r0);
    // A group holds g/2 bytes, a multiple of 16 for every group size (>= 32),
    // so a row is whole 16-byte blocks.
    assert!(rb.is_multiple_of(16) && panel.codes.len() == rb * 2 * TILE);
    let zero = [0u8; 16];
    let lo = _mm512_set1_epi32(0x0f);
    let hi = _mm512_set1_epi32(0xf0);
    let out = panel.codes.as_mut_ptr() as *mut u32;
    for b0 in (0..rb).step_by(16) {
        let mut v = [_mm_setzero_si128(); TILE];
        for (l, vl) in v.iter_mut().enumerate() {
            let src = if l < m {
                &q.row(r0 + l)[b0..b0 + 16]
            } else {
                &zero[..]
            };
            // SAFETY: `src` holds 16 bytes.
            *vl = unsafe { _mm_loadu_si128(src.as_ptr() as *const _) };
        }
        // 16 x 16 byte transpose: four rounds of the perfect shuffle leave byte
        // j of row l in lane l of vector j.
        for _ in 0..4 {
            let mut t = [_mm_setzero_si128(); TILE];
            for i in 0..8 {
                t[2 * i] = _mm_unpacklo_epi8(v[i], v[i + 8]);
                t[2 * i + 1] = _mm_unpackhi_epi8(v[i], v[i + 8]);
            }
            v = t;
        }
        for (j, vj) in v.iter().enumerate() {
            // Byte -> (low nibble, high nibble) as the two i16 of a lane.
            let x = _mm512_cvtepu8_epi32(*vj);
            let w = _mm512_or_si512(
                _mm512_and_si512(x, lo),
                _mm512_slli_epi32::<12>(_mm512_and_si512(x, hi)),
            );
            // SAFETY: b0 + j < rb, so the 16 u32 at (b0 + j) * 16 end within the
            // codes' rb * 2 * 16 i16 (asserted above).
            unsafe { _mm512_storeu_si512(out.add((b0 + j) * TILE) as *mut _, w) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn build_panel(_q: &QuantRef<'_>, _r0: usize, _panel: &mut Panel) {
    unreachable!("applies() is false off x86_64")
}

/// `out (n, rows) = x (n, cols) . W^T` for 4-bit weights. Caller checked shapes
/// and [`applies`].
pub fn matmul4(q: &QuantRef<'_>, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    debug_assert!(applies(q));
    let (rows, cols) = (q.rows, q.cols);
    let g = q.params.group_size;
    let ng = q.groups();
    let tiles = rows.div_ceil(TILE);
    let tasks = tiles.div_ceil(TILES_PER_TASK);
    crate::threads::install(|| {
        let mut a = quantize_activations(x, n, cols, g, ng);
        let shifted = rescale_huge_rows(&mut a, x, cols, g, ng);
        let np = a.dx.len() / ng;
        // Each task fills an (n, its rows) block, copied into `out` after.
        let blocks: Vec<(usize, Vec<f32>)> = (0..tasks)
            .into_par_iter()
            .map(|t| {
                let t0 = t * TILES_PER_TASK;
                let t1 = (t0 + TILES_PER_TASK).min(tiles);
                let panels: Vec<Panel> = (t0..t1)
                    .map(|ti| {
                        let mut p = Panel::new();
                        // SAFETY: `applies` saw AVX-512 F/BW/VL; 4-bit weights.
                        unsafe { build_panel(q, ti * TILE, &mut p) };
                        p
                    })
                    .collect();
                let width = (t1 - t0) * TILE;
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
            .collect();
        // Output rows in parallel too: n x rows floats.
        out.par_chunks_mut(rows).enumerate().for_each(|(i, o)| {
            for (r0, y) in &blocks {
                let width = y.len() / np;
                let m = width.min(rows - r0);
                o[*r0..r0 + m].copy_from_slice(&y[i * width..i * width + m]);
            }
        });
        for &(i, e) in &shifted {
            super::headroom::unscale(&mut out[i * rows..(i + 1) * rows], e);
        }
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::format::{Params, ScaleType, Scheme};
    use crate::quant::quantize::quantize;

    /// The register-transposed panel equals the scalar definition of its layout,
    /// on whole tiles and on one that ends past the last row.
    #[test]
    fn panel_matches_its_scalar_definition() {
        if !super::super::vnni::available() {
            return;
        }
        let (rows, cols) = (21, 160);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 97.0)
            .collect();
        for g in [32, 64, 128, 256] {
            let params = Params::new(4, g, Scheme::Asym, ScaleType::F16).unwrap();
            let qw = quantize(&w, rows, cols, params, false).unwrap();
            let q = qw.view();
            let h = g / 2;
            for r0 in [0, 16] {
                let mut p = Panel::new();
                // SAFETY: `available` saw AVX-512 F/BW/VL; 4-bit weights.
                unsafe { build_panel(&q, r0, &mut p) };
                for l in 0..TILE {
                    for k in 0..q.groups() {
                        for c in 0..h {
                            let byte = if r0 + l < rows {
                                q.row(r0 + l)[k * h + c]
                            } else {
                                0
                            };
                            let at = ((k * h + c) * TILE + l) * 2;
                            let what = format!("g{g} tile {r0} lane {l} group {k} byte {c}");
                            assert_eq!(p.codes[at], (byte & 0x0f) as i16, "{what}");
                            assert_eq!(p.codes[at + 1], (byte >> 4) as i16, "{what}");
                        }
                    }
                }
            }
        }
    }
}

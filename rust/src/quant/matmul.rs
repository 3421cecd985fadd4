//! Fused mat-mul for a batch of `n` activation rows: `Y (n, rows) = X (n, cols) W^T`.
//!
//! Small batches (n < 4) are `n` mat-vecs (each reads the packed weights once).
//! Larger batches of 4-bit weights on AVX-512 VNNI run the int16-activation
//! kernel of [`super::gemm_vnni`]. Other larger batches are compute-bound: the
//! weights are dequantized one tile of rows at a time (about 1 MiB of float32, so it stays in the core's cache),
//! and each tile is multiplied with `X` by `matrixmultiply`'s packed SGEMM.
//! Only one tile per thread ever exists as floats; the full float matrix is
//! never materialised. Tiles run in parallel in the neuropil pool.

use rayon::prelude::*;

use super::dequantize::{dequant_row_at, fast_dequant};
use super::format::QuantRef;
use super::matvec::matvec_at;
use crate::error::{Error, Result};
use crate::simd::Level;

/// Below this batch size, `n` mat-vecs beat dequantize + SGEMM.
const MIN_GEMM_BATCH: usize = 4;

/// Rows per dequantized tile: ~256 Ki floats (1 MiB), a multiple of 8.
fn tile_rows(cols: usize) -> usize {
    ((1usize << 18) / cols.max(1)).clamp(8, 256) / 8 * 8
}

/// `out (n, rows) = x (n, cols) . W^T` at an explicit level.
pub fn matmul_at(
    level: Level,
    q: &QuantRef<'_>,
    x: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    level.check()?;
    let (rows, cols) = (q.rows, q.cols);
    if x.len() != n * cols {
        return Err(Error::shape(
            "x",
            format!("(n, {cols}) to match the weights' columns"),
            &[n, x.len() / n.max(1)],
        ));
    }
    if out.len() != n * rows {
        return Err(Error::shape("out", format!("({n}, {rows})"), &[out.len()]));
    }
    if n == 0 {
        // An empty batch: nothing to compute (and no GEMM tiling over 0 rows).
        return Ok(());
    }
    if n < MIN_GEMM_BATCH {
        let mut col = vec![0f32; rows];
        for i in 0..n {
            matvec_at(level, q, &x[i * cols..(i + 1) * cols], None, &mut col)?;
            out[i * rows..(i + 1) * rows].copy_from_slice(&col);
        }
        return Ok(());
    }
    if level == Level::Avx512 && super::gemm_vnni::applies(q) {
        // Huge activations run scaled down inside (see `headroom.rs`); the
        // SGEMM below multiplies dequantized weights with x directly and
        // needs no headroom.
        return super::gemm_vnni::matmul4(q, x, n, out);
    }
    let fast = fast_dequant(level);
    let tr = tile_rows(cols);
    let tiles: Vec<(usize, Vec<f32>)> = crate::threads::install(|| {
        (0..rows.div_ceil(tr))
            .into_par_iter()
            .map(|t| {
                let r0 = t * tr;
                let m = tr.min(rows - r0);
                let mut w = vec![0f32; m * cols];
                for (i, dst) in w.chunks_exact_mut(cols).enumerate() {
                    dequant_row_at(fast, q, r0 + i, dst);
                }
                let mut y = vec![0f32; n * m];
                // SAFETY: matrixmultiply reads x as n x cols (row stride cols),
                // w^T as cols x m (w is m x cols, so row stride 1, column stride
                // cols) and writes y as n x m (row stride m): every index stays
                // inside the three vectors, whose lengths are exactly those sizes.
                unsafe {
                    matrixmultiply::sgemm(
                        n,
                        cols,
                        m,
                        1.0,
                        x.as_ptr(),
                        cols as isize,
                        1,
                        w.as_ptr(),
                        1,
                        cols as isize,
                        0.0,
                        y.as_mut_ptr(),
                        m as isize,
                        1,
                    );
                }
                (r0, y)
            })
            .collect()
    })?;
    for (r0, y) in tiles {
        let m = y.len() / n;
        for i in 0..n {
            out[i * rows + r0..i * rows + r0 + m].copy_from_slice(&y[i * m..(i + 1) * m]);
        }
    }
    Ok(())
}

/// `X W^T` for `n` activation rows (`x` row-major, n x cols); returns n x rows.
pub fn matmul(q: &QuantRef<'_>, x: &[f32], n: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; n * q.rows];
    matmul_at(crate::simd::level()?, q, x, n, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::dequantize::dequantize;
    use super::super::format::{Params, ScaleType, Scheme};
    use super::super::quantize::quantize;
    use super::*;

    /// `x` after the per-group integer quantization of the VNNI kernels
    /// (`levels` = 127 for int8, 32767 for int16), back in f32.
    fn quantized_x(x: &[f32], g: usize, levels: f32) -> Vec<f32> {
        x.chunks(g)
            .flat_map(|grp| {
                let d = grp.iter().fold(0f32, |m, v| m.max(v.abs())) / levels;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                grp.iter()
                    .map(move |v| d * (v * inv).round().clamp(-levels, levels))
            })
            .collect()
    }

    #[test]
    fn matmul_matches_dequantized_product_for_every_batch_path() {
        // 70 rows: partial 16-row tiles and more than one 64-row task of the
        // VNNI kernel; 224 columns: a padded last group at g = 64 and 128
        // (GGUF schemes need a multiple of 32).
        let (rows, cols) = (70, 224);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 211) as f32 / 105.0 - 1.0)
            .collect();
        let cases = [
            (4, 32, Scheme::Asym),
            (4, 64, Scheme::Sym),
            (4, 128, Scheme::Asym),
            (4, 32, Scheme::Q4_0),
            (4, 32, Scheme::Q4_1),
            (8, 64, Scheme::Asym),
            (3, 64, Scheme::Sym),
        ];
        for (bits, g, scheme) in cases {
            let p = Params::new(bits, g, scheme, ScaleType::F16).unwrap();
            let q = quantize(&w, rows, cols, p, false).unwrap();
            let d = dequantize(&q.view()).unwrap();
            for n in [1usize, 3, 4, 9, 17] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0 + (i % 5) as f32 * 0.01)
                    .collect();
                for level in Level::supported() {
                    let mut y = vec![0f32; n * rows];
                    matmul_at(level, &q.view(), &x, n, &mut y).unwrap();
                    // 4-bit weights on AVX-512 VNNI quantize x per group to
                    // int16 (mat-vec and mat-mul): compare with exactly that x.
                    let vnni =
                        level == Level::Avx512 && super::super::gemm_vnni::applies(&q.view());
                    let levels = 32767.0;
                    for i in 0..n {
                        let xi = &x[i * cols..(i + 1) * cols];
                        let xe = if vnni {
                            quantized_x(xi, g, levels)
                        } else {
                            xi.to_vec()
                        };
                        for r in 0..rows {
                            let dr = &d[r * cols..(r + 1) * cols];
                            let want: f32 = dr.iter().zip(&xe).map(|(a, b)| a * b).sum();
                            let mag: f32 = dr.iter().zip(&xe).map(|(a, b)| (a * b).abs()).sum();
                            let got = y[i * rows + r];
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + mag),
                                "{level} {scheme:?} g{g} n={n} ({i}, {r}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        let p = Params::new(4, 32, Scheme::Asym, ScaleType::F16).unwrap();
        let q = quantize(&w, rows, cols, p, false).unwrap();
        assert!(matmul(&q.view(), &[0.0; 99], 1).is_err());
    }

    /// Batches with huge rows (the int16 VNNI kernel's group sums overflowed
    /// from max|x| ~ 3e37): each row, rescaled or not (below 2^96), is `2^64`
    /// times what the row `x / 2^64` gives, bit for bit.
    #[test]
    fn huge_activation_rows_do_not_overflow() {
        let (rows, cols, n) = (40, 320, 6);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 211) as f32 / 10500.0 - 0.01)
            .collect();
        let two64 = 18446744073709551616f32;
        let mags = [1.0f32, 1e36, 3e37, 1e20, 2e38, 1e30];
        let x: Vec<f32> = (0..n * cols)
            .map(|i| (((i * 31) % 17) as f32 / 8.0 - 1.0) * mags[i / cols])
            .collect();
        for p in super::super::matvec::tests::every_format() {
            let q = quantize(&w, rows, cols, p, false).unwrap();
            for level in Level::supported() {
                let mut y = vec![0f32; n * rows];
                matmul_at(level, &q.view(), &x, n, &mut y).unwrap();
                assert!(y.iter().all(|v| v.is_finite()), "{level} {p:?}");
                for i in 0..n {
                    let xi = &x[i * cols..(i + 1) * cols];
                    let small: Vec<f32> = xi.iter().map(|v| v / two64).collect();
                    let mut ys = vec![0f32; n * rows];
                    let mut batch = vec![0f32; n * cols];
                    // The same batch path: row i of a batch of n.
                    batch[i * cols..(i + 1) * cols].copy_from_slice(&small);
                    matmul_at(level, &q.view(), &batch, n, &mut ys).unwrap();
                    for r in 0..rows {
                        let (got, want) = (y[i * rows + r], ys[i * rows + r] * two64);
                        assert_eq!(got.to_bits(), want.to_bits(), "{level} {p:?} ({i}, {r})");
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_batch_is_an_empty_product_at_every_level() {
        let (rows, cols) = (24, 64);
        let w: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 - 6.0).collect();
        for scheme in [Scheme::Asym, Scheme::Q4_0] {
            let p = Params::new(4, 32, scheme, ScaleType::F16).unwrap();
            let q = quantize(&w, rows, cols, p, false).unwrap();
            for level in Level::supported() {
                matmul_at(level, &q.view(), &[], 0, &mut []).unwrap();
                // The shape checks still hold for n = 0.
                assert!(matmul_at(level, &q.view(), &[0.0; 3], 0, &mut []).is_err());
                assert!(matmul_at(level, &q.view(), &[], 0, &mut [0.0]).is_err());
            }
        }
    }
}

//! GGUF block formats `Q4_0`, `Q4_1` and `Q8_0`, to and from the planar layout.
//!
//! A GGUF tensor of shape (rows, cols) is `rows * cols / 32` blocks of 32
//! weights, in row-major order:
//! - `Q4_0` (18 bytes): f16 `d`, 16 bytes of nibbles; `w = d * (q - 8)`;
//! - `Q4_1` (20 bytes): f16 `d`, f16 `m`, 16 bytes of nibbles; `w = d * q + m`;
//! - `Q8_0` (34 bytes): f16 `d`, 32 signed bytes; `w = d * q`.
//!
//! The nibble order (`byte j = q[j] | q[j + 16] << 4`) is the 4-bit planar
//! layout with groups of 32, and a `Q8_0` byte is the planar 8-bit code with
//! its top bit flipped, so conversion copies bytes and never re-quantizes.

use super::format::{Params, QuantRef, QuantizedWeights, ScaleSlice, ScaleType, Scales, Scheme};
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Bytes of one block of the scheme (`None` for non-GGUF schemes).
pub fn block_bytes(scheme: Scheme) -> Option<usize> {
    match scheme {
        Scheme::Q4_0 => Some(18),
        Scheme::Q4_1 => Some(20),
        Scheme::Q8_0 => Some(34),
        Scheme::Asym | Scheme::Sym => None,
    }
}

fn f16_bits(s: ScaleSlice<'_>, i: usize) -> u16 {
    match s {
        ScaleSlice::F16(v) => v[i],
        ScaleSlice::F32(v) => half::f16::from_f32(v[i]).to_bits(),
    }
}

/// The GGUF bytes of a matrix quantized with a GGUF scheme.
pub fn to_gguf(q: &QuantRef<'_>) -> Result<Vec<u8>> {
    let bb = block_bytes(q.params.scheme).ok_or_else(|| {
        Error::value(
            "scheme",
            "one of q4_0, q4_1, q8_0 for GGUF export",
            q.params.scheme.name(),
        )
    })?;
    if !q.cols.is_multiple_of(32) {
        return Err(Error::value(
            "shape",
            "a column count divisible by 32",
            q.cols,
        ));
    }
    let blocks = q.rows * q.cols / 32;
    let gb = q.params.group_bytes();
    let q8 = q.params.scheme == Scheme::Q8_0;
    let mut out = vec![0u8; blocks * bb];
    super::pages::advise_huge(&out);
    // blocks in parallel, CHUNK at a time (each block's bytes are independent)
    crate::threads::install(|| {
        out.par_chunks_mut(bb * CHUNK)
            .zip(q.data.par_chunks(gb * CHUNK))
            .enumerate()
            .for_each(|(c, (dst, codes))| {
                for (i, (blk, src)) in dst
                    .chunks_exact_mut(bb)
                    .zip(codes.chunks_exact(gb))
                    .enumerate()
                {
                    let b = c * CHUNK + i;
                    blk[..2].copy_from_slice(&f16_bits(q.scales, b).to_le_bytes());
                    let at = match q.mins {
                        Some(m) => {
                            blk[2..4].copy_from_slice(&f16_bits(m, b).to_le_bytes());
                            4
                        }
                        None => 2,
                    };
                    if q8 {
                        for (o, u) in blk[at..].iter_mut().zip(src) {
                            *o = u ^ 0x80;
                        }
                    } else {
                        blk[at..].copy_from_slice(src);
                    }
                }
            })
    })?;
    Ok(out)
}

/// Blocks per parallel task in [`to_gguf`] and [`from_gguf`].
const CHUNK: usize = 1024;

/// Reads GGUF blocks of a (rows, cols) tensor. Fails with [`Error::Format`]
/// on a wrong length or a non-finite scale or min.
pub fn from_gguf(raw: &[u8], scheme: Scheme, rows: usize, cols: usize) -> Result<QuantizedWeights> {
    let bb = block_bytes(scheme)
        .ok_or_else(|| Error::value("scheme", "one of q4_0, q4_1, q8_0", scheme.name()))?;
    let (bits, g) = scheme.gguf_shape().unwrap_or((4, 32));
    let params = Params::new(bits, g, scheme, ScaleType::F16)?;
    if rows == 0 || cols == 0 || !cols.is_multiple_of(32) {
        return Err(Error::format(
            format!("GGUF {} tensor", scheme.name()),
            format!("shape ({rows}, {cols}) is not a non-empty multiple of 32 columns"),
        ));
    }
    let blocks = rows
        .checked_mul(cols / 32)
        .filter(|b| b.checked_mul(bb).is_some())
        .ok_or_else(|| {
            Error::format(
                "GGUF tensor",
                format!("shape ({rows}, {cols}) is too large"),
            )
        })?;
    if raw.len() != blocks * bb {
        return Err(Error::format(
            format!("GGUF {} tensor", scheme.name()),
            format!(
                "expected {} bytes for shape ({rows}, {cols}); got {}",
                blocks * bb,
                raw.len()
            ),
        ));
    }
    let gb = params.group_bytes();
    let has_min = scheme.has_min();
    let q8 = scheme == Scheme::Q8_0;
    let mut data = vec![0u8; blocks * gb];
    let mut scales = vec![0u16; blocks];
    let mut mins = vec![0u16; if has_min { blocks } else { 0 }];
    let per = if has_min { 2 } else { 1 };
    // blocks in parallel, CHUNK at a time; each task reports its first
    // block with a non-finite scale or min, the smallest one is the error
    let bad = crate::threads::install(|| {
        data.par_chunks_mut(gb * CHUNK)
            .zip(raw.par_chunks(bb * CHUNK))
            .zip(scales.par_chunks_mut(CHUNK))
            .enumerate()
            .filter_map(|(c, ((dst, src), sc))| {
                let mut first = None;
                for (i, (d, blk)) in dst
                    .chunks_exact_mut(gb)
                    .zip(src.chunks_exact(bb))
                    .enumerate()
                {
                    let v = u16::from_le_bytes([blk[0], blk[1]]);
                    sc[i] = v;
                    let at = 2 * per;
                    if q8 {
                        for (o, u) in d.iter_mut().zip(&blk[at..]) {
                            *o = u ^ 0x80;
                        }
                    } else {
                        d.copy_from_slice(&blk[at..]);
                    }
                    if first.is_none() && v & 0x7c00 == 0x7c00 {
                        first = Some((c * CHUNK + i, v, "scale"));
                    }
                    if has_min && first.is_none() {
                        let m = u16::from_le_bytes([blk[2], blk[3]]);
                        if m & 0x7c00 == 0x7c00 {
                            first = Some((c * CHUNK + i, m, "min"));
                        }
                    }
                }
                first
            })
            .min_by_key(|(b, _, _)| *b)
    })?;
    if let Some((b, v, what)) = bad {
        return Err(Error::format(
            format!("GGUF {} tensor", scheme.name()),
            format!(
                "block {b} has a non-finite {what} ({})",
                half::f16::from_bits(v)
            ),
        ));
    }
    if has_min {
        crate::threads::install(|| {
            mins.par_chunks_mut(CHUNK)
                .zip(raw.par_chunks(bb * CHUNK))
                .for_each(|(m, src)| {
                    for (mi, blk) in m.iter_mut().zip(src.chunks_exact(bb)) {
                        *mi = u16::from_le_bytes([blk[2], blk[3]]);
                    }
                })
        })?;
    }
    Ok(QuantizedWeights {
        params,
        rows,
        cols,
        data,
        scales: Scales::F16(scales),
        mins: scheme.has_min().then_some(Scales::F16(mins)),
    })
}

#[cfg(test)]
mod tests {
    use super::super::dequantize::dequantize;
    use super::super::quantize::quantize;
    use super::*;

    #[test]
    fn round_trip_and_known_block() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 / 8.0 - 4.0).collect();
        for scheme in [Scheme::Q4_0, Scheme::Q4_1, Scheme::Q8_0] {
            let (b, g) = scheme.gguf_shape().unwrap();
            let p = Params::new(b, g, scheme, ScaleType::F16).unwrap();
            let q = quantize(&w, 2, 32, p, false).unwrap();
            let raw = to_gguf(&q.view()).unwrap();
            assert_eq!(raw.len(), 2 * block_bytes(scheme).unwrap());
            let back = from_gguf(&raw, scheme, 2, 32).unwrap();
            assert_eq!(back, q);
            assert!(from_gguf(&raw[1..], scheme, 2, 32).is_err());
            let d = dequantize(&back.view()).unwrap();
            assert!(d.iter().zip(&w).all(|(a, b)| (a - b).abs() < 0.3));
        }
        // Q8_0 of a row 0..32 / 8 - 4: d = 4 / 127, first code -127.
        let p = Params::new(8, 32, Scheme::Q8_0, ScaleType::F16).unwrap();
        let q = quantize(&w[..32], 1, 32, p, false).unwrap();
        let raw = to_gguf(&q.view()).unwrap();
        assert_eq!(raw[2] as i8, -127);
        let mut bad = raw.clone();
        bad[1] = 0x7c;
        assert!(from_gguf(&bad, Scheme::Q8_0, 1, 32)
            .unwrap_err()
            .to_string()
            .contains("non-finite"));
        // many blocks (several parallel chunks): the first bad one is named
        let w: Vec<f32> = (0..64 * 3000)
            .map(|i| (i % 97) as f32 / 50.0 - 1.0)
            .collect();
        let p = Params::new(4, 32, Scheme::Q4_1, ScaleType::F16).unwrap();
        let q = quantize(&w, 3000, 64, p, false).unwrap();
        let mut raw = to_gguf(&q.view()).unwrap();
        assert_eq!(from_gguf(&raw, Scheme::Q4_1, 3000, 64).unwrap(), q);
        raw[5000 * 20 + 3] = 0x7c; // block 5000's min
        raw[5500 * 20 + 1] = 0xfc; // block 5500's scale
        let e = from_gguf(&raw, Scheme::Q4_1, 3000, 64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("block 5000 has a non-finite min"), "{e}");
    }
}

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
    let mut out = Vec::with_capacity(blocks * bb);
    for (b, codes) in q.data.chunks_exact(gb).enumerate() {
        out.extend_from_slice(&f16_bits(q.scales, b).to_le_bytes());
        if let Some(m) = q.mins {
            out.extend_from_slice(&f16_bits(m, b).to_le_bytes());
        }
        if q.params.scheme == Scheme::Q8_0 {
            out.extend(codes.iter().map(|u| u ^ 0x80));
        } else {
            out.extend_from_slice(codes);
        }
    }
    Ok(out)
}

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
    let mut data = Vec::with_capacity(blocks * gb);
    let mut scales = Vec::with_capacity(blocks);
    let mut mins = Vec::with_capacity(if scheme.has_min() { blocks } else { 0 });
    for (b, block) in raw.chunks_exact(bb).enumerate() {
        let d = u16::from_le_bytes([block[0], block[1]]);
        let mut at = 2;
        let check = |v: u16, what: &str| {
            if v & 0x7c00 == 0x7c00 {
                Err(Error::format(
                    format!("GGUF {} tensor", scheme.name()),
                    format!(
                        "block {b} has a non-finite {what} ({})",
                        half::f16::from_bits(v)
                    ),
                ))
            } else {
                Ok(())
            }
        };
        check(d, "scale")?;
        scales.push(d);
        if scheme.has_min() {
            let m = u16::from_le_bytes([block[2], block[3]]);
            check(m, "min")?;
            mins.push(m);
            at = 4;
        }
        if scheme == Scheme::Q8_0 {
            data.extend(block[at..].iter().map(|q| q ^ 0x80));
        } else {
            data.extend_from_slice(&block[at..]);
        }
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
    use super::super::quantize::{dequantize, quantize};
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
    }
}

//! Packing and unpacking one group of codes (the layouts documented in
//! [`super::format`]). Plain loops over fixed strides: LLVM vectorises them, and
//! the SIMD kernels inline them under their own target features.

/// Packs `codes` (each `< 2^bits`, `codes.len()` = group size) into `out`
/// (`group size * bits / 8` bytes).
#[inline(always)]
pub fn pack_group(bits: u8, codes: &[u8], out: &mut [u8]) {
    let g = codes.len();
    match bits {
        8 => out[..g].copy_from_slice(codes),
        4 => {
            let h = g / 2;
            for j in 0..h {
                out[j] = codes[j] | (codes[j + h] << 4);
            }
        }
        2 => pack2(codes, out),
        3 => {
            let q = g / 4;
            let mut low = [0u8; 256];
            for (l, c) in low[..g].iter_mut().zip(codes) {
                *l = c & 3;
            }
            pack2(&low[..g], &mut out[..q]);
            // bit plane k of the high bits, contiguous in j (vectorises)
            let e = g / 8;
            let high = &mut out[q..q + e];
            high.fill(0);
            for k in 0..8 {
                for (h, c) in high.iter_mut().zip(&codes[k * e..(k + 1) * e]) {
                    *h |= ((c >> 2) & 1) << k;
                }
            }
        }
        _ => unreachable!("bits validated by Params::new"),
    }
}

#[inline(always)]
fn pack2(codes: &[u8], out: &mut [u8]) {
    let q = codes.len() / 4;
    for j in 0..q {
        out[j] = codes[j] | (codes[j + q] << 2) | (codes[j + 2 * q] << 4) | (codes[j + 3 * q] << 6);
    }
}

/// Unpacks one group of `out.len()` codes from `bytes`, as f32 (what the
/// kernels multiply with activations).
#[inline(always)]
pub fn unpack_group_f32(bits: u8, bytes: &[u8], out: &mut [f32]) {
    let g = out.len();
    match bits {
        8 => {
            for (o, b) in out.iter_mut().zip(&bytes[..g]) {
                *o = *b as f32;
            }
        }
        4 => {
            let h = g / 2;
            let (lo, hi) = out.split_at_mut(h);
            for j in 0..h {
                let b = bytes[j];
                lo[j] = (b & 15) as f32;
                hi[j] = (b >> 4) as f32;
            }
        }
        2 => unpack2(bytes, out),
        3 => {
            let q = g / 4;
            unpack2(&bytes[..q], out);
            let e = g / 8;
            for k in 0..8 {
                for j in 0..e {
                    let hb = (bytes[q + j] >> k) & 1;
                    out[j + k * e] += (hb * 4) as f32;
                }
            }
        }
        _ => unreachable!("bits validated by Params::new"),
    }
}

#[inline(always)]
fn unpack2(bytes: &[u8], out: &mut [f32]) {
    let q = out.len() / 4;
    for k in 0..4 {
        let shift = 2 * k as u32;
        let part = &mut out[k * q..(k + 1) * q];
        for (o, b) in part.iter_mut().zip(&bytes[..q]) {
            *o = ((b >> shift) & 3) as f32;
        }
    }
}

/// Unpacks one group of `out.len()` codes from `bytes` as integers.
#[inline(always)]
pub fn unpack_group_u8(bits: u8, bytes: &[u8], out: &mut [u8]) {
    let g = out.len();
    match bits {
        8 => out.copy_from_slice(&bytes[..g]),
        4 => {
            let h = g / 2;
            let (lo, hi) = out.split_at_mut(h);
            for ((l, u), b) in lo.iter_mut().zip(hi.iter_mut()).zip(&bytes[..h]) {
                *l = b & 15;
                *u = b >> 4;
            }
        }
        2 => unpack2_u8(bytes, out),
        3 => {
            let q = g / 4;
            unpack2_u8(&bytes[..q], out);
            // SWAR: 4 bytes of the high plane at a time, one bit plane per k.
            let e = g / 8;
            for (c, h4) in bytes[q..q + e].chunks_exact(4).enumerate() {
                let h = u32::from_le_bytes([h4[0], h4[1], h4[2], h4[3]]);
                for k in 0..8 {
                    let at = k * e + 4 * c;
                    let o = &mut out[at..at + 4];
                    let v = u32::from_le_bytes([o[0], o[1], o[2], o[3]])
                        | (((h >> k) & 0x0101_0101) << 2);
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        _ => unreachable!("bits validated by Params::new"),
    }
}

/// 2-bit planes to bytes, SWAR over 4 packed bytes at a time.
#[inline(always)]
fn unpack2_u8(bytes: &[u8], out: &mut [u8]) {
    let q = out.len() / 4;
    for (c, b4) in bytes[..q].chunks_exact(4).enumerate() {
        let h = u32::from_le_bytes([b4[0], b4[1], b4[2], b4[3]]);
        for k in 0..4 {
            let at = k * q + 4 * c;
            out[at..at + 4].copy_from_slice(&((h >> (2 * k)) & 0x0303_0303).to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_unpack_round_trips(
            bits in prop::sample::select(vec![2u8, 3, 4, 8]),
            g in prop::sample::select(vec![32usize, 64, 128, 256]),
            seed in any::<u64>(),
        ) {
            let mut s = seed | 1;
            let codes: Vec<u8> = (0..g)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % (1u64 << bits)) as u8
                })
                .collect();
            let mut packed = vec![0u8; g * bits as usize / 8];
            pack_group(bits, &codes, &mut packed);
            let mut back = vec![0u8; g];
            unpack_group_u8(bits, &packed, &mut back);
            prop_assert_eq!(back, codes);
        }
    }

    #[test]
    fn four_bit_layout_is_ggml_order() {
        let codes: Vec<u8> = (0..32).map(|i| (i % 16) as u8).collect();
        let mut packed = [0u8; 16];
        pack_group(4, &codes, &mut packed);
        // byte j = code j | code (j + 16) << 4
        assert_eq!(packed[0], codes[0] | (codes[16] << 4));
        assert_eq!(packed[15], codes[15] | (codes[31] << 4));
    }
}

//! The float32-activation row dots of the mat-vec, one per level: the
//! paths for CPUs without AVX-512 VNNI, for `level=` overrides, and the
//! reference the VNNI path ([`super::vnni`]) is tested against.
//!
//! Per group `k` of row `r`: `y += scale * dot(u, x_k) + min * sum(x_k)`, with
//! the group sums of `x` computed once per call ([`Activations`]).
//! - 4-bit at AVX-512 or AVX2: hand-written kernels, nibbles widened to 16 or
//!   8 float lanes, FMA against the float32 activations;
//! - 2-, 3- and 8-bit at AVX-512 and AVX2: codes unpacked to bytes per group,
//!   then widened to float lanes (8-bit reads its codes in place; 2/3-bit
//!   groups at AVX-512 from their bit planes);
//! - scalar: portable loops.

use super::format::QuantRef;
use super::pack::unpack_group_u8;
use crate::simd::Level;

/// `x` padded with zeros to whole groups, and its per-group sums.
pub(crate) struct Activations {
    pub x: Vec<f32>,
    pub sums: Vec<f32>,
}

impl Activations {
    pub fn new(q: &QuantRef<'_>, x: &[f32]) -> Activations {
        let g = q.params.group_size;
        let mut xp = vec![0f32; q.params.padded_cols(q.cols)];
        xp[..x.len()].copy_from_slice(x);
        let sums = xp.chunks_exact(g).map(|c| c.iter().sum()).collect();
        Activations { x: xp, sums }
    }
}

/// Portable row kernel: unpack each group to integer codes, dot with `x`.
#[inline(always)]
fn row_generic(q: &QuantRef<'_>, r: usize, a: &Activations, s: &mut [f32], m: &mut [f32]) -> f32 {
    let p = &q.params;
    let (g, gb) = (p.group_size, p.group_bytes());
    q.row_scales(r, s, m);
    let mut buf = [0u8; 256];
    let mut acc = 0f32;
    for (k, bytes) in q.row(r).chunks_exact(gb).enumerate() {
        let codes: &[u8] = if p.bits == 8 {
            bytes
        } else {
            unpack_group_u8(p.bits, bytes, &mut buf[..g]);
            &buf[..g]
        };
        let mut lanes = [0f32; 16];
        for (c, x) in codes
            .chunks_exact(16)
            .zip(a.x[k * g..(k + 1) * g].chunks_exact(16))
        {
            for i in 0..16 {
                lanes[i] += c[i] as f32 * x[i];
            }
        }
        acc += s[k] * lanes.iter().sum::<f32>() + m[k] * a.sums[k];
    }
    acc
}

/// Any width, AVX2: codes unpacked to bytes, 8 at a time widened to float lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_generic_avx2(
    q: &QuantRef<'_>,
    r: usize,
    a: &Activations,
    s: &mut [f32],
    m: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    let p = &q.params;
    let (g, gb) = (p.group_size, p.group_bytes());
    q.row_scales(r, s, m);
    let mut buf = [0u8; 256];
    let mut acc = _mm256_setzero_ps();
    let mut tail = 0f32;
    for (k, bytes) in q.row(r).chunks_exact(gb).enumerate() {
        let codes: &[u8] = if p.bits == 8 {
            bytes
        } else {
            unpack_group_u8(p.bits, bytes, &mut buf[..g]);
            &buf[..g]
        };
        let (pc, px) = (codes.as_ptr(), a.x[k * g..].as_ptr());
        let mut d0 = _mm256_setzero_ps();
        let mut d1 = _mm256_setzero_ps();
        let mut c = 0;
        while c < g {
            // SAFETY: codes holds g bytes and x from k*g holds >= g floats; c + 16 <= g (g % 32 == 0).
            unsafe {
                let v0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    pc.add(c) as *const __m128i
                )));
                let v1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    pc.add(c + 8) as *const __m128i
                )));
                d0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(px.add(c)), d0);
                d1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(px.add(c + 8)), d1);
            }
            c += 16;
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s[k]), _mm256_add_ps(d0, d1), acc);
        tail += m[k] * a.sums[k];
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    lanes.iter().sum::<f32>() + tail
}

/// 2, 3 and 8 bits, AVX-512: 8-bit codes read in place and 2/3-bit codes from
/// their bit planes, 16 at a time widened to float lanes; scales and mins converted 16 groups at a
/// time with F16C (a per-row scalar f16 conversion cost as much as the codes),
/// each group's dot scaled by its lane of the scale vector, the min term as one
/// vector dot per 16 groups.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn row_generic_avx512(
    q: &QuantRef<'_>,
    r: usize,
    a: &Activations,
    _s: &mut [f32],
    _m: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    let p = &q.params;
    let (g, gb) = (p.group_size, p.group_bytes());
    let ng = q.groups();
    let row = q.row(r);
    let off = -(p.offset() as f32);
    let mut acc = _mm512_setzero_ps();
    let mut macc = _mm512_setzero_ps();
    let mut k16 = 0;
    while k16 < ng {
        let n = (ng - k16).min(16);
        // SAFETY: groups k16..k16 + n exist in row r (lanes16 masks the rest);
        // `sums` has one entry per group, read with the same mask.
        let sv = unsafe {
            let sv = lanes16(q.scales, r * ng + k16, n);
            let mv = match q.mins {
                Some(m) => lanes16(m, r * ng + k16, n),
                None => _mm512_mul_ps(sv, _mm512_set1_ps(off)),
            };
            let mask = if n >= 16 {
                0xffff
            } else {
                ((1u32 << n) - 1) as __mmask16
            };
            let sums = _mm512_maskz_loadu_ps(mask, a.sums.as_ptr().add(k16));
            macc = _mm512_fmadd_ps(mv, sums, macc);
            sv
        };
        for kk in 0..n {
            let k = k16 + kk;
            let bytes = &row[k * gb..(k + 1) * gb];
            if p.bits == 2 || p.bits == 3 {
                // SAFETY: AVX-512 F/BW/VL (this function's features); `bytes` is one
                // whole group and x from k * g holds >= g floats.
                let d = unsafe { planes_dot(p.bits, bytes, &a.x[k * g..(k + 1) * g]) };
                let sk = _mm512_permutexvar_ps(_mm512_set1_epi32(kk as i32), sv);
                acc = _mm512_fmadd_ps(sk, d, acc);
                continue;
            }
            // 8-bit codes are whole bytes, read in place (4-bit rows take
            // `row4_avx512`, 2/3-bit groups `planes_dot` above).
            debug_assert_eq!(p.bits, 8);
            let (pc, px) = (bytes.as_ptr(), a.x[k * g..].as_ptr());
            let mut d0 = _mm512_setzero_ps();
            let mut d1 = _mm512_setzero_ps();
            let mut c = 0;
            while c < g {
                // SAFETY: codes holds g bytes and x from k*g holds >= g floats; c + 32 <= g.
                unsafe {
                    let v0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                        pc.add(c) as *const __m128i
                    )));
                    let v1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                        pc.add(c + 16) as *const __m128i,
                    )));
                    d0 = _mm512_fmadd_ps(v0, _mm512_loadu_ps(px.add(c)), d0);
                    d1 = _mm512_fmadd_ps(v1, _mm512_loadu_ps(px.add(c + 16)), d1);
                }
                c += 32;
            }
            let sk = _mm512_permutexvar_ps(_mm512_set1_epi32(kk as i32), sv);
            acc = _mm512_fmadd_ps(sk, _mm512_add_ps(d0, d1), acc);
        }
        k16 += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc, macc))
}

/// `sum_v code_v x_v` over one 2- or 3-bit group (`x.len()` = g codes), read
/// straight from its bit planes into registers.
///
/// Unpacking to a byte buffer first (the generic path) stalls every reload on
/// store forwarding: the 4-byte stores cannot feed the 16-byte loads. Layout
/// ([`super::pack`]): byte `c` of the first `g / 4` bytes holds codes `c`,
/// `c + g/4`, `c + g/2`, `c + 3g/4` in bit pairs 0-1 .. 6-7; for 3 bits, bit
/// `b` of byte `c` of the next `g / 8` bytes is bit 2 of code `b g/8 + c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn planes_dot(bits: u8, bytes: &[u8], x: &[f32]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let g = x.len();
    let (q, e) = (g / 4, g / 8);
    debug_assert!(bytes.len() == g * bits as usize / 8 && e.is_power_of_two());
    let iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let (three, one) = (_mm512_set1_epi32(3), _mm512_set1_epi32(1));
    // The high plane's e <= 32 bytes as i32 lanes (two registers when e = 32).
    let (h0, h1) = if bits == 3 {
        let m0 = if e >= 16 { 0xffff } else { (1u16 << e) - 1 };
        let m1 = if e > 16 {
            ((1u32 << (e - 16)) - 1) as u16
        } else {
            0
        };
        // SAFETY: the masks cover bytes q..q + e of the group only.
        unsafe {
            (
                _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m0, bytes.as_ptr().add(q) as *const i8)),
                _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(
                    m1,
                    bytes.as_ptr().add(q + 16) as *const i8,
                )),
            )
        }
    } else {
        (_mm512_setzero_si512(), _mm512_setzero_si512())
    };
    let log_e = _mm512_set1_epi32(e.trailing_zeros() as i32);
    let mut d = _mm512_setzero_ps();
    let mut j = 0;
    while j < q {
        let n = (q - j).min(16);
        let mask = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
        // SAFETY: the mask keeps the load inside bytes j..j + n < q of the group.
        let v = unsafe {
            _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(
                mask,
                bytes.as_ptr().add(j) as *const i8,
            ))
        };
        let t = _mm512_add_epi32(iota, _mm512_set1_epi32(j as i32));
        for plane in 0..4 {
            let mut c = _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(2 * plane)), three);
            if bits == 3 {
                // Code plane * q + t = (2 plane + t / e) e + t % e: its bit 2 is
                // bit (2 plane + t / e) of high byte t % e.
                let byte = _mm512_and_si512(t, _mm512_set1_epi32(e as i32 - 1));
                let bit =
                    _mm512_add_epi32(_mm512_set1_epi32(2 * plane), _mm512_srlv_epi32(t, log_e));
                let hv = _mm512_permutex2var_epi32(h0, byte, h1);
                let hi = _mm512_and_si512(_mm512_srlv_epi32(hv, bit), one);
                c = _mm512_or_si512(c, _mm512_slli_epi32(hi, 2));
            }
            // SAFETY: codes plane * q + j .. + n are inside the group's g floats.
            let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add(plane as usize * q + j)) };
            d = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), xv, d);
        }
        j += 16;
    }
    d
}

/// The scales (or mins) of groups `start..start + n` of a scale slice as 16
/// float lanes, zeros past `n` (`n` at most the groups left in the slice).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn lanes16(
    s: super::format::ScaleSlice<'_>,
    start: usize,
    n: usize,
) -> std::arch::x86_64::__m512 {
    use super::format::ScaleSlice;
    use std::arch::x86_64::*;
    let mask: __mmask16 = if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    };
    match s {
        // SAFETY: the mask enables only lanes start..start+n, all inside the slice
        // (the caller passes n <= groups left in the row).
        ScaleSlice::F16(v) => unsafe {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask,
                v.as_ptr().add(start) as *const i16,
            ))
        },
        // SAFETY: as above.
        ScaleSlice::F32(v) => unsafe { _mm512_maskz_loadu_ps(mask, v.as_ptr().add(start)) },
    }
}

/// 4-bit, AVX-512: 16 bytes -> 16 low and 16 high nibbles as float lanes;
/// scales converted 16 groups at a time, the min term as one vector dot.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn row4_avx512(
    q: &QuantRef<'_>,
    r: usize,
    a: &Activations,
    _s: &mut [f32],
    _m: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    let g = q.params.group_size;
    let h = g / 2;
    let ng = q.groups();
    let data = q.row(r);
    let (px, pd) = (a.x.as_ptr(), data.as_ptr());
    let mask = _mm512_set1_epi32(15);
    let off = -(q.params.offset() as f32);
    let mut acc = _mm512_setzero_ps();
    let mut macc = _mm512_setzero_ps();
    let mut sl = [0f32; 16];
    let mut k0 = 0;
    while k0 < ng {
        let n = (ng - k0).min(16);
        let lmask: __mmask16 = if n >= 16 {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        };
        // SAFETY: n <= groups left in row r; the scale/min slices hold rows * ng entries.
        let sv = unsafe { lanes16(q.scales, r * ng + k0, n) };
        let mv = match q.mins {
            // SAFETY: as above.
            Some(m) => unsafe { lanes16(m, r * ng + k0, n) },
            None => _mm512_mul_ps(sv, _mm512_set1_ps(off)),
        };
        // SAFETY: a.sums holds ng floats; the mask keeps lanes inside k0..k0+n.
        let xs = unsafe { _mm512_maskz_loadu_ps(lmask, a.sums.as_ptr().add(k0)) };
        macc = _mm512_fmadd_ps(mv, xs, macc);
        // SAFETY: `sl` holds 16 floats.
        unsafe { _mm512_storeu_ps(sl.as_mut_ptr(), sv) };
        for (j, sk) in sl.iter().enumerate().take(n) {
            let k = k0 + j;
            let mut lo_acc = _mm512_setzero_ps();
            let mut hi_acc = _mm512_setzero_ps();
            let mut c = 0;
            while c < h {
                // SAFETY: the row holds ng * g/2 bytes and x holds ng * g floats
                // (checked by QuantRef::new / Activations::new); c + 16 <= h, g % 32 == 0.
                unsafe {
                    let b = _mm_loadu_si128(pd.add(k * h + c) as *const __m128i);
                    let v = _mm512_cvtepu8_epi32(b);
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                    lo_acc = _mm512_fmadd_ps(lo, _mm512_loadu_ps(px.add(k * g + c)), lo_acc);
                    hi_acc = _mm512_fmadd_ps(hi, _mm512_loadu_ps(px.add(k * g + h + c)), hi_acc);
                }
                c += 16;
            }
            acc = _mm512_fmadd_ps(_mm512_set1_ps(*sk), _mm512_add_ps(lo_acc, hi_acc), acc);
        }
        k0 += n;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc, macc))
}

/// 4-bit, AVX2: 8 bytes -> 8 low and 8 high nibbles as float lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row4_avx2(
    q: &QuantRef<'_>,
    r: usize,
    a: &Activations,
    s: &mut [f32],
    m: &mut [f32],
) -> f32 {
    use std::arch::x86_64::*;
    q.row_scales(r, s, m);
    let g = q.params.group_size;
    let h = g / 2;
    let data = q.row(r);
    let (px, pd) = (a.x.as_ptr(), data.as_ptr());
    let mask = _mm256_set1_epi32(15);
    let mut acc = _mm256_setzero_ps();
    let mut tail = 0f32;
    for k in 0..s.len() {
        let mut lo_acc = _mm256_setzero_ps();
        let mut hi_acc = _mm256_setzero_ps();
        let mut c = 0;
        while c < h {
            // SAFETY: as in row4_avx512; c + 8 <= h.
            unsafe {
                let b = _mm_loadl_epi64(pd.add(k * h + c) as *const __m128i);
                let v = _mm256_cvtepu8_epi32(b);
                let lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
                let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                lo_acc = _mm256_fmadd_ps(lo, _mm256_loadu_ps(px.add(k * g + c)), lo_acc);
                hi_acc = _mm256_fmadd_ps(hi, _mm256_loadu_ps(px.add(k * g + h + c)), hi_acc);
            }
            c += 8;
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s[k]), _mm256_add_ps(lo_acc, hi_acc), acc);
        tail += m[k] * a.sums[k];
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    lanes.iter().sum::<f32>() + tail
}

/// One output row at `level` (already checked).
#[inline]
pub(super) fn row_at(
    level: Level,
    q: &QuantRef<'_>,
    r: usize,
    a: &Activations,
    s: &mut [f32],
    m: &mut [f32],
) -> f32 {
    let four = q.params.bits == 4;
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level passed `Level::check` (AVX-512 F/BW/VL).
        Level::Avx512 if four => unsafe { row4_avx512(q, r, a, s, m) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level passed `Level::check` (AVX-512 F/BW/VL, which implies AVX2 + FMA here).
        Level::Avx512 => unsafe { row_generic_avx512(q, r, a, s, m) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level passed `Level::check` (AVX2 + FMA).
        Level::Avx2 if four => unsafe { row4_avx2(q, r, a, s, m) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level passed `Level::check` (AVX2 + FMA).
        Level::Avx2 => unsafe { row_generic_avx2(q, r, a, s, m) },
        _ => row_generic(q, r, a, s, m),
    }
}

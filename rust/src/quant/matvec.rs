//! Fused mat-vec: `y[r] = sum_c deq(W)[r, c] * x[c]` straight from packed codes.
//!
//! Per group `k` of row `r`: `y += scale * dot(u, x_k) + min * sum(x_k)`, with
//! the group sums of `x` computed once per call, so the float matrix is never
//! materialised.
//!
//! Paths (chosen per call from the SIMD level and the bit width):
//! - every width at the AVX-512 level on a CPU with VNNI: int16 activations per
//!   group (14-bit for 3-bit codes) and `vpdpwssd` (see `vnni.rs`; error bounded
//!   by the activation rounding);
//! - 4-bit at AVX-512 (no VNNI) or AVX2: hand-written kernels, nibbles widened
//!   to 16 or 8 float lanes, FMA against float32 activations;
//! - 2-, 3- and 8-bit at AVX-512 without VNNI and at AVX2: codes unpacked to bytes
//!   per group, then widened to float lanes (8-bit reads its codes in place),
//!   float32 activations;
//! - scalar: portable loops, float32 activations.
//!
//! Rows run in parallel, in pieces, on the caller and the short-call team's
//! helpers ([`crate::threads::team`]). [`matvec_rows`] computes a
//! subset of rows, for callers that know which outputs they need (sparse FFNs).

use super::format::QuantRef;
use super::pack::unpack_group_u8;
use crate::error::{Error, Result};
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

/// Scales (and mins) of groups `k0..k0+16` of row `r` as 16 float lanes;
/// lanes past the row's last group are zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn lanes16(
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
fn row_at(
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

/// How many rows ahead [`prefetch_row`] asks for.
const PREFETCH_ROWS: usize = 4;

/// Asks the memory system for row `r`'s codes (memory-level parallelism beyond
/// what the hardware prefetcher keeps in flight for one core).
#[inline]
fn prefetch_row(q: &QuantRef<'_>, r: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for line in q.row(r).chunks(64) {
            // SAFETY: prefetch never faults, and the address is inside the row.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (q, r);
}

fn check_x(q: &QuantRef<'_>, x: &[f32]) -> Result<()> {
    if x.len() != q.cols {
        return Err(Error::shape(
            "x",
            format!("({},) to match the weights' columns", q.cols),
            &[x.len()],
        ));
    }
    Ok(())
}

/// `out[i] = row(rows[i]) . x` (all rows when `rows` is `None`) at an explicit level.
pub fn matvec_at(
    level: Level,
    q: &QuantRef<'_>,
    x: &[f32],
    rows: Option<&[u32]>,
    out: &mut [f32],
) -> Result<()> {
    level.check()?;
    check_x(q, x)?;
    let n = rows.map_or(q.rows, <[u32]>::len);
    if out.len() != n {
        return Err(Error::shape("out", format!("({n},)"), &[out.len()]));
    }
    if let Some(idx) = rows {
        if let Some(bad) = idx.iter().find(|&&i| i as usize >= q.rows) {
            return Err(Error::Index {
                arg: "rows",
                index: *bad as i64,
                len: q.rows,
            });
        }
    }
    let ng = q.groups();
    let pieces = pieces(n * q.params.row_bytes(q.cols))?;
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && super::vnni::applies(q) {
        let a = super::act16::Int16Activations::new(q, x);
        let task = |(start, o): (usize, &mut [f32])| {
            for (i, y) in o.iter_mut().enumerate() {
                let j = start + i;
                let r = rows.map_or(j, |idx| idx[j] as usize);
                // SAFETY: `applies()` proved AVX-512 F/BW/VL + VNNI and 4- or
                // 8-bit weights; `a` was built from `q`; r < q.rows (checked above).
                *y = unsafe { super::vnni::row_vnni(q, r, &a) };
            }
        };
        return for_each_piece(out, pieces, task);
    }
    let a = Activations::new(q, x);
    let n_out = out.len();
    let task = |(start, o): (usize, &mut [f32])| {
        let mut s = vec![0f32; ng];
        let mut m = vec![0f32; ng];
        for (i, y) in o.iter_mut().enumerate() {
            let j = start + i;
            let r = rows.map_or(j, |idx| idx[j] as usize);
            if j + PREFETCH_ROWS < n_out && level != Level::Scalar {
                prefetch_row(
                    q,
                    rows.map_or(j + PREFETCH_ROWS, |idx| idx[j + PREFETCH_ROWS] as usize),
                );
            }
            *y = row_at(level, q, r, &a, &mut s, &mut m);
        }
    };
    for_each_piece(out, pieces, task)
}

/// Below this many bytes of codes a call is short (~50 us of one core's work;
/// SmolLM2's layers all fall under it), and is cut into [`SHORT_PIECES`]
/// pieces, so the caller and a helper that arrives late still balance.
const SHORT_BYTES: usize = 1 << 20;
const SHORT_PIECES: usize = 8;

/// A long call's pieces hold about this many bytes of codes each, between one
/// and three per thread. Each piece is a fresh stream, whose first lines wait
/// on memory before the prefetchers catch up, so fewer, longer pieces stream
/// faster; a few per thread still balance a thread that falls behind. Measured
/// on Zen 5 (2 threads), the 16 x 4096x4096 4-bit stack in alternation: 4-8
/// pieces per layer 37-46 GB/s, 12-32 pieces 29-37 GB/s.
const PIECE_BYTES: usize = 1 << 20;

/// How many pieces a call reading `bytes` of codes is cut into.
fn pieces(bytes: usize) -> Result<usize> {
    if bytes < SHORT_BYTES {
        return Ok(SHORT_PIECES);
    }
    let threads = crate::threads::num_threads()?;
    Ok((bytes / PIECE_BYTES).clamp(threads, 3 * threads))
}

/// Runs `task((first row, rows))` on `pieces` pieces of `out` (16-row
/// multiples) in the team ([`crate::threads::team`]), long calls too: handing
/// a call to the rayon pool wakes a sleeping worker and joins it, 5-16 us a
/// call, which a stack of layers pays once per layer, where the team's helpers
/// are still awake from the layer before. Measured on Zen 5 (2 threads), the
/// 16 x 4096x4096 4-bit stack called layer by layer: 32-43 GB/s through the
/// pool, 37-47 in the team (per-round medians in alternation: +5%, the team
/// ahead in 11 of 16 rounds); one 65536x4096 matrix 43-48 (the read bandwidth).
fn for_each_piece<F>(out: &mut [f32], pieces: usize, task: F) -> Result<()>
where
    F: Fn((usize, &mut [f32])) + Sync + Send,
{
    let piece = out.len().div_ceil(pieces).next_multiple_of(16);
    crate::threads::team::for_each_chunk(out, piece, |c, o| task((c * piece, o)))
}

/// `W x` for one vector `x` of length `cols`; returns `rows` outputs.
pub fn matvec(q: &QuantRef<'_>, x: &[f32]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; q.rows];
    matvec_at(crate::simd::level()?, q, x, None, &mut out)?;
    Ok(out)
}

/// The selected rows of `W x`: `out[i] = W[rows[i]] . x`. Indices may repeat
/// and come in any order; one out of range is an [`Error::Index`].
pub fn matvec_rows(q: &QuantRef<'_>, x: &[f32], rows: &[u32]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; rows.len()];
    matvec_at(crate::simd::level()?, q, x, Some(rows), &mut out)?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::dequantize::dequantize;
    use super::super::format::{Params, ScaleType, Scheme};
    use super::super::quantize::quantize;
    use super::*;
    use proptest::prelude::*;

    fn data(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// How far int16 activations (the VNNI path) may move a row's dot product.
    pub(crate) fn int16_bound(w: &[f32], x: &[f32], g: usize) -> f64 {
        x.chunks(g)
            .zip(w.chunks(g))
            .map(|(xs, ws)| {
                let dx = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 32767.0;
                dx / 2.0 * ws.iter().map(|v| v.abs() as f64).sum::<f64>() * 1.01
            })
            .sum()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn every_level_matches_dequantized_reference(
            bits in prop::sample::select(vec![2u8, 3, 4, 8]),
            g in prop::sample::select(vec![32usize, 64, 128, 256]),
            scheme in prop::sample::select(vec![Scheme::Asym, Scheme::Sym]),
            rows in 1usize..9,
            // up to 37 groups at g = 32: whole 16-group blocks and a remainder
            cols in 1usize..1200,
            seed in any::<u64>(),
        ) {
            let p = Params::new(bits, g, scheme, ScaleType::F16).unwrap();
            let w = data(seed, rows * cols);
            let x = data(seed ^ 0x5555, cols);
            let q = quantize(&w, rows, cols, p, false).unwrap();
            let d = dequantize(&q.view()).unwrap();
            for level in Level::supported() {
                let mut y = vec![0f32; rows];
                matvec_at(level, &q.view(), &x, None, &mut y).unwrap();
                for r in 0..rows {
                    let want: f64 = (0..cols).map(|c| d[r * cols + c] as f64 * x[c] as f64).sum();
                    let mut tol = 1e-4 * (cols as f64).sqrt() * (1.0 + want.abs());
                    if level == Level::Avx512 && (bits == 4 || bits == 8) {
                        tol += int16_bound(&d[r * cols..(r + 1) * cols], &x, g);
                    }
                    prop_assert!((y[r] as f64 - want).abs() <= tol, "{level} row {r}: {} vs {want}", y[r]);
                }
                let pick = [rows as u32 - 1, 0, rows as u32 - 1];
                let mut ys = vec![0f32; 3];
                matvec_at(level, &q.view(), &x, Some(&pick), &mut ys).unwrap();
                prop_assert_eq!(ys[0].to_bits(), y[rows - 1].to_bits());
                prop_assert_eq!(ys[1].to_bits(), y[0].to_bits());
            }
        }
    }

    #[test]
    fn a_long_call_in_pieces_matches_row_by_row() {
        // 2.6 MiB of 4-bit codes: a long call, cut into several pieces whose
        // sizes do not divide the 4099 rows (the last piece is short).
        let (rows, cols) = (4099, 1280);
        let p = Params::new(4, 64, Scheme::Asym, ScaleType::F16).unwrap();
        let q = quantize(&data(7, rows * cols), rows, cols, p, false).unwrap();
        let bytes = rows * p.row_bytes(cols);
        assert!(bytes >= SHORT_BYTES);
        let x = data(8, cols);
        for level in Level::supported() {
            let mut y = vec![f32::NAN; rows];
            matvec_at(level, &q.view(), &x, None, &mut y).unwrap();
            // Each row alone (a short call of one row) gives the same bits.
            for r in [0, 1, 15, 16, 1023, 2048, 4095, 4096, 4098] {
                let mut one = [0f32];
                matvec_at(level, &q.view(), &x, Some(&[r as u32]), &mut one).unwrap();
                assert_eq!(y[r].to_bits(), one[0].to_bits(), "{level} row {r}");
            }
            assert!(
                y.iter().all(|v| v.is_finite()),
                "{level}: a row was not written"
            );
        }
    }

    #[test]
    fn bad_arguments() {
        let p = Params::new(4, 32, Scheme::Asym, ScaleType::F16).unwrap();
        let q = quantize(&data(1, 64), 2, 32, p, false).unwrap();
        let e = matvec(&q.view(), &[0.0; 31]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x must have shape (32,) to match the weights' columns; got (31,)"
        );
        let e = matvec_rows(&q.view(), &[0.0; 32], &[0, 2]).unwrap_err();
        assert_eq!(e.to_string(), "rows index 2 is out of range for length 2");
    }
}

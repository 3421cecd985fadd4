//! A rigorous 8-bit upper bound of `q . k` for every key, in integer arithmetic.
//!
//! Keys are rotated into their principal basis and centred (`k_rot = V^T (k - mu)`),
//! then each rotated dimension `j` is quantised with its own scale `s_j`
//! (`k_rot_j = s_j c_j + e_j`, `c_j` in -127..=127, `|e_j| <= s_j / 2`). A query
//! is rotated the same way and `a_j = q_rot_j s_j` is quantised with one scale
//! `sigma` (`a_j = sigma b_j + f_j`, `|f_j| <= sigma / 2`). Then exactly
//!
//! `q . k = q.mu + sigma (b . c) + sum_j f_j c_j + sum_j q_rot_j e_j`
//!
//! `<= q.mu + sigma (b . c) + (sigma / 2) |c|_1 + sum_j |q_rot_j| s_j / 2`,
//!
//! where `b . c` is an exact integer (AVX-512 VNNI `vpdpbusd`, or portable
//! integer code). The bound is tight to a fraction of a percent of the score
//! range and costs a quarter of the f32 scan's memory and far fewer
//! instructions, so only the keys that can reach the threshold (typically a
//! few percent at a top-1% threshold) get their exact f32 score.

use super::kernel::LANES;
use crate::simd::Level;

/// 8-bit codes of the rotated keys, in blocks: `codes[b * d4 * 64 + g * 64 + lane * 4 + i]`
/// holds dimension `4 g + i` of key `lane`, stored as `c + 128` (u8).
#[derive(Debug, Clone)]
pub struct Codes {
    /// Dimension groups of 4 (d rounded up to a multiple of 4, divided by 4).
    pub d4: usize,
    /// Scale of each rotated dimension (length `d`).
    pub scale: Vec<f64>,
    pub codes: Vec<u8>,
    /// `|c|_1` per key (`l1[b * 16 + lane]`).
    pub l1: Vec<f32>,
}

impl Codes {
    /// Quantises rotated keys given in block order (`rot[pos * d + j]`, f64).
    pub fn build(rot: &[f64], d: usize, nb: usize) -> Codes {
        let n = rot.len() / d;
        let d4 = d.div_ceil(4);
        let mut scale = vec![0.0f64; d];
        for r in rot.chunks_exact(d) {
            for (s, &x) in scale.iter_mut().zip(r) {
                *s = s.max(x.abs());
            }
        }
        for s in &mut scale {
            *s = if *s > 0.0 { *s / 127.0 } else { 1.0 };
        }
        let mut codes = vec![128u8; nb * d4 * 64];
        let mut l1 = vec![0.0f32; nb * LANES];
        for pos in 0..n {
            let (b, lane) = (pos / LANES, pos % LANES);
            let mut sum = 0i32;
            for j in 0..d {
                let c = (rot[pos * d + j] / scale[j]).round().clamp(-127.0, 127.0) as i32;
                sum += c.abs();
                codes[b * d4 * 64 + (j / 4) * 64 + lane * 4 + j % 4] = (c + 128) as u8;
            }
            l1[b * LANES + lane] = sum as f32;
        }
        Codes {
            d4,
            scale,
            codes,
            l1,
        }
    }

    /// The codes of block `b`.
    #[inline]
    pub fn block(&self, b: usize) -> &[u8] {
        &self.codes[b * self.d4 * 64..(b + 1) * self.d4 * 64]
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + self.l1.len() * 4
    }
}

/// A query quantised against [`Codes`].
#[derive(Debug, Clone)]
pub struct QueryCodes {
    /// `b_j` packed 4 per i32 (little-endian bytes), `d4` words.
    pub words: Vec<i32>,
    /// `b_j` as i8, padded to `4 d4`.
    pub b: Vec<i8>,
    /// `128 * sum_j b_j` (the offset of the u8 key codes).
    pub offset: i32,
    pub sigma: f64,
    /// `sum_j |q_rot_j| s_j / 2`, rounded up.
    pub err: f64,
}

impl QueryCodes {
    pub fn new(codes: &Codes, qrot: &[f64]) -> QueryCodes {
        let d = codes.scale.len();
        let a: Vec<f64> = (0..d).map(|j| qrot[j] * codes.scale[j]).collect();
        let amax = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let sigma = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        let mut b = vec![0i8; codes.d4 * 4];
        for j in 0..d {
            b[j] = (a[j] / sigma).round().clamp(-127.0, 127.0) as i8;
        }
        let words = b
            .chunks_exact(4)
            .map(|w| i32::from_le_bytes([w[0] as u8, w[1] as u8, w[2] as u8, w[3] as u8]))
            .collect();
        let offset = 128 * b.iter().map(|&x| x as i32).sum::<i32>();
        let err = (0..d)
            .map(|j| qrot[j].abs() * codes.scale[j] * 0.5)
            .sum::<f64>()
            * (1.0 + 1e-9);
        QueryCodes {
            words,
            b,
            offset,
            sigma,
            err,
        }
    }
}

/// Whether the VNNI kernel can run (AVX-512 level and `avx512vnni`).
pub fn has_vnni(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level == Level::Avx512 && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        false
    }
}

/// Exact integer dot products `b . c` of one query with the 16 keys of a block.
#[inline]
pub fn int_dots(level: Level, vnni: bool, q: &QueryCodes, block: &[u8], out: &mut [i32; LANES]) {
    debug_assert!(block.len() >= q.words.len() * 64);
    #[cfg(target_arch = "x86_64")]
    {
        if vnni {
            // SAFETY: `vnni` is only true when `has_vnni` saw AVX-512 F and VNNI on
            // this CPU; the block holds d4 * 64 bytes (asserted above).
            unsafe { int_vnni(q, block, out) };
            return;
        }
        if level == Level::Avx2 || level == Level::Avx512 {
            // SAFETY: AVX2 is part of both levels, which passed `Level::check()`.
            unsafe { int_avx2(q, block, out) };
            return;
        }
    }
    let _ = (level, vnni);
    int_portable(q, block, out);
}

/// Appends to `out` the position (`b * 16 + lane`) of every key in blocks
/// `first..end` whose bound `sigma (b . c) + (sigma / 2) |c|_1 + err` reaches
/// `thr`, in increasing order. Padding lanes may appear (callers skip them).
#[allow(clippy::too_many_arguments)]
pub fn survivors(
    level: Level,
    vnni: bool,
    q: &QueryCodes,
    codes: &Codes,
    first: usize,
    end: usize,
    thr: f32,
    out: &mut Vec<u32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if vnni {
            out.reserve((end - first) * LANES);
            // SAFETY: `vnni` is only true when `has_vnni` saw AVX-512 F and VNNI;
            // `first..end` are blocks of `codes` (checked by the slicing inside);
            // room for every lane of every block was reserved just above.
            unsafe { survivors_vnni(q, codes, first, end, thr, out) };
            return;
        }
    }
    let (sigma, half, err) = (q.sigma as f32, (q.sigma * 0.5) as f32, q.err as f32);
    let mut ints = [0i32; LANES];
    for b in first..end {
        int_dots(level, false, q, codes.block(b), &mut ints);
        let l1 = &codes.l1[b * LANES..(b + 1) * LANES];
        for lane in 0..LANES {
            if sigma * ints[lane] as f32 + half * l1[lane] + err >= thr {
                out.push((b * LANES + lane) as u32);
            }
        }
    }
}

/// The VNNI kernel: 16 `vpdpbusd` per block at d = 64, and the surviving
/// lanes' positions written with one compress-store, so the sparse survivors
/// cost no branch per block.
///
/// Safety: needs AVX-512 F + VNNI, and `out` must have spare capacity for
/// `(end - first) * 16` more elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn survivors_vnni(
    q: &QueryCodes,
    codes: &Codes,
    first: usize,
    end: usize,
    thr: f32,
    out: &mut Vec<u32>,
) {
    use std::arch::x86_64::*;
    let n = q.words.len();
    let all = &codes.codes[first * n * 64..end * n * 64];
    let l1s = &codes.l1[first * LANES..end * LANES];
    let sigma = _mm512_set1_ps(q.sigma as f32);
    let half = _mm512_set1_ps((q.sigma * 0.5) as f32);
    let err = _mm512_set1_ps(q.err as f32);
    let thr = _mm512_set1_ps(thr);
    let off = _mm512_set1_epi32(q.offset);
    let step = _mm512_set1_epi32(LANES as i32);
    let mut pos = _mm512_add_epi32(
        _mm512_set1_epi32((first * LANES) as i32),
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    );
    let w = &q.words;
    let mut len = out.len();
    for (blk, l1) in all.chunks_exact(n * 64).zip(l1s.chunks_exact(LANES)) {
        let p = blk.as_ptr();
        let mut acc0 = _mm512_setzero_si512();
        let mut acc1 = _mm512_setzero_si512();
        let mut g = 0;
        while g + 2 <= n {
            // SAFETY: g + 1 < n and the block holds n * 64 bytes.
            let (k0, k1) = unsafe {
                (
                    _mm512_loadu_si512(p.add(g * 64) as *const _),
                    _mm512_loadu_si512(p.add(g * 64 + 64) as *const _),
                )
            };
            acc0 = _mm512_dpbusd_epi32(acc0, k0, _mm512_set1_epi32(w[g]));
            acc1 = _mm512_dpbusd_epi32(acc1, k1, _mm512_set1_epi32(w[g + 1]));
            g += 2;
        }
        if g < n {
            // SAFETY: g < n.
            let k0 = unsafe { _mm512_loadu_si512(p.add(g * 64) as *const _) };
            acc0 = _mm512_dpbusd_epi32(acc0, k0, _mm512_set1_epi32(w[g]));
        }
        let ints = _mm512_sub_epi32(_mm512_add_epi32(acc0, acc1), off);
        // SAFETY: `l1` holds exactly 16 f32.
        let l1v = unsafe { _mm512_loadu_ps(l1.as_ptr()) };
        let ub = _mm512_add_ps(
            _mm512_mul_ps(sigma, _mm512_cvtepi32_ps(ints)),
            _mm512_add_ps(_mm512_mul_ps(half, l1v), err),
        );
        let m = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(ub, thr);
        // SAFETY: the caller reserved 16 elements per block past the initial
        // length, and `len` grows by at most 16 per block.
        unsafe { _mm512_mask_compressstoreu_epi32(out.as_mut_ptr().add(len) as *mut _, m, pos) };
        len += m.count_ones() as usize;
        pos = _mm512_add_epi32(pos, step);
    }
    // SAFETY: elements up to `len` were written by the compress-stores above,
    // within the reserved capacity.
    unsafe { out.set_len(len) };
}

#[inline(always)]
fn int_portable(q: &QueryCodes, block: &[u8], out: &mut [i32; LANES]) {
    let mut acc = [0i32; LANES];
    for (g, chunk) in block.chunks_exact(64).take(q.words.len()).enumerate() {
        let qb = &q.b[g * 4..g * 4 + 4];
        for lane in 0..LANES {
            let k = &chunk[lane * 4..lane * 4 + 4];
            acc[lane] += k[0] as i32 * qb[0] as i32
                + k[1] as i32 * qb[1] as i32
                + k[2] as i32 * qb[2] as i32
                + k[3] as i32 * qb[3] as i32;
        }
    }
    for lane in 0..LANES {
        out[lane] = acc[lane] - q.offset;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn int_avx2(q: &QueryCodes, block: &[u8], out: &mut [i32; LANES]) {
    // The portable code, compiled with AVX2 enabled so LLVM vectorises it.
    int_portable(q, block, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn int_vnni(q: &QueryCodes, block: &[u8], out: &mut [i32; LANES]) {
    use std::arch::x86_64::*;
    let p = block.as_ptr();
    let mut acc0 = _mm512_setzero_si512();
    let mut acc1 = _mm512_setzero_si512();
    let n = q.words.len();
    let mut g = 0;
    while g + 2 <= n {
        // SAFETY: g + 1 < d4 and the block holds d4 * 64 bytes.
        let (k0, k1) = unsafe {
            (
                _mm512_loadu_si512(p.add(g * 64) as *const _),
                _mm512_loadu_si512(p.add(g * 64 + 64) as *const _),
            )
        };
        acc0 = _mm512_dpbusd_epi32(acc0, k0, _mm512_set1_epi32(q.words[g]));
        acc1 = _mm512_dpbusd_epi32(acc1, k1, _mm512_set1_epi32(q.words[g + 1]));
        g += 2;
    }
    if g < n {
        // SAFETY: g < d4.
        let k0 = unsafe { _mm512_loadu_si512(p.add(g * 64) as *const _) };
        acc0 = _mm512_dpbusd_epi32(acc0, k0, _mm512_set1_epi32(q.words[g]));
    }
    let acc = _mm512_sub_epi32(_mm512_add_epi32(acc0, acc1), _mm512_set1_epi32(q.offset));
    // SAFETY: `out` holds exactly 16 i32.
    unsafe { _mm512_storeu_si512(out.as_mut_ptr() as *mut _, acc) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_dots_agree_on_every_level() {
        let d = 37;
        let nb = 2;
        let rot: Vec<f64> = (0..nb * LANES * d)
            .map(|i| ((i * 7919 % 1000) as f64 / 500.0 - 1.0) * (1.0 + (i % d) as f64))
            .collect();
        let codes = Codes::build(&rot, d, nb);
        let qrot: Vec<f64> = (0..d).map(|j| (j as f64 * 0.37).sin()).collect();
        let q = QueryCodes::new(&codes, &qrot);
        for b in 0..nb {
            let mut want = [0i32; LANES];
            int_portable(&q, codes.block(b), &mut want);
            for level in Level::supported() {
                let mut got = [0i32; LANES];
                int_dots(level, has_vnni(level), &q, codes.block(b), &mut got);
                assert_eq!(got, want, "{level}");
            }
            // And the bound holds in exact arithmetic.
            for (lane, &w) in want.iter().enumerate() {
                let pos = b * LANES + lane;
                let exact: f64 = (0..d).map(|j| qrot[j] * rot[pos * d + j]).sum();
                let ub = q.sigma * w as f64 + q.sigma * 0.5 * codes.l1[pos] as f64 + q.err;
                assert!(ub >= exact - 1e-9, "{ub} < {exact}");
            }
        }
    }
}

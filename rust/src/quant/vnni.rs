//! 2-, 4- and 8-bit batch-1 mat-vec with int16 activations on AVX-512 VNNI.
//!
//! Each group `k` of `x` becomes `dx_k * xq` with `xq` int16 in [-32767, 32767]
//! and `dx_k = max|x_k| / 32767` (round half away from zero). Read as 16-bit
//! words, a 64-byte chunk of 4-bit codes yields four vectors of 32 codes each by
//! a shift and a mask (the low and high nibble of each word's low and high byte;
//! 8-bit codes: two vectors, each word's low and high byte; 2-bit codes: eight,
//! the four 2-bit fields of each byte),
//! and `vpdpwssd` multiplies them with `xq` laid out to match: 32 products per
//! instruction, no widening shuffles. The min term uses the group sums of the
//! *quantized* activations, so the result is exactly the mat-vec of the
//! dequantized weights with the quantized `x`:
//! `|y - y_exact| <= sum_k dx_k / 2 * sum_{i in k} |w_i|` (plus f32 rounding).
//!
//! Why not int8 activations (ggml's `Q4 x Q8`, 64 products per `vpdpbusd`, which
//! this kernel used before): LLM hidden states carry outlier channels ~100x the
//! rest, and an int8 step of `max / 127` erases the other values of an outlier's
//! group. Token-by-token decoding of SmolLM2-135M (4-bit g32, 512 GPL-3 tokens)
//! moved perplexity by 0.98% with int8 activations; with int16 it matches the
//! batched path (`super::gemm_vnni`, also int16) within the library's 0.1%.
//!
//! Used for every 2-, 4- and 8-bit scheme (asym, sym, q4_0, q4_1; 2- and 8-bit
//! asym and sym) at the AVX-512 level on CPUs with VNNI. 3-bit weights keep
//! float32 activations: their low and high bit planes alternate per group
//! (12 to 96 bytes), so 64-byte chunks would mix planes. 8-bit codes (<= 255)
//! times int16 stay exact in the i32 lanes: at most 4 products of
//! <= 255 * 32767 per lane and chunk (2-bit: 16 products of <= 3 * 32767).

use super::format::QuantRef;

/// `x` quantized per group to int16 and laid out like the packed codes.
///
/// Word `w` of a row's codes (bytes `2w`, `2w + 1`) holds `F = 8 / bits` code
/// fields per byte; `part[F p + f][w]` is the activation that meets field `f`
/// (bits `bits * f ..`) of byte `2w + p`. Byte `b` of group `k` holds, in field
/// `f`, code `b + f * gb` of the group (`gb` bytes per group): for 4-bit, code
/// `b` in the low nibble and `g/2 + b` in the high one (GGUF order); for 2-bit,
/// codes `b, b + g/4, b + g/2, b + 3g/4`; for 8-bit, code `b`.
pub(crate) struct Int16Activations {
    part: Vec<Vec<i16>>,
    /// `dx_k` per group (padded to a multiple of 16 with zeros).
    dx: Vec<f32>,
    /// `dx_k * sum(xq_k)` per group (padded likewise).
    sums: Vec<f32>,
}

impl Int16Activations {
    /// Caller: `q.params.bits` is 2, 4 or 8 ([`applies`]).
    pub fn new(q: &QuantRef<'_>, x: &[f32]) -> Int16Activations {
        let g = q.params.group_size;
        let fields = 8 / q.params.bits as usize; // code fields per byte
        let gb = g / fields; // bytes per group
        let ng = q.groups();
        let rb = q.params.row_bytes(q.cols);
        // Words per row, rounded up to whole 64-byte chunks (32 words).
        let words = rb.div_ceil(64) * 32;
        let mut part = vec![vec![0i16; words]; 2 * fields];
        let mut dx = vec![0f32; ng.div_ceil(16) * 16];
        let mut sums = vec![0f32; dx.len()];
        let mut xq = [0i16; 256];
        for k in 0..ng {
            let src = &x[(k * g).min(x.len())..((k + 1) * g).min(x.len())];
            xq.fill(0);
            let (d, total) = quantize_group(src, &mut xq[..src.len()]);
            for b in 0..gb {
                let byte = k * gb + b;
                let (w, p) = (byte / 2, byte % 2);
                for f in 0..fields {
                    part[fields * p + f][w] = xq[b + f * gb];
                }
            }
            dx[k] = d;
            sums[k] = d * total as f32;
        }
        Int16Activations { part, dx, sums }
    }
}

/// One group of activations to int16: writes `dst[i] = round(src[i] / dx)` with
/// `dx = max|src| / 32767` (round half away from zero) and returns
/// `(dx, sum(dst))`. `dx` is 0 for an all-zero group, whose codes are all 0.
/// `dst` has `src`'s length.
///
/// The batched mat-mul quantizes `n x cols` values per call and every mat-vec
/// `cols` of them, so the AVX-512 path matters: compiled from the plain loop,
/// LLVM kept the maximum a serial chain and scalarised the conversion (5 us of
/// a 11 us call at 4,096 columns). Both paths give the same bits.
pub(crate) fn quantize_group(src: &[f32], dst: &mut [i16]) -> (f32, i32) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available` saw AVX-512 F/BW/VL; the lengths are equal.
        return unsafe { quantize_group_avx512(src, dst) };
    }
    quantize_group_plain(src, dst)
}

fn quantize_group_plain(src: &[f32], dst: &mut [i16]) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 32767.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut total = 0i32;
    for (o, v) in dst.iter_mut().zip(src) {
        *o = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
        total += *o as i32;
    }
    (d, total)
}

/// [`quantize_group_plain`] in AVX-512, 16 values per step (a masked tail).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL; `dst.len() == src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_group_avx512(src: &[f32], dst: &mut [i16]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let n = src.len();
    let mask = |i: usize| -> __mmask16 { (u32::MAX >> (32 - (n - i).min(16))) as u16 };
    // max(|v|, m) keeps m where v is NaN, as `f32::max` ignores NaN.
    let mut m = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        // SAFETY: the mask covers elements i..min(i + 16, n) of `src` only.
        let v = unsafe { _mm512_maskz_loadu_ps(mask(i), src.as_ptr().add(i)) };
        m = _mm512_max_ps(_mm512_abs_ps(v), m);
    }
    let d = _mm512_reduce_max_ps(m) / 32767.0;
    let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    // round(a) = trunc(a + copysign(0.5 - 2^-25, a)): exact for every float,
    // unlike trunc(a + 0.5), which rounds 0.49999997 up.
    let half = _mm512_set1_epi32(0.49999997f32.to_bits() as i32);
    let sign = _mm512_set1_epi32(i32::MIN);
    let (lo, hi) = (_mm512_set1_ps(-32767.0), _mm512_set1_ps(32767.0));
    let mut total = _mm512_setzero_si512();
    for i in (0..n).step_by(16) {
        let k = mask(i);
        // SAFETY: as above.
        let a = _mm512_mul_ps(
            unsafe { _mm512_maskz_loadu_ps(k, src.as_ptr().add(i)) },
            inv,
        );
        let h = _mm512_or_si512(half, _mm512_and_si512(_mm512_castps_si512(a), sign));
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm512_add_ps(
            a,
            _mm512_castsi512_ps(h),
        ));
        // NaN lanes become 0, as `as i16` makes them (the clamp would not keep
        // them NaN: vmaxps returns its second operand on NaN).
        let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(r, r);
        let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        let q = _mm512_maskz_cvttps_epi32(ord, r);
        total = _mm512_add_epi32(total, q);
        // SAFETY: the mask covers elements i..min(i + 16, n) of `dst` (= n long).
        unsafe { _mm512_mask_cvtepi32_storeu_epi16(dst.as_mut_ptr().add(i) as *mut _, k, q) };
    }
    (d, _mm512_reduce_add_epi32(total))
}

/// Whether [`row_vnni`] serves these weights here: 2-, 4- or 8-bit codes and a
/// CPU with AVX-512 VNNI.
pub(crate) fn applies(q: &QuantRef<'_>) -> bool {
    matches!(q.params.bits, 2 | 4 | 8) && available()
}

/// Whether this CPU runs [`row_vnni`].
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// 16 scale (or min) lanes of groups `start..start + n` (zeros past `n`).
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
        // SAFETY: the mask enables only lanes start..start+n, inside the slice (caller's contract).
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

/// Bytes ahead of the current chunk that the mat-vec prefetches.
const PREFETCH: usize = 16384;

/// The 16 integer dot products (as floats) of the 64 code bytes `v` at byte
/// `c` of a row with the activations: lane `L` sums the codes of bytes
/// `c + 4L .. c + 4L + 4` (one group, as groups span >= 8 bytes). The codes
/// come out of each 16-bit word by a shift and a mask, already as i16: field
/// `f` of the word's byte `p` is bits `8p + BITS f ..` (see [`Int16Activations`]).
///
/// # Safety
/// AVX-512 F/BW/VNNI; `a`'s parts hold words `c / 2 .. c / 2 + 32` (rows are
/// padded to whole 64-byte chunks); `a` was built for `BITS`-bit codes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn cvt_dot<const BITS: u32>(
    v: std::arch::x86_64::__m512i,
    a: &Int16Activations,
    c: usize,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let w = c / 2;
    let fields = 8 / BITS as usize;
    // SAFETY: the caller guarantees AVX-512 F/BW/VNNI and that words w..w + 32
    // exist in every part.
    unsafe {
        let mask = _mm512_set1_epi16(((1u32 << BITS) - 1) as i16);
        let mut acc = _mm512_setzero_si512();
        for p in 0..2 {
            for f in 0..fields {
                let at = 8 * p as u32 + BITS * f as u32;
                // (constant after unrolling: one vpsrlw by an immediate)
                let sh = _mm512_srl_epi16(v, _mm_cvtsi32_si128(at as i32));
                // The top field needs no mask: the shift cleared the bits above it.
                let codes = if at + BITS == 16 {
                    sh
                } else {
                    _mm512_and_si512(sh, mask)
                };
                let x = _mm512_loadu_si512(a.part[fields * p + f].as_ptr().add(w) as *const _);
                acc = _mm512_dpwssd_epi32(acc, codes, x);
            }
        }
        _mm512_cvtepi32_ps(acc)
    }
}

/// One output row, 2-, 4- or 8-bit codes times int16 activations.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL and VNNI ([`available`]); `q.params.bits` is
/// 2, 4 or 8; `a` was built from `q`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn row_vnni(q: &QuantRef<'_>, r: usize, a: &Int16Activations) -> f32 {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match q.params.bits {
            8 => row::<8>(q, r, a),
            4 => row::<4>(q, r, a),
            _ => row::<2>(q, r, a),
        }
    }
}

/// [`row_vnni`] for one code width.
///
/// # Safety
/// As [`row_vnni`], with `BITS` equal to `q.params.bits`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn row<const BITS: u32>(q: &QuantRef<'_>, r: usize, a: &Int16Activations) -> f32 {
    use std::arch::x86_64::*;
    let g = q.params.group_size;
    // Bytes per group (>= 8: 2-bit g32).
    let h = g * BITS as usize / 8;
    let ng = q.groups();
    let rb = q.params.row_bytes(q.cols);
    let data = q.row(r);
    // Lane L holds bytes 4L..4L+4 of a 64-byte chunk: group (4L) / h of the chunk.
    let idx = _mm512_setr_epi32(
        0,
        (4 / h) as i32,
        (8 / h) as i32,
        (12 / h) as i32,
        (16 / h) as i32,
        (20 / h) as i32,
        (24 / h) as i32,
        (28 / h) as i32,
        (32 / h) as i32,
        (36 / h) as i32,
        (40 / h) as i32,
        (44 / h) as i32,
        (48 / h) as i32,
        (52 / h) as i32,
        (56 / h) as i32,
        (60 / h) as i32,
    );
    let mut facc = _mm512_setzero_ps();
    // Whole blocks of 16 groups (16 h bytes, a multiple of 64): the 16 scales
    // times dx (and the min term) are formed once per block, and each 64-byte
    // chunk only picks its groups' lanes with one permute (no masks, no
    // per-chunk conversion). Two chunks per step feed two FMA chains.
    let blocks = ng / 16;
    let per_block = 16 * h / 64;
    // h is a power of two (group sizes 32..256): (64 j) / h as a shift.
    let shift = h.trailing_zeros();
    let off = -(q.params.offset() as f32);
    let mut facc2 = _mm512_setzero_ps();
    let mut macc = _mm512_setzero_ps();
    for blk in 0..blocks {
        let k16 = blk * 16;
        // SAFETY: groups k16..k16 + 16 exist in row r and in `dx`/`sums` (padded to 16).
        let sv = unsafe {
            let sc = lanes16(q.scales, r * ng + k16, 16);
            let mv = match q.mins {
                Some(m) => lanes16(m, r * ng + k16, 16),
                None => _mm512_mul_ps(sc, _mm512_set1_ps(off)),
            };
            macc = _mm512_fmadd_ps(mv, _mm512_loadu_ps(a.sums.as_ptr().add(k16)), macc);
            _mm512_mul_ps(sc, _mm512_loadu_ps(a.dx.as_ptr().add(k16)))
        };
        let base = blk * 16 * h;
        let mut j = 0;
        while j < per_block {
            let c = base + j * 64;
            // Memory-level parallelism: ask for the bytes PREFETCH ahead (the
            // next rows of this task); prefetch never faults, and wrapping_add
            // keeps the address arithmetic defined.
            _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().wrapping_add(c + PREFETCH) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().wrapping_add(c + PREFETCH + 64) as *const i8);
            // Group of lane L in chunk j: (64 j + 4 L) / h = 64 j / h + 4 L / h
            // (h divides 64, or 64 j / h rounds down the same way when h = 128).
            let g0 = _mm512_add_epi32(idx, _mm512_set1_epi32(((j * 64) >> shift) as i32));
            let g1 = _mm512_add_epi32(idx, _mm512_set1_epi32((((j + 1) * 64) >> shift) as i32));
            // SAFETY: per_block = h / 4 is even (h >= 8), so c + 128 <= blocks * 16 h <= rb;
            // lo/hi hold rb rounded up to 64.
            unsafe {
                // (a macro, not a closure: the intrinsics must inline into this
                // target-feature function)
                macro_rules! chunk {
                    ($c:expr) => {{
                        let v = _mm512_loadu_si512(data.as_ptr().add($c) as *const _);
                        cvt_dot::<BITS>(v, a, $c)
                    }};
                }
                facc = _mm512_fmadd_ps(chunk!(c), _mm512_permutexvar_ps(g0, sv), facc);
                facc2 = _mm512_fmadd_ps(chunk!(c + 64), _mm512_permutexvar_ps(g1, sv), facc2);
            }
            j += 2;
        }
    }
    facc = _mm512_add_ps(facc, facc2);
    // The remaining groups (fewer than 16), with masked loads.
    let mut c = blocks * 16 * h;
    while c < rb {
        let left = rb - c;
        let mask: __mmask64 = if left >= 64 { !0 } else { (1u64 << left) - 1 };
        let k0 = c / h;
        let nk = (ng - k0).min(16);
        // Memory-level parallelism: ask for the bytes 8 KiB ahead (the next rows
        // of this task) while this chunk computes; prefetch never faults, and
        // wrapping_add keeps the address arithmetic defined.
        _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().wrapping_add(c + 8192) as *const i8);
        // SAFETY: the mask keeps the load inside the row's rb bytes; lo/hi hold
        // rb rounded up to 64 bytes; groups k0..k0+nk exist in the row and in dx.
        unsafe {
            let v = _mm512_maskz_loadu_epi8(mask, data.as_ptr().add(c) as *const i8);
            let acc = cvt_dot::<BITS>(v, a, c);
            let sv = _mm512_mul_ps(
                lanes16(q.scales, r * ng + k0, nk),
                _mm512_loadu_ps(a.dx.as_ptr().add(k0)),
            );
            facc = _mm512_fmadd_ps(acc, _mm512_permutexvar_ps(idx, sv), facc);
        }
        c += 64;
    }
    // min term over the remaining groups, 16 at a time
    let mut k0 = blocks * 16;
    while k0 < ng {
        let n = (ng - k0).min(16);
        // SAFETY: groups k0..k0+n exist in row r; `sums` is padded to a multiple of 16.
        unsafe {
            let mv = match q.mins {
                Some(m) => lanes16(m, r * ng + k0, n),
                None => _mm512_mul_ps(lanes16(q.scales, r * ng + k0, n), _mm512_set1_ps(off)),
            };
            macc = _mm512_fmadd_ps(mv, _mm512_loadu_ps(a.sums.as_ptr().add(k0)), macc);
        }
        k0 += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(facc, macc))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::dequantize::dequantize;
    use super::super::format::{Params, ScaleType, Scheme};
    use super::super::quantize::quantize;
    use super::*;

    /// A rows x cols matrix of `bits`-bit codes, its dequantized floats, and `x` (with `wiggle`
    /// added so activations are not all on the int16 grid).
    fn case(bits: u8, g: usize, scheme: Scheme, rows: usize, cols: usize, wiggle: f32) -> Case {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1013) as f32 / 506.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0 + (i % 7) as f32 * wiggle)
            .collect();
        let p = Params::new(bits, g, scheme, ScaleType::F16).unwrap();
        let qw = quantize(&w, rows, cols, p, false).unwrap();
        let d = dequantize(&qw.view()).unwrap();
        Case { qw, d, x }
    }

    struct Case {
        qw: super::super::format::QuantizedWeights,
        d: Vec<f32>,
        x: Vec<f32>,
    }

    /// The AVX-512 group quantizer gives the plain loop's bits: ties, values
    /// just under a tie, tails shorter than a vector, zeros, NaN and infinity.
    #[test]
    fn group_quantizer_matches_the_plain_loop() {
        if !available() {
            return;
        }
        // With max |v| = 32767 the step is exactly 1, so these are the codes' ties.
        let mut special = vec![32767.0f32, 0.5, -0.5, 1.5, -2.5, 0.49999997, -0.49999997];
        special.extend([32766.5, -32766.5, 7.5000005, 0.0, -0.0, 1e-30, 3.0]);
        let mut cases = vec![
            special,
            vec![0.0; 32],
            vec![f32::NAN, 1.0, -2.0],
            vec![f32::INFINITY, 1.0],
        ];
        let mut state = 12345u32;
        for len in [1, 15, 16, 17, 31, 64, 100, 256] {
            cases.push(
                (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                        (state >> 8) as f32 / (1 << 20) as f32 - 8.0
                    })
                    .collect(),
            );
        }
        for src in cases {
            let (mut a, mut b) = (vec![0i16; src.len()], vec![0i16; src.len()]);
            let pa = quantize_group_plain(&src, &mut a);
            // SAFETY: `available` saw AVX-512 F/BW/VL; equal lengths.
            let pb = unsafe { quantize_group_avx512(&src, &mut b) };
            assert_eq!(a, b, "{src:?}");
            assert_eq!(pa.0.to_bits(), pb.0.to_bits(), "{src:?}");
            assert_eq!(pa.1, pb.1, "{src:?}");
        }
    }

    #[test]
    fn error_stays_within_the_activation_rounding_bound() {
        if !available() {
            return;
        }
        for (bits, g, scheme, cols) in [
            (4, 32, Scheme::Asym, 100),
            (4, 64, Scheme::Sym, 300),
            (4, 32, Scheme::Q4_1, 96),
            (4, 256, Scheme::Asym, 700),
            (2, 32, Scheme::Asym, 100),
            (2, 128, Scheme::Sym, 700),
        ] {
            let rows = 5;
            let Case { qw, d, x } = case(bits, g, scheme, rows, cols, 0.0);
            let q = qw.view();
            let a = Int16Activations::new(&q, &x);
            for r in 0..rows {
                // SAFETY: `available()` was checked above; 2/4-bit weights; `a` built from `q`.
                let y = unsafe { row_vnni(&q, r, &a) } as f64;
                let exact: f64 = (0..cols)
                    .map(|c| d[r * cols + c] as f64 * x[c] as f64)
                    .sum();
                let bound: f64 = (0..cols)
                    .map(|c| a.dx[c / g] as f64 / 2.0 * (d[r * cols + c] as f64).abs())
                    .sum();
                assert!(
                    (y - exact).abs() <= bound * 1.01 + 1e-4,
                    "{bits}-bit g{g} {scheme:?} row {r}: {y} vs {exact} (bound {bound})"
                );
            }
        }
    }

    #[test]
    fn matches_the_quantized_activation_product_on_whole_and_partial_blocks() {
        if !available() {
            return;
        }
        // Whole 16-group blocks (the fast loop) plus remaining groups (the masked
        // loop), a padded last group, and a block-only row.
        for (bits, g, scheme, cols) in [
            (4, 32, Scheme::Asym, 1120),
            (4, 32, Scheme::Q4_1, 1120),
            (4, 64, Scheme::Sym, 1098),
            (4, 128, Scheme::Asym, 2048),
            (4, 256, Scheme::Sym, 4600),
            (8, 32, Scheme::Asym, 1120),
            (8, 64, Scheme::Sym, 1098),
            (8, 128, Scheme::Asym, 2100),
            (8, 256, Scheme::Sym, 4600),
            (2, 32, Scheme::Asym, 1120),
            (2, 32, Scheme::Sym, 1098),
            (2, 64, Scheme::Asym, 2100),
            (2, 128, Scheme::Sym, 4096),
            (2, 256, Scheme::Asym, 4600),
        ] {
            let rows = 3;
            let Case { qw, d, x } = case(bits, g, scheme, rows, cols, 0.003);
            let q = qw.view();
            let a = Int16Activations::new(&q, &x);
            let xq: Vec<f64> = x
                .chunks(g)
                .flat_map(|grp| {
                    let dx = grp.iter().fold(0f32, |m, v| m.max(v.abs())) / 32767.0;
                    let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
                    grp.iter()
                        .map(move |v| dx as f64 * (v * inv).round().clamp(-32767.0, 32767.0) as f64)
                })
                .collect();
            for r in 0..rows {
                // SAFETY: `available()` was checked above; 2/4/8-bit weights; `a` built from `q`.
                let y = unsafe { row_vnni(&q, r, &a) } as f64;
                let row = &d[r * cols..(r + 1) * cols];
                let want: f64 = row.iter().zip(&xq).map(|(&w, &x)| w as f64 * x).sum();
                let mag: f64 = row
                    .iter()
                    .zip(&xq)
                    .map(|(&w, &x)| (w as f64 * x).abs())
                    .sum();
                assert!(
                    (y - want).abs() <= 1e-5 * (1.0 + mag),
                    "{bits}-bit g{g} {scheme:?} cols {cols} row {r}: {y} vs {want}"
                );
            }
        }
    }
}

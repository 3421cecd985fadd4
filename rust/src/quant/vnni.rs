//! Batch-1 mat-vec with int16 activations on AVX-512 VNNI, for every code width.
//!
//! `x` arrives quantized per group ([`super::act16`]: `dx_k * xq`, `xq` int16,
//! 14-bit for 3-bit codes). Read as 16-bit words, a 64-byte chunk of codes
//! yields its code fields by a shift and a mask, already as i16: 4-bit codes
//! give four vectors of 32 codes (the low and high nibble of each word's low and
//! high byte), 8-bit two, 2-bit eight; 3-bit groups (a plane of low 2-bit fields,
//! then one of high bits) are read as sixteen 1-bit fields, the bit weights 1, 2
//! and 4 carried by the activations. `vpdpwssd` multiplies each vector with the
//! activations laid out to match: no widening shuffles, and the lanes of a
//! chunk pick their groups' scales by one permute. The min term uses the group
//! sums of the *quantized* activations, so the result is exactly the mat-vec of
//! the dequantized weights with the quantized `x`:
//! `|y - y_exact| <= sum_k dx_k / 2 * sum_{i in k} |w_i|` (plus f32 rounding).
//!
//! Why not int8 activations (ggml's `Q4 x Q8`, 64 products per `vpdpbusd`, which
//! this kernel used before): LLM hidden states carry outlier channels ~100x the
//! rest, and an int8 step of `max / 127` erases the other values of an outlier's
//! group. Token-by-token decoding of SmolLM2-135M (4-bit g32, 512 GPL-3 tokens)
//! moved perplexity by 0.98% with int8 activations; with int16 it matches the
//! batched path (`super::gemm_vnni`, also int16) within the library's 0.1%.
//!
//! Used for every scheme (asym, sym, q4_0, q4_1, and 2-, 3-, 8-bit asym and
//! sym) at the AVX-512 level on CPUs with VNNI. The i32 lanes stay exact: per
//! lane and chunk at most 4 products of <= 255 * 32767 (8-bit), 16 of
//! <= 3 * 32767 (2-bit) or 64 of <= 32764 (3-bit).

use super::act16::{field_bits, Int16Activations};
use super::format::QuantRef;
#[cfg(target_arch = "x86_64")]
use super::row_dot::lanes16;

/// Whether [`row_vnni`] serves these weights here: any code width, on a CPU
/// with AVX-512 VNNI.
pub(crate) fn applies(q: &QuantRef<'_>) -> bool {
    matches!(q.params.bits, 2 | 3 | 4 | 8) && available()
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

/// Bytes ahead of the current chunk that the mat-vec prefetches. Measured on the
/// 16 x 4096x4096 4-bit stack, 2 threads, Zen 4: 16 KiB ahead streamed 23-25
/// GB/s, 2-8 KiB 27-30 (512 B: 23.5); a 16-core Xeon showed no difference
/// between 4 and 16 KiB.
const PREFETCH: usize = 4096;

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
    let vb = field_bits(BITS);
    let fields = (8 / vb) as usize;
    // SAFETY: the caller guarantees AVX-512 F/BW/VNNI and that words w..w + 32
    // exist in every part.
    unsafe {
        let mask = _mm512_set1_epi16(((1u32 << vb) - 1) as i16);
        let mut acc = _mm512_setzero_si512();
        for p in 0..2 {
            for f in 0..fields {
                let at = 8 * p as u32 + vb * f as u32;
                // (constant after unrolling: one vpsrlw by an immediate)
                let sh = _mm512_srl_epi16(v, _mm_cvtsi32_si128(at as i32));
                // The top field needs no mask: the shift cleared the bits above it.
                let codes = if at + vb == 16 {
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
            3 => row::<3>(q, r, a),
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
    // Bytes per group: 8 (2-bit g32) to 256; 3-bit: 12, 24, 48, 96. A multiple
    // of 4, so each 4-byte lane of a chunk lies in one group.
    let h = g * BITS as usize / 8;
    let ng = q.groups();
    let rb = q.params.row_bytes(q.cols);
    let data = q.row(r);
    let off = -(q.params.offset() as f32);
    // Whole blocks of 16 groups (16 h bytes, h / 4 chunks of 64): the 16 scales
    // times dx (and the min term) are formed once per block, and each 64-byte
    // chunk only picks its lanes' groups with one permute (no masks, no
    // per-chunk conversion). Two chunks per step feed two FMA chains.
    let blocks = ng / 16;
    let per_block = 16 * h / 64;
    let groups_of = |j: usize| {
        // SAFETY: j < per_block = a.lane_groups.len(); 16 i32 each.
        unsafe { _mm512_loadu_si512(a.lane_groups[j].as_ptr() as *const _) }
    };
    // The 16 scale lanes of groups k0.. (n of them) times dx.
    let scaled = |k0: usize, n: usize| {
        // SAFETY: groups k0..k0 + n exist in row r; `dx` is padded to 16.
        unsafe {
            _mm512_mul_ps(
                lanes16(q.scales, r * ng + k0, n),
                _mm512_loadu_ps(a.dx.as_ptr().add(k0)),
            )
        }
    };
    let mut facc = _mm512_setzero_ps();
    let mut facc2 = _mm512_setzero_ps();
    let mut macc = _mm512_setzero_ps();
    for blk in 0..blocks {
        let k16 = blk * 16;
        let sv = scaled(k16, 16);
        let base = blk * 16 * h;
        // (a macro, not a closure: the intrinsics must inline into this
        // target-feature function)
        macro_rules! chunk {
            ($j:expr) => {{
                let c = base + $j * 64;
                // Memory-level parallelism: ask for the bytes PREFETCH ahead (the
                // next rows of this task); prefetch never faults, and
                // wrapping_add keeps the address arithmetic defined.
                _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().wrapping_add(c + PREFETCH) as *const i8);
                // SAFETY: chunk j < per_block of block blk ends at or before
                // (blk + 1) 16 h <= rb; the parts hold rb rounded up to 64 bytes.
                let dot = unsafe {
                    let v = _mm512_loadu_si512(data.as_ptr().add(c) as *const _);
                    cvt_dot::<BITS>(v, a, c)
                };
                (dot, _mm512_permutexvar_ps(groups_of($j), sv))
            }};
        }
        let mut j = 0;
        while j + 1 < per_block {
            let (d0, s0) = chunk!(j);
            let (d1, s1) = chunk!(j + 1);
            facc = _mm512_fmadd_ps(d0, s0, facc);
            facc2 = _mm512_fmadd_ps(d1, s1, facc2);
            j += 2;
        }
        if j < per_block {
            // 3-bit g32 and g96 blocks are an odd number of chunks.
            let (d0, s0) = chunk!(j);
            facc = _mm512_fmadd_ps(d0, s0, facc);
        }
        // SAFETY: groups k16..k16 + 16 exist in row r; `sums` is padded to 16.
        unsafe {
            let mv = match q.mins {
                Some(m) => lanes16(m, r * ng + k16, 16),
                None => _mm512_mul_ps(lanes16(q.scales, r * ng + k16, 16), _mm512_set1_ps(off)),
            };
            macc = _mm512_fmadd_ps(mv, _mm512_loadu_ps(a.sums.as_ptr().add(k16)), macc);
        }
    }
    facc = _mm512_add_ps(facc, facc2);
    // The remaining groups (fewer than 16): a partial block, its chunks masked
    // at the row's end. Lanes past the row read zero codes, so the scale lanes
    // of groups that do not exist (zeros) never meet a non-zero sum.
    let k0 = blocks * 16;
    if k0 < ng {
        let nk = ng - k0;
        let sv = scaled(k0, nk);
        let base = k0 * h;
        let mut j = 0;
        while base + j * 64 < rb {
            let c = base + j * 64;
            let left = rb - c;
            let mask: __mmask64 = if left >= 64 { !0 } else { (1u64 << left) - 1 };
            _mm_prefetch::<_MM_HINT_T0>(data.as_ptr().wrapping_add(c + PREFETCH) as *const i8);
            // SAFETY: the mask keeps the load inside the row's rb bytes; the parts
            // hold rb rounded up to 64 bytes; j < per_block as fewer than 16
            // groups remain.
            unsafe {
                let v = _mm512_maskz_loadu_epi8(mask, data.as_ptr().add(c) as *const i8);
                let dot = cvt_dot::<BITS>(v, a, c);
                facc = _mm512_fmadd_ps(dot, _mm512_permutexvar_ps(groups_of(j), sv), facc);
            }
            j += 1;
        }
        // SAFETY: groups k0..k0 + nk exist in row r; `sums` is padded to 16.
        unsafe {
            let mv = match q.mins {
                Some(m) => lanes16(m, r * ng + k0, nk),
                None => _mm512_mul_ps(lanes16(q.scales, r * ng + k0, nk), _mm512_set1_ps(off)),
            };
            macc = _mm512_fmadd_ps(mv, _mm512_loadu_ps(a.sums.as_ptr().add(k0)), macc);
        }
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
            (3, 32, Scheme::Asym, 100),
            (3, 64, Scheme::Sym, 700),
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
            (3, 32, Scheme::Asym, 1120),
            (3, 32, Scheme::Sym, 1098),
            (3, 64, Scheme::Asym, 2100),
            (3, 128, Scheme::Sym, 4096),
            (3, 256, Scheme::Asym, 4600),
            (3, 256, Scheme::Sym, 4096),
        ] {
            let rows = 3;
            let Case { qw, d, x } = case(bits, g, scheme, rows, cols, 0.003);
            let q = qw.view();
            let a = Int16Activations::new(&q, &x);
            let xq: Vec<f64> = x
                .chunks(g)
                .flat_map(|grp| {
                    let qmax = if bits == 3 { 8191.0 } else { 32767.0 };
                    let dx = grp.iter().fold(0f32, |m, v| m.max(v.abs())) / qmax;
                    let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
                    grp.iter()
                        .map(move |v| dx as f64 * (v * inv).round().clamp(-qmax, qmax) as f64)
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

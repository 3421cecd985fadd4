//! The [`Lanes`](super::Lanes) implementations for x86-64: 8 float lanes of
//! AVX2 and 16 of AVX-512, with F16C for float16 conversions.

use super::Lanes;
use std::arch::x86_64::*;

/// 8 lanes of AVX2 (+ FMA-free arithmetic, F16C for float16).
#[derive(Clone, Copy)]
pub(crate) struct Avx2;

/// 16 lanes of AVX-512 F/BW/VL (+ F16C for scalar float16).
#[derive(Clone, Copy)]
pub(crate) struct Avx512;

/// float16 bits of `x`, rounded to nearest even (as `half::f16::from_f32`).
#[inline]
#[target_feature(enable = "f16c")]
pub(crate) fn f16_bits(x: f32) -> u16 {
    _mm_extract_epi16::<0>(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))) as u16
}

#[inline]
#[target_feature(enable = "f16c")]
fn f16_value(b: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(b as i32)))
}

impl Lanes for Avx2 {
    const N: usize = 8;
    type F = __m256;
    type I = __m256i;
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: callers pass a pointer to N readable floats.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: callers pass a pointer to N writable floats.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn splat(x: f32) -> __m256 {
        _mm256_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sub(a: __m256, b: __m256) -> __m256 {
        _mm256_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn min(a: __m256, b: __m256) -> __m256 {
        _mm256_min_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn max(a: __m256, b: __m256) -> __m256 {
        _mm256_max_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nan_to_zero(a: __m256) -> __m256 {
        _mm256_and_ps(a, _mm256_cmp_ps::<_CMP_ORD_Q>(a, a))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn round_away(a: __m256) -> __m256 {
        let sign = _mm256_set1_ps(-0.0);
        let x = _mm256_andnot_ps(sign, a);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
        let up = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_sub_ps(x, t), _mm256_set1_ps(0.5));
        let r = _mm256_add_ps(t, _mm256_and_ps(up, _mm256_set1_ps(1.0)));
        _mm256_or_ps(r, _mm256_and_ps(a, sign))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn any_nan(a: __m256) -> bool {
        _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_UNORD_Q>(a, a)) != 0
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hmin(a: __m256) -> f32 {
        let m = _mm_min_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_min_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hmax(a: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn first_abs_eq(a: __m256, x: f32) -> Option<usize> {
        let abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0), a);
        let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(abs, _mm256_set1_ps(x)));
        (m != 0).then(|| m.trailing_zeros() as usize)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn to_int(v: __m256) -> __m256i {
        _mm256_cvttps_epi32(v)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
        _mm256_or_si256(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn shl(a: __m256i, n: i32) -> __m256i {
        _mm256_sll_epi32(a, _mm_cvtsi32_si128(n))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_bytes(i: __m256i, out: *mut u8) {
        let w = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256::<1>(i));
        let b = _mm_packus_epi16(w, w);
        // SAFETY: callers pass a pointer to N = 8 writable bytes.
        unsafe { _mm_storel_epi64(out as *mut __m128i, b) }
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_bytes(p: *const u8) -> __m256i {
        // SAFETY: callers pass a pointer to N = 8 readable bytes.
        _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(p as *const __m128i) })
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn and(a: __m256i, m: i32) -> __m256i {
        _mm256_and_si256(a, _mm256_set1_epi32(m))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn shr(a: __m256i, n: i32) -> __m256i {
        _mm256_srl_epi32(a, _mm_cvtsi32_si128(n))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn to_f32(a: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(a)
    }
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16_bits(x: f32) -> u16 {
        f16_bits(x)
    }
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16_value(b: u16) -> f32 {
        f16_value(b)
    }
}

impl Lanes for Avx512 {
    const N: usize = 16;
    type F = __m512;
    type I = __m512i;
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: callers pass a pointer to N readable floats.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: callers pass a pointer to N writable floats.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat(x: f32) -> __m512 {
        _mm512_set1_ps(x)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sub(a: __m512, b: __m512) -> __m512 {
        _mm512_sub_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn min(a: __m512, b: __m512) -> __m512 {
        _mm512_min_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn max(a: __m512, b: __m512) -> __m512 {
        _mm512_max_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn nan_to_zero(a: __m512) -> __m512 {
        _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(a, a), a)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn round_away(a: __m512) -> __m512 {
        let sign = _mm512_set1_epi32(i32::MIN);
        let bits = _mm512_castps_si512(a);
        let x = _mm512_castsi512_ps(_mm512_andnot_si512(sign, bits));
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(x);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_sub_ps(x, t), _mm512_set1_ps(0.5));
        let r = _mm512_mask_add_ps(t, up, t, _mm512_set1_ps(1.0));
        _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(r),
            _mm512_and_si512(bits, sign),
        ))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn any_nan(a: __m512) -> bool {
        _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a) != 0
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn hmin(a: __m512) -> f32 {
        _mm512_reduce_min_ps(a)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn hmax(a: __m512) -> f32 {
        _mm512_reduce_max_ps(a)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn first_abs_eq(a: __m512, x: f32) -> Option<usize> {
        let m = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(a), _mm512_set1_ps(x));
        (m != 0).then(|| m.trailing_zeros() as usize)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn to_int(v: __m512) -> __m512i {
        _mm512_cvttps_epi32(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
        _mm512_or_si512(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn shl(a: __m512i, n: i32) -> __m512i {
        _mm512_sll_epi32(a, _mm_cvtsi32_si128(n))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_bytes(v: __m512i, out: *mut u8) {
        let b = _mm512_cvtepi32_epi8(v);
        // SAFETY: callers pass a pointer to N = 16 writable bytes.
        unsafe { _mm_storeu_si128(out as *mut __m128i, b) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_bytes(p: *const u8) -> __m512i {
        // SAFETY: callers pass a pointer to N = 16 readable bytes.
        _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) })
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn and(a: __m512i, m: i32) -> __m512i {
        _mm512_and_si512(a, _mm512_set1_epi32(m))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn shr(a: __m512i, n: i32) -> __m512i {
        _mm512_srl_epi32(a, _mm_cvtsi32_si128(n))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn to_f32(a: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(a)
    }
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16_bits(x: f32) -> u16 {
        f16_bits(x)
    }
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16_value(b: u16) -> f32 {
        f16_value(b)
    }
}

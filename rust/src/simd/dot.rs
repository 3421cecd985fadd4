//! Dot product of two f32 vectors: the first dispatched kernel, and the
//! building block of mat-vec style scans.
//!
//! Each level keeps several independent accumulators so the FMA latency
//! (4 cycles, 2 ports) is hidden; results therefore differ from a sequential
//! sum by ordinary float reassociation, never by more.

use super::Level;
use crate::error::Result;
use crate::validate;

/// Vectors longer than this are split across the thread pool.
const PARALLEL_CHUNK: usize = 1 << 16;

/// Dot product at the process-wide level ([`super::level`]), parallel over
/// chunks of 64 Ki elements in the neuropil pool when the vectors are long.
pub fn dot(a: &[f32], b: &[f32]) -> Result<f32> {
    let level = super::level()?;
    if a.len() <= PARALLEL_CHUNK || b.len() != a.len() {
        return dot_at(level, a, b);
    }
    use rayon::prelude::*;
    // Partial sums are added in chunk order, so the result does not depend on
    // the number of threads.
    let partial: Result<Vec<f32>> = crate::threads::install(|| {
        a.par_chunks(PARALLEL_CHUNK)
            .zip(b.par_chunks(PARALLEL_CHUNK))
            .map(|(x, y)| dot_at(level, x, y))
            .collect()
    })?;
    Ok(partial?.iter().sum())
}

/// Dot product at an explicit level; fails if the CPU does not support it.
pub fn dot_at(level: Level, a: &[f32], b: &[f32]) -> Result<f32> {
    validate::same_len("b", b.len(), a.len(), "a")?;
    level.check()?;
    Ok(match level {
        Level::Scalar => scalar(a, b),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level.check()` above proved the CPU has AVX2 and FMA.
        Level::Avx2 => unsafe { avx2(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `level.check()` above proved the CPU has AVX-512 F.
        Level::Avx512 => unsafe { avx512(a, b) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: `level.check()` above proved the CPU has NEON.
        Level::Neon => unsafe { neon(a, b) },
        #[allow(unreachable_patterns)]
        _ => scalar(a, b),
    })
}

/// Portable version: eight lanes of partial sums, which LLVM keeps in
/// registers (and vectorises with the baseline SSE2 on x86-64).
fn scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, ta) = a.split_at(a.len() / 8 * 8);
    let (cb, tb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8 * j + 8 <= i + 32 <= n = a.len() = b.len(); unaligned loads.
            let (x, y) = unsafe {
                (
                    _mm256_loadu_ps(pa.add(i + 8 * j)),
                    _mm256_loadu_ps(pb.add(i + 8 * j)),
                )
            };
            *s = _mm256_fmadd_ps(x, y, *s);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n.
        let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds exactly 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum::<f32>() + scalar(&a[i..], &b[i..])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16 * j + 16 <= i + 64 <= n = a.len() = b.len().
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(pa.add(i + 16 * j)),
                    _mm512_loadu_ps(pb.add(i + 16 * j)),
                )
            };
            *s = _mm512_fmadd_ps(x, y, *s);
        }
        i += 64;
    }
    if i < n {
        // Masked loads read only the remaining elements: no scalar tail loop.
        let mut k = i;
        while k < n {
            let left = (n - k).min(16);
            let mask: __mmask16 = ((1u32 << left) - 1) as __mmask16;
            // SAFETY: the mask enables only lanes k..k+left, all < n.
            let (x, y) = unsafe {
                (
                    _mm512_maskz_loadu_ps(mask, pa.add(k)),
                    _mm512_maskz_loadu_ps(mask, pb.add(k)),
                )
            };
            acc[1] = _mm512_fmadd_ps(x, y, acc[1]);
            k += left;
        }
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum)
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::aarch64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            // SAFETY: i + 4 * j + 4 <= i + 16 <= n.
            let (x, y) = unsafe { (vld1q_f32(pa.add(i + 4 * j)), vld1q_f32(pb.add(i + 4 * j))) };
            *s = vfmaq_f32(*s, x, y);
        }
        i += 16;
    }
    let sum = vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3]));
    vaddvq_f32(sum) + scalar(&a[i..], &b[i..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    proptest! {
        #[test]
        fn every_supported_level_matches_f64_reference(
            v in prop::collection::vec((-1.0f32..1.0, -1.0f32..1.0), 0..300)
        ) {
            let (a, b): (Vec<f32>, Vec<f32>) = v.into_iter().unzip();
            let want = reference(&a, &b);
            let bound = 1e-5 * (a.len() as f64 + 1.0);
            for level in Level::supported() {
                let got = dot_at(level, &a, &b).unwrap() as f64;
                prop_assert!((got - want).abs() <= bound, "{level}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn parallel_dot_is_thread_count_independent() {
        let a: Vec<f32> = (0..300_001)
            .map(|i| ((i % 97) as f32 - 48.0) / 48.0)
            .collect();
        let b: Vec<f32> = (0..300_001)
            .map(|i| ((i % 89) as f32 - 44.0) / 44.0)
            .collect();
        let _guard = crate::threads::TEST_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let want = reference(&a, &b);
        let one = dot(&a, &b).unwrap();
        assert!(
            (one as f64 - want).abs() < 1e-2 * want.abs().max(1.0),
            "{one} vs {want}"
        );
        crate::threads::set_num_threads(1).unwrap();
        let single = dot(&a, &b).unwrap();
        crate::threads::set_num_threads(2).unwrap();
        assert_eq!(single.to_bits(), dot(&a, &b).unwrap().to_bits());
    }

    #[test]
    fn length_mismatch_is_a_shape_error() {
        let err = dot(&[1.0, 2.0], &[1.0]).unwrap_err().to_string();
        assert_eq!(err, "b must have shape (2,) to match a; got (1,)");
    }

    #[test]
    fn unsupported_level_errors() {
        for level in Level::ALL {
            assert_eq!(dot_at(level, &[1.0], &[2.0]).is_ok(), level.is_supported());
        }
    }
}

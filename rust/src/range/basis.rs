//! The keys' principal basis: mean and eigenvectors of the covariance, in f64.
//!
//! LLM keys after RoPE are low-rank: a few principal directions carry most of
//! their energy. Rotating keys and queries into this basis makes the first
//! coordinates of a dot product carry most of its value, and the rest is
//! bounded by Cauchy-Schwarz on the tail norms. The eigenvectors come from the
//! cyclic Jacobi method on the d x d covariance: deterministic, exactly
//! orthonormal to f64 rounding, no external LAPACK.

/// Mean and orthonormal principal directions of a set of keys.
#[derive(Debug, Clone)]
pub struct Basis {
    /// Dimension.
    pub d: usize,
    /// Mean key, f64.
    pub mean: Vec<f64>,
    /// Directions as rows (`dirs[r * d + j]`), by decreasing variance.
    pub dirs: Vec<f64>,
    /// Variance along each direction.
    pub var: Vec<f64>,
}

impl Basis {
    /// Fits the basis to `keys` (`n x d`, row-major). `n` may be 1.
    pub fn fit(keys: &[f32], d: usize) -> Basis {
        let n = keys.len() / d;
        let mut mean = vec![0.0f64; d];
        for k in keys.chunks_exact(d) {
            for (m, &x) in mean.iter_mut().zip(k) {
                *m += x as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
        // Covariance accumulated in f64 (upper triangle, mirrored below), over
        // chunks of 4096 keys in the thread pool, summed in chunk order (the
        // result does not depend on the thread count).
        let chunk_cov = |chunk: &[f32]| {
            let mut cov = vec![0.0f64; d * d];
            let mut c = vec![0.0f64; d];
            for k in chunk.chunks_exact(d) {
                for j in 0..d {
                    c[j] = k[j] as f64 - mean[j];
                }
                for a in 0..d {
                    let ca = c[a];
                    let row = &mut cov[a * d..(a + 1) * d];
                    for b in a..d {
                        row[b] += ca * c[b];
                    }
                }
            }
            cov
        };
        let parts: Vec<Vec<f64>> = {
            use rayon::prelude::*;
            let chunks: Vec<&[f32]> = keys.chunks(4096 * d).collect();
            crate::threads::install(|| chunks.par_iter().map(|c| chunk_cov(c)).collect())
                .unwrap_or_else(|_| chunks.iter().map(|c| chunk_cov(c)).collect())
        };
        let mut cov = vec![0.0f64; d * d];
        for p in parts {
            for (x, y) in cov.iter_mut().zip(p) {
                *x += y;
            }
        }
        for a in 0..d {
            for b in 0..a {
                cov[a * d + b] = cov[b * d + a];
            }
        }
        let (var, vecs) = jacobi_eigen(cov, d);
        // Sort directions by decreasing variance.
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| var[b].total_cmp(&var[a]).then(a.cmp(&b)));
        let mut dirs = vec![0.0f64; d * d];
        for (r, &col) in order.iter().enumerate() {
            for j in 0..d {
                dirs[r * d + j] = vecs[j * d + col];
            }
        }
        let var = order.iter().map(|&i| var[i] / n.max(1) as f64).collect();
        Basis { d, mean, dirs, var }
    }

    /// Rotated coordinates `dirs . (x - shift)` in f64; `shift` is the mean for
    /// keys and zero for queries.
    pub fn rotate(&self, x: &[f32], centre: bool, out: &mut [f64]) {
        let d = self.d;
        let v: Vec<f64> = if centre {
            x.iter()
                .zip(&self.mean)
                .map(|(&a, &m)| a as f64 - m)
                .collect()
        } else {
            x.iter().map(|&a| a as f64).collect()
        };
        for (r, o) in out.iter_mut().enumerate().take(d) {
            *o = dot8(&self.dirs[r * d..(r + 1) * d], &v);
        }
    }
}

/// `a . b` in f64 with eight independent partial sums: one serial chain of
/// `d` dependent additions is what made rotating a query cost more than its
/// whole 8-bit scan. Rounding differs from a serial sum by far less than the
/// search margin (see `search`), which only needs an f64-accurate rotation.
fn dot8(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let (ac, at) = a.split_at(a.len() / 8 * 8);
    let (bc, bt) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f64 = at.iter().zip(bt).map(|(x, y)| x * y).sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Eigen-decomposition of a symmetric matrix by cyclic Jacobi rotations.
/// Returns (eigenvalues, eigenvectors as columns of a row-major d x d matrix).
fn jacobi_eigen(mut a: Vec<f64>, d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0f64; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    let total: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..60 {
        let off: f64 = (0..d)
            .flat_map(|p| (0..d).filter(move |&q| q != p).map(move |q| (p, q)))
            .map(|(p, q)| a[p * d + q] * a[p * d + q])
            .sum();
        if off <= 1e-30 * total {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let akp = a[k * d + p];
                    let akq = a[k * d + q];
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let apk = a[p * d + k];
                    let aqk = a[q * d + k];
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let vkp = v[k * d + p];
                    let vkq = v[k * d + q];
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let vals = (0..d).map(|i| a[i * d + i]).collect();
    (vals, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basis_is_orthonormal_and_sorted() {
        let d = 12;
        let mut keys = Vec::new();
        let mut s = 7u64;
        for i in 0..500 {
            for j in 0..d {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = ((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * 0.1;
                let signal = if j < 2 {
                    (i as f64 * 0.37).sin() * (j + 1) as f64
                } else {
                    0.0
                };
                keys.push((signal + noise + 1.0) as f32);
            }
        }
        let b = Basis::fit(&keys, d);
        for r in 0..d {
            for s2 in 0..d {
                let dot: f64 = (0..d).map(|j| b.dirs[r * d + j] * b.dirs[s2 * d + j]).sum();
                let want = if r == s2 { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-10, "{r} {s2} {dot}");
            }
        }
        assert!(b.var.windows(2).all(|w| w[0] >= w[1]));
        assert!(b.var[0] > 10.0 * b.var[3]);
    }
}

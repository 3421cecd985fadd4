//! FlyHash (Dasgupta, Stevens, Navlakha, Science 2017): a sparse random
//! expansion of a `d`-dimensional input to `m >> d` outputs followed by a
//! winner-take-all that keeps the `k` largest; a locality-sensitive sparse code.
//!
//! - [`rng`]: the counter-based SplitMix64 generator every projection comes from.
//! - [`projection`]: the `sign`, `sparse` and `seeded` projections.
//! - [`plan`]: a sparse projection in the order the sparse kernel reads it.
//! - [`kernels`]: activations of 16 vectors at a time, identical at every level.
//! - [`wta`]: winner-take-all with the lowest-index tie rule.
//! - [`hamming`], [`index`]: packed binary codes and their Hamming/Jaccard search.
//! - [`file`](mod@file): safetensors persistence of encoders and indexes.

mod atomic;
pub mod file;
pub mod hamming;
pub mod index;
pub mod kernels;
mod kernels_sparse;
mod kernels_x86;
pub mod plan;
pub mod projection;
pub mod rng;
mod scan;
pub mod wta;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::simd::Level;
use crate::validate;
pub use index::{BinaryIndex, Metric};
use kernels::{Proj, Scratch, LANES};
pub use projection::{Kind, Weights};

/// The largest single buffer (projection or output) a call may allocate: 8 GiB.
/// Larger requests fail with a message before anything is allocated.
pub const MAX_BYTES: usize = 8 << 30;

/// Largest input dimension of a sparse projection (indices and row positions are `u16`).
pub const MAX_SPARSE_DIM: usize = 65_535;

/// What the user asks for; [`FlyHash::new`] validates it.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub input_dim: usize,
    pub expansion_ratio: f64,
    pub active_fraction: f64,
    pub seed: u64,
    pub kind: Kind,
    pub connectivity: f64,
    pub binary: bool,
}

/// A FlyHash encoder.
#[derive(Debug, Clone)]
pub struct FlyHash {
    pub config: Config,
    /// `m = floor(input_dim * expansion_ratio)`.
    pub output_dim: usize,
    /// `k = floor(m * active_fraction)`.
    pub active_bits: usize,
    /// Connections per output of a sparse projection (`round(connectivity * d)`), else 0.
    pub connections: usize,
    pub weights: Weights,
}

/// Where [`FlyHash::encode`] writes, one row per input vector.
pub enum Output<'a> {
    /// `(n, m)` float32: the winners' activations, zeros elsewhere.
    Dense(&'a mut [f32]),
    /// `(n, k)` uint32: the winners' output indices, ascending.
    Indices(&'a mut [u32]),
    /// `(n, ceil(m / 8))` uint8: winner bits, faiss layout (bit `j` is bit `j % 8`
    /// of byte `j / 8`).
    Packed(&'a mut [u8]),
    /// `(n, m)` float32: every activation, before winner-take-all.
    Activations(&'a mut [f32]),
}

/// `what` (shown as `found`) would make `result` take `bytes`, over [`MAX_BYTES`].
fn too_big(what: &'static str, found: String, result: &str, bytes: u128) -> Error {
    Error::value(
        what,
        format!(
            "small enough for the {result} to fit in {} GiB ({MAX_BYTES} bytes)",
            MAX_BYTES >> 30
        ),
        format!(
            "{found} ({result}: {bytes} bytes, {:.1} GiB)",
            bytes as f64 / (1u64 << 30) as f64
        ),
    )
}

/// A count for a message: exact below 1e18, else in scientific notation (a
/// float's `Display` would print all 300 digits of 1e300).
fn count(x: f64) -> String {
    if x < 1e18 {
        format!("{}", x as u128)
    } else {
        format!("{x:.3e}")
    }
}

/// The configuration gives too many outputs (`m_f`), or a projection of
/// `bytes` (f64: past u128 for absurd ratios): names `input_dim` when even
/// `output_dim = input_dim` (`expansion_ratio` 1) would be too big (the input
/// dimension itself is the problem), else `expansion_ratio`, with the other
/// argument and the size it gives in the found value.
fn too_many_outputs(config: &Config, m_f: f64, bytes: f64, bytes_at_ratio_1: f64) -> Error {
    let (d, er) = (config.input_dim, config.expansion_ratio);
    let projection = bytes > MAX_BYTES as f64;
    let input_too_big = if projection {
        bytes_at_ratio_1 > MAX_BYTES as f64
    } else {
        d as f64 > u32::MAX as f64
    };
    let (arg, found) = if input_too_big {
        ("input_dim", format!("{d} (with expansion_ratio={er:?}"))
    } else {
        ("expansion_ratio", format!("{er:?} (with input_dim={d}"))
    };
    if projection {
        Error::value(
            arg,
            format!(
                "small enough for the {} projection to fit in {} GiB ({MAX_BYTES} bytes)",
                config.kind.name(),
                MAX_BYTES >> 30
            ),
            format!(
                "{found}: output_dim = {}, a projection of {} bytes)",
                count(m_f),
                count(bytes)
            ),
        )
    } else {
        Error::value(
            arg,
            format!(
                "small enough for output_dim = floor(input_dim * expansion_ratio) to be \
                 at most {} (u32 output indices)",
                u32::MAX
            ),
            format!("{found}: output_dim = {})", count(m_f)),
        )
    }
}

impl FlyHash {
    /// Validates `config` and generates the projection.
    pub fn new(config: Config) -> Result<Self> {
        let (m, k, c) = Self::dims(&config)?;
        let d = config.input_dim;
        let weights = match config.kind {
            Kind::Sign => Weights::Sign(projection::generate_sign(config.seed, d, m)),
            Kind::Seeded => Weights::Seeded,
            Kind::Sparse => projection::generate_sparse(config.seed, d, m, c, config.binary),
        };
        Ok(FlyHash {
            config,
            output_dim: m,
            active_bits: k,
            connections: c,
            weights,
        })
    }

    /// Validates `config` and returns `(output_dim, active_bits, connections)`
    /// without allocating anything: what [`FlyHash::new`] would build (a
    /// loader checks a file's tensors against these before generating).
    pub fn dims(config: &Config) -> Result<(usize, usize, usize)> {
        let d = config.input_dim;
        if d == 0 {
            return Err(Error::value("input_dim", "a positive integer", 0));
        }
        let er = config.expansion_ratio;
        if !er.is_finite() || er <= 0.0 {
            return Err(Error::value("expansion_ratio", "a finite number > 0", er));
        }
        let m_f = (d as f64 * er).floor();
        if m_f < 1.0 {
            return Err(Error::value(
                "expansion_ratio",
                format!("large enough to give at least 1 output for input_dim={d}"),
                format!("{er} (output_dim = 0)"),
            ));
        }
        // (saturates for an absurd ratio: the size check below refuses it)
        let m = m_f as usize;
        let af = config.active_fraction;
        if !af.is_finite() || af <= 0.0 {
            return Err(Error::value("active_fraction", "a number in (0, 1]", af));
        }
        let k_f = (m as f64 * af).floor();
        if k_f > m as f64 {
            return Err(Error::value(
                "active_fraction",
                format!("at most 1 (active_bits <= output_dim = {m})"),
                format!("{af} (active_bits = {k_f})"),
            ));
        }
        if k_f < 1.0 {
            return Err(Error::value(
                "active_fraction",
                format!("large enough to give at least 1 active output of {m}"),
                format!("{af} (active_bits = 0)"),
            ));
        }
        let k = k_f as usize;
        if config.binary && config.kind != Kind::Sparse {
            return Err(Error::value(
                "binary",
                "False unless projection='sparse' (0/1 weights are a sparse projection)",
                format!("True with projection={:?}", config.kind.name()),
            ));
        }
        // Checked for every projection, though only `sparse` reads it: a NaN
        // here would otherwise be kept, saved and loaded as if it meant something.
        let ct = config.connectivity;
        if !ct.is_finite() || ct <= 0.0 || ct > 1.0 {
            return Err(Error::value("connectivity", "a number in (0, 1]", ct));
        }
        let mut c = 0;
        // Bytes of one projection row (0 for `seeded`: it has no weights).
        let row_bytes = match config.kind {
            Kind::Sign => projection::sign_row_bytes(d),
            Kind::Seeded => 0,
            Kind::Sparse => {
                if d > MAX_SPARSE_DIM {
                    return Err(Error::value(
                        "input_dim",
                        format!("at most {MAX_SPARSE_DIM} for projection='sparse' (u16 indices)"),
                        d,
                    ));
                }
                c = (ct * d as f64).round() as usize;
                if c == 0 {
                    return Err(Error::value(
                        "connectivity",
                        format!("large enough to give at least 1 connection of {d} inputs"),
                        format!("{ct} (0 connections)"),
                    ));
                }
                // Per row: c u16 offsets, the sign bits, a u32 row number per
                // input block (see `plan`).
                2 * c + projection::sparse_sign_bytes(c) + 4 * projection::sparse_blocks(d)
            }
        };
        // In f64: m_f * row_bytes overflows u128 for a ratio like 1e300.
        let bytes = m_f * row_bytes as f64;
        if bytes > MAX_BYTES as f64 || m_f > u32::MAX as f64 {
            let at_ratio_1 = d as f64 * row_bytes as f64;
            return Err(too_many_outputs(config, m_f, bytes, at_ratio_1));
        }
        Ok((m, k, c))
    }

    /// Bytes the projection occupies (0 for `seeded`).
    pub fn memory_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// Bytes per packed code, `ceil(m / 8)`.
    pub fn code_bytes(&self) -> usize {
        self.output_dim.div_ceil(8)
    }

    /// Elements of an output for `n` vectors (`per_row` each), refusing sizes
    /// over [`MAX_BYTES`] before anything is allocated.
    pub fn output_len(&self, n: usize, per_row: usize, elem_bytes: usize) -> Result<usize> {
        let bytes = n as u128 * per_row as u128 * elem_bytes as u128;
        if bytes > MAX_BYTES as u128 {
            let shape = format!("shape ({n}, {})", self.config.input_dim);
            return Err(too_big("x", shape, "output", bytes));
        }
        Ok(n * per_row)
    }

    /// Encodes `n` vectors (`x`: `n * input_dim` floats, row-major) at the
    /// process-wide SIMD level, in parallel batches of 16 in the neuropil pool.
    pub fn encode(&self, x: &[f32], n: usize, out: Output<'_>) -> Result<()> {
        self.encode_at(crate::simd::level()?, x, n, out)
    }

    /// [`FlyHash::encode`] at an explicit level (fails if the CPU lacks it).
    pub fn encode_at(&self, level: Level, x: &[f32], n: usize, out: Output<'_>) -> Result<()> {
        level.check()?;
        let (d, m, k) = (self.config.input_dim, self.output_dim, self.active_bits);
        let expected = format!("(n, {d})");
        if x.len() != n * d {
            return Err(Error::shape("x", expected, &[n, x.len() / n.max(1)]));
        }
        validate::finite("x", x)?;
        let cb = self.code_bytes();
        let (want, got) = match &out {
            Output::Dense(o) | Output::Activations(o) => (n * m, o.len()),
            Output::Indices(o) => (n * k, o.len()),
            Output::Packed(o) => (n * cb, o.len()),
        };
        if want != got {
            return Err(Error::value("out", format!("{want} elements"), got));
        }
        if n == 0 {
            // An empty batch: its (0, ...) output is already complete.
            return Ok(());
        }
        let p = Proj {
            d,
            m,
            seed: self.config.seed,
            weights: &self.weights,
        };
        let sparse = matches!(self.weights, Weights::Sparse { .. });
        match out {
            Output::Dense(o) => drive(level, p, sparse, k, x, o, m, |vals, win, row| {
                row.fill(0.0);
                for &i in win {
                    row[i as usize] = vals[i as usize];
                }
            }),
            Output::Activations(o) => drive_raw(level, p, sparse, x, o),
            Output::Indices(o) => drive(level, p, sparse, k, x, o, k, |_, win, row| {
                row.copy_from_slice(win);
            }),
            Output::Packed(o) => drive(level, p, sparse, k, x, o, cb, |_, win, row| {
                row.fill(0);
                for &i in win {
                    row[i as usize / 8] |= 1 << (i % 8);
                }
            }),
        }
    }
}

/// Thread-local state of one encode task.
struct Task {
    scratch: Scratch,
    values: Vec<f32>,
    winners: Vec<u32>,
    wta: wta::Wta,
}

#[allow(clippy::too_many_arguments)]
fn drive<T: Send>(
    level: Level,
    p: Proj<'_>,
    sparse: bool,
    k: usize,
    x: &[f32],
    out: &mut [T],
    row_len: usize,
    write: impl Fn(&[f32], &[u32], &mut [T]) + Sync,
) -> Result<()> {
    let pairs = kernels::pairs(level, p);
    let per = if pairs { 2 * LANES } else { LANES };
    crate::threads::install(|| {
        out.par_chunks_mut(per * row_len)
            .zip(x.par_chunks(per * p.d))
            .for_each_init(
                || Task {
                    scratch: Scratch::new(p.m, p.d, sparse),
                    values: vec![0.0; LANES * p.m],
                    winners: vec![0; k],
                    wta: wta::Wta::default(),
                },
                |t, (o, xb)| {
                    let nb = xb.len() / p.d;
                    if nb > LANES {
                        kernels::activations_pair(level, p, xb, nb, &mut t.scratch);
                    } else {
                        kernels::activations(level, p, xb, nb, &mut t.scratch);
                    }
                    let halves = [t.scratch.acc(), t.scratch.acc_second()];
                    for (h, o) in o.chunks_mut(LANES * row_len).enumerate() {
                        let nb = o.len() / row_len;
                        let values = &mut t.values[..nb * p.m];
                        kernels::unpack(level, halves[h], nb, values);
                        for (vals, row) in values.chunks_exact(p.m).zip(o.chunks_exact_mut(row_len))
                        {
                            t.wta.winners(level, vals, k, &mut t.winners);
                            write(vals, &t.winners, row);
                        }
                    }
                },
            )
    })
}

fn drive_raw(level: Level, p: Proj<'_>, sparse: bool, x: &[f32], out: &mut [f32]) -> Result<()> {
    crate::threads::install(|| {
        out.par_chunks_mut(LANES * p.m)
            .zip(x.par_chunks(LANES * p.d))
            .for_each_init(
                || Scratch::new(p.m, p.d, sparse),
                |s, (o, xb)| {
                    let nb = xb.len() / p.d;
                    kernels::activations(level, p, xb, nb, s);
                    kernels::unpack(level, s.acc(), nb, o);
                },
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: Kind) -> Config {
        Config {
            input_dim: 1536,
            expansion_ratio: 13.0,
            active_fraction: 0.05,
            seed: 42,
            kind,
            connectivity: 0.1,
            binary: false,
        }
    }

    #[test]
    fn sizes_and_memory_at_the_issue_size() {
        let sign = FlyHash::new(cfg(Kind::Sign)).unwrap();
        assert_eq!((sign.output_dim, sign.active_bits), (19_968, 998));
        assert!(sign.memory_bytes() <= 4_000_000);
        let sparse = FlyHash::new(cfg(Kind::Sparse)).unwrap();
        assert_eq!(sparse.connections, 154);
        assert!(
            sparse.memory_bytes() <= 7_000_000,
            "{}",
            sparse.memory_bytes()
        );
        assert_eq!(FlyHash::new(cfg(Kind::Seeded)).unwrap().memory_bytes(), 0);
    }

    #[test]
    fn encode_outputs_agree_and_levels_match() {
        let mut c = cfg(Kind::Sparse);
        c.input_dim = 50;
        let fh = FlyHash::new(c).unwrap();
        let (n, m, k) = (19, fh.output_dim, fh.active_bits);
        let x: Vec<f32> = (0..n * 50)
            .map(|i| ((i * 7919) % 97) as f32 - 48.0)
            .collect();
        let mut idx = vec![0u32; n * k];
        fh.encode(&x, n, Output::Indices(&mut idx)).unwrap();
        let mut dense = vec![0f32; n * m];
        fh.encode(&x, n, Output::Dense(&mut dense)).unwrap();
        let mut packed = vec![0u8; n * fh.code_bytes()];
        fh.encode(&x, n, Output::Packed(&mut packed)).unwrap();
        for v in 0..n {
            let row = &idx[v * k..(v + 1) * k];
            assert!(row.windows(2).all(|w| w[0] < w[1]));
            let ones: u32 = packed[v * fh.code_bytes()..(v + 1) * fh.code_bytes()]
                .iter()
                .map(|b| b.count_ones())
                .sum();
            assert_eq!(ones as usize, k);
            for &i in row {
                assert_eq!(
                    packed[v * fh.code_bytes() + i as usize / 8] >> (i % 8) & 1,
                    1
                );
            }
            let drow = &dense[v * m..(v + 1) * m];
            let nonzero_off_winners = (0..m as u32)
                .filter(|i| row.binary_search(i).is_err())
                .any(|i| drow[i as usize] != 0.0);
            assert!(!nonzero_off_winners);
        }
        for level in Level::supported() {
            let mut other = vec![0u32; n * k];
            fh.encode_at(level, &x, n, Output::Indices(&mut other))
                .unwrap();
            assert_eq!(other, idx, "{level}");
        }
    }

    #[test]
    fn bad_configurations_and_inputs() {
        let mut c = cfg(Kind::Sign);
        c.active_fraction = 1.5;
        assert!(FlyHash::new(c.clone())
            .unwrap_err()
            .to_string()
            .contains("active_bits <= output_dim"));
        c.active_fraction = 0.05;
        c.expansion_ratio = 1e9;
        assert!(FlyHash::new(c).unwrap_err().to_string().contains("GiB"));
        // The argument that made the projection too big, the limit, the size.
        let mut c = cfg(Kind::Sign);
        c.input_dim = 1 << 62;
        assert_eq!(
            FlyHash::new(c.clone()).unwrap_err().to_string(),
            format!(
                "input_dim must be small enough for the sign projection to fit in 8 GiB \
                 (8589934592 bytes); got {} (with expansion_ratio={:?}: output_dim = {}, \
                 a projection of {} bytes)",
                1u64 << 62,
                c.expansion_ratio,
                count((1u64 << 62) as f64 * c.expansion_ratio),
                count((1u64 << 62) as f64 * c.expansion_ratio * (1u64 << 59) as f64),
            )
        );
        c.input_dim = 1536;
        c.expansion_ratio = 1e300;
        let err = FlyHash::new(c.clone()).unwrap_err().to_string();
        assert!(
            err.starts_with("expansion_ratio must be small enough for the sign projection")
                && err.contains("got 1e300 (with input_dim=1536: output_dim = 1.536e303, "),
            "{err}"
        );
        // No projection to speak of: the output indices' limit.
        c.kind = Kind::Seeded;
        c.expansion_ratio = 4e9;
        assert_eq!(
            FlyHash::new(c).unwrap_err().to_string(),
            "expansion_ratio must be small enough for output_dim = floor(input_dim * \
             expansion_ratio) to be at most 4294967295 (u32 output indices); got 4000000000.0 \
             (with input_dim=1536: output_dim = 6144000000000)"
        );
        let fh = FlyHash::new(cfg(Kind::Seeded)).unwrap();
        let mut out = vec![0u32; fh.active_bits];
        let err = fh
            .encode(&[0.0; 1535], 1, Output::Indices(&mut out))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "x must have shape (n, 1536); got (1, 1535)"
        );
        let mut x = vec![0.0f32; 1536];
        x[3] = f32::NAN;
        assert!(fh.encode(&x, 1, Output::Indices(&mut out)).is_err());
    }

    #[test]
    fn connectivity_is_checked_for_every_projection() {
        for kind in [Kind::Sign, Kind::Sparse, Kind::Seeded] {
            for bad in [f64::NAN, f64::INFINITY, 0.0, -0.5, 1.5] {
                let mut c = cfg(kind);
                c.connectivity = bad;
                let err = FlyHash::new(c).unwrap_err().to_string();
                assert!(
                    err.starts_with("connectivity must be"),
                    "{kind:?} {bad}: {err}"
                );
            }
        }
    }

    #[test]
    fn an_empty_batch_encodes_to_nothing_at_every_level() {
        for kind in [Kind::Sign, Kind::Sparse, Kind::Seeded] {
            let mut c = cfg(kind);
            c.input_dim = 40;
            let fh = FlyHash::new(c).unwrap();
            for level in Level::supported() {
                fh.encode_at(level, &[], 0, Output::Dense(&mut [])).unwrap();
                fh.encode_at(level, &[], 0, Output::Activations(&mut []))
                    .unwrap();
                fh.encode_at(level, &[], 0, Output::Indices(&mut []))
                    .unwrap();
                fh.encode_at(level, &[], 0, Output::Packed(&mut []))
                    .unwrap();
                // A wrong output size is still an error for n = 0.
                assert!(fh
                    .encode_at(level, &[], 0, Output::Packed(&mut [0u8; 1]))
                    .is_err());
                assert!(fh
                    .encode_at(level, &[1.0; 40], 0, Output::Packed(&mut []))
                    .is_err());
            }
        }
    }
}

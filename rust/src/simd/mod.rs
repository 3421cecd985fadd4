//! Runtime SIMD dispatch and the kernels that use it.
//!
//! The level is chosen once per process ([`level`]), from the CPU's features or
//! from `NEUROPIL_KERNEL=scalar|avx2|avx512|neon`. Every kernel has a scalar
//! version that is always compiled, so `NEUROPIL_KERNEL=scalar` runs (and tests)
//! the whole library without any vector instruction. Kernels also take an
//! explicit level (`*_at`) so tests can compare every level the CPU has within
//! one process.

mod dispatch;
mod dot;
mod filter;

pub use dispatch::{cpu_features, level, resolve, Level};
pub use dot::{dot, dot_at};
pub use filter::above;

//! Activation sparsity: a neuron cache that keeps the frequently active FFN
//! neurons in a bounded hot set, and sparse FFN kernels that compute only the
//! active neurons of neuron-major bundled weights.
//!
//! - [`cache`]: [`NeuronCache`], recording activity and choosing the hot set.
//! - [`weights`]: the [`NeuronWeights`] storage trait and [`Bundled`] weights
//!   (f32, f16, 8-bit and 4-bit row-quantized).
//! - [`elem`]: element types and their run kernels; [`rows`]: those kernels
//!   over several input rows at once.
//! - [`axpy`]: the dispatched `y += a * w` kernel; `fused`: its one-pass
//!   versions for f16 and quantized `w` (explicit AVX-512 loops); `widened`:
//!   the same for the integer codes as plain loops the compiler widens.
//! - [`ffn`]: [`SparseFfn`], the sparse forward pass; [`activation`]: its non-linearities.
//! - [`input_sparse`]: [`InputSparseFfn`], the TEAL-style FFN that drops small
//!   inputs of every projection instead of neurons.
//! - `select`: the O(n) radix selection of the hot set.

pub mod activation;
pub mod axpy;
pub mod cache;
pub mod elem;
pub mod ffn;
mod fused;
pub mod input_sparse;
pub mod rows;
mod select;
pub mod weights;
mod widened;

pub use cache::{CacheConfig, CacheState, CacheStats, NeuronCache, Policy};
pub use elem::{Elem, Q4, Q8};
pub use ffn::{Activation, FfnStats, Select, SparseFfn};
pub use input_sparse::{InputSparseFfn, InputSparseStats, Kept};
pub use weights::{Bundled, NeuronWeights};

#[cfg(test)]
mod tests;

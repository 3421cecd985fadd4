//! Packed quantization of weight matrices: group-wise 2/3/4/8-bit codes with
//! float16 (or float32) scales and mins, GGUF `Q4_0`/`Q4_1`/`Q8_0` blocks, and
//! fused kernels that multiply with the packed codes directly.
//!
//! - [`format`](mod@format): the layout ([`Params`], [`QuantRef`], [`QuantizedWeights`]);
//! - [`pack`]: packing one group of codes;
//! - [`quantize`](mod@quantize): quantize (round-to-nearest, GGUF rounding);
//! - `search`: the error-minimising scale search of `search = true`;
//! - [`dequantize`](mod@dequantize): dequantize;
//! - `kernels`: the explicit AVX2/AVX-512 quantize and dequantize kernels;
//! - `headroom`: the power-of-two rescale of huge activations (mat-vec, mat-mul);
//! - `pages`: huge-page advice for large fresh outputs;
//! - [`matvec`](mod@matvec): fused mat-vec, also over a subset of rows;
//! - `row_dot`: its float32-activation row dots, one per level;
//! - [`matmul`](mod@matmul): fused mat-mul for batches;
//! - [`gemm_vnni`]: the 4-bit mat-mul with int16 activations (AVX-512 VNNI);
//! - `act16`: activations as int16 per group, laid out for the VNNI kernels;
//! - `vnni`: the mat-vec with int16 activations for every width (AVX-512 VNNI);
//! - [`gguf`]: GGUF block conversion;
//! - [`bandwidth`]: the memory read bandwidth, the mat-vec's limit.

pub(crate) mod act16;
pub mod bandwidth;
pub mod dequantize;
pub mod format;
pub mod gemm_vnni;
pub mod gguf;
mod headroom;
// Instantiated for x86-64 levels only (elsewhere the scalar reference runs).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod kernels;
pub mod matmul;
pub mod matvec;
pub mod pack;
pub(crate) mod pages;
pub mod quantize;
mod row_dot;
mod search;
pub(crate) mod vnni;

pub use bandwidth::read_bandwidth;
pub use dequantize::{dequantize, dequantize_into, dequantize_into_at};
pub use format::{Params, QuantRef, QuantizedWeights, ScaleSlice, ScaleType, Scales, Scheme};
pub use gguf::{from_gguf, to_gguf};
pub use matmul::{matmul, matmul_at};
pub use matvec::{matvec, matvec_at, matvec_rows};
pub use quantize::{quantize, quantize_at};

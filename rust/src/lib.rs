//! neuropil: memory-frugal building blocks for neural inference and neural memory.
//!
//! This crate is the pure-Rust core: every hot loop lives here and is usable and
//! testable without Python. The PyO3 bindings (`rust/python`) are a thin layer on
//! top that validates Python inputs, borrows numpy buffers and releases the GIL.
//!
//! Modules, one idea each:
//! - [`error`]: the one error type every fallible call returns.
//! - [`simd`]: runtime CPU-feature dispatch, chosen once, with a scalar fallback.
//! - [`threads`]: the rayon pool all parallel work runs in, and the spinning
//!   team of its threads that short calls use.
//! - [`validate`]: argument checks shared by every entry point.

pub mod error;
pub mod flyhash;
pub mod neurons;
pub mod quant;
pub mod range;
pub mod simd;
pub mod threads;
pub mod validate;
pub mod windows;

pub use error::{Error, Result};
pub use simd::Level;

/// Version of the core crate (the Python package reports the same number).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

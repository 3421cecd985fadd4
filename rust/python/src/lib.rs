//! `neuropil._native`: PyO3 bindings of the neuropil core.
//!
//! Bindings only: each file exposes one capability, validates Python inputs
//! (shape, dtype, finiteness) through `buffers`, borrows numpy memory without
//! copying, and releases the GIL around the core call. No algorithm lives here.

use pyo3::prelude::*;

mod buffers;
mod errors;
mod flyhash;
mod input_sparse;
mod neurons;
mod quant;
mod range;
mod shared;
mod system;
mod windows;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", neuropil::VERSION)?;
    system::register(m)?;
    windows::register(m)?;
    flyhash::register(m)?;
    quant::register(m)?;
    range::register(m)?;
    neurons::register(m)?;
    input_sparse::register(m)?;
    Ok(())
}

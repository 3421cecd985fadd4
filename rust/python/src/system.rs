//! Process-level bindings: SIMD level, thread pool, and the dispatch-proving
//! dot product.

use pyo3::prelude::*;
use pyo3::types::PyInt;

use crate::buffers::{f32_input, Expect};
use crate::errors::OrRaise;
use neuropil::simd::{self, Level};

/// The SIMD level kernels use (`NEUROPIL_KERNEL` or the best the CPU has).
#[pyfunction]
fn simd_level() -> PyResult<&'static str> {
    Ok(simd::level().or_raise()?.name())
}

/// Every level this CPU can run, lowest first.
#[pyfunction]
fn simd_levels() -> Vec<&'static str> {
    Level::supported().iter().map(|l| l.name()).collect()
}

/// Optional CPU features detected at run time (e.g. `avx512vnni`).
#[pyfunction]
fn cpu_features() -> Vec<&'static str> {
    simd::cpu_features()
}

/// `n` is any Python int: one past `usize` (`2**70`, `-1`) is out of range
/// like `10**6`, with the same message, not an `OverflowError`.
#[pyfunction]
fn set_num_threads(n: &Bound<'_, PyInt>) -> PyResult<()> {
    let Ok(count) = n.extract::<usize>() else {
        return Err(neuropil::Error::value(
            "n",
            format!(
                "a positive integer at most {}",
                neuropil::threads::MAX_THREADS
            ),
            n.str()?,
        ))
        .or_raise();
    };
    neuropil::threads::set_num_threads(count).or_raise() // (0 and past the bound refused there)
}

#[pyfunction]
fn get_num_threads() -> PyResult<usize> {
    neuropil::threads::num_threads().or_raise()
}

/// Microseconds the short-call team's threads spin between calls
/// (`NEUROPIL_SPIN_US`; 0: no team).
#[pyfunction]
fn spin_us() -> PyResult<u128> {
    Ok(neuropil::threads::team::spin_time().or_raise()?.as_micros())
}

// NaN and Inf propagate through a dot product, as they do in numpy.
const A: Expect = Expect::new("a", &[1], "(n,)").allow_non_finite();
const B: Expect = Expect::new("b", &[1], "(n,)").allow_non_finite();

/// Dot product of two 1-D float vectors, parallel for long inputs; `level`
/// forces one SIMD level for this call (tests compare every level).
#[pyfunction]
#[pyo3(signature = (a, b, level=None))]
fn dot(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    level: Option<&str>,
) -> PyResult<f32> {
    let (a, b) = (A.read(a)?, B.read(b)?);
    let forced = match level {
        None => None,
        Some(_) => Some(simd::resolve(level).or_raise()?),
    };
    let (xa, xb) = (a.as_slice(), b.as_slice());
    py.detach(|| match forced {
        None => simd::dot(xa, xb),
        Some(l) => simd::dot_at(l, xa, xb),
    })
    .or_raise()
}

/// Where the core would read `x` from, and whether it had to copy: the
/// zero-copy guarantee made testable. With `checked`, `x` also goes through
/// the checks every 1-D/2-D float input of a kernel gets (rank, non-empty,
/// finite), so the binding layer's error messages are tested in one place.
#[pyfunction]
#[pyo3(signature = (x, checked=false))]
fn _input_info(x: &Bound<'_, PyAny>, checked: bool) -> PyResult<(usize, bool)> {
    const X: Expect = Expect::new("x", &[1, 2], "(d,) or (n, d)");
    let input = if checked {
        X.read(x)?
    } else {
        f32_input(x, "x")?
    };
    Ok((input.ptr(), input.copied))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(spin_us, m)?)?;
    m.add_function(wrap_pyfunction!(dot, m)?)?;
    m.add_function(wrap_pyfunction!(_input_info, m)?)?;
    Ok(())
}

//! Bindings of the input-sparse (TEAL-style) FFN (`neuropil.neurons.InputSparseFFN` wraps them).

use half::f16;
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffers::Expect;
use crate::errors::OrRaise;
use neuropil::neurons::{Activation, InputSparseFfn, Q4, Q8};
use neuropil::Error;

enum Ffn {
    F32(InputSparseFfn<f32>),
    F16(InputSparseFfn<f16>),
    Q8(InputSparseFfn<Q8>),
    Q4(InputSparseFfn<Q4>),
}

/// Runs `$body` with `$f` bound to the typed FFN.
macro_rules! with_ffn {
    ($self:expr, $f:ident => $body:expr) => {
        match $self {
            Ffn::F32($f) => $body,
            Ffn::F16($f) => $body,
            Ffn::Q8($f) => $body,
            Ffn::Q4($f) => $body,
        }
    };
}

const GATE: Expect = Expect::new("gate", &[2], "(h, d)");
const UP: Expect = Expect::new("up", &[2], "(h, d)");
const DOWN: Expect = Expect::new("down", &[2], "(d, h)");
const UP_BIAS: Expect = Expect::new("up_bias", &[1], "(h,)");
const DOWN_BIAS: Expect = Expect::new("down_bias", &[1], "(d,)");
// A batch of 0 rows gives an empty result, as `nn.Linear` does; a 1-D `x` is
// one token and must hold `d` values.
const X: Expect = Expect::new("x", &[2], "(n, d)").empty_batch_at(2);
const X_ROWS: Expect = Expect::new("x", &[1, 2], "(d,) or (n, d)").empty_batch_at(2);

/// The core input-sparse FFN.
///
/// Frozen: every method reads (the counters are atomics in the core), so
/// Python threads call one object at once without pyo3's borrow flag, which
/// a non-frozen class checks and updates on every call.
#[pyclass(name = "_InputSparseFfn", module = "neuropil._native", frozen)]
pub struct PyInputSparseFfn {
    inner: Ffn,
}

fn matrix<'py>(
    py: Python<'py>,
    v: Vec<f32>,
    r: usize,
    c: usize,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    Ok(numpy::ndarray::Array2::from_shape_vec((r, c), v)
        .map_err(|e| Error::value("x", "a valid shape", e))
        .or_raise()?
        .into_pyarray(py))
}

#[pymethods]
impl PyInputSparseFfn {
    #[new]
    #[pyo3(signature = (gate, up, down, activation, dtype, up_bias=None, down_bias=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        gate: Option<&Bound<'_, PyAny>>,
        up: &Bound<'_, PyAny>,
        down: &Bound<'_, PyAny>,
        activation: &str,
        dtype: &str,
        up_bias: Option<&Bound<'_, PyAny>>,
        down_bias: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let act = Activation::parse(activation).or_raise()?;
        let up = UP.read(up)?;
        let (h, d) = (up.shape()[0], up.shape()[1]);
        let gate = gate.map(|g| GATE.read(g)).transpose()?;
        let down = DOWN.read(down)?;
        let vec = |b: Option<&Bound<'_, PyAny>>, e: &Expect| -> PyResult<Option<Vec<f32>>> {
            Ok(b.map(|b| e.read(b))
                .transpose()?
                .map(|b| b.as_slice().to_vec()))
        };
        let (ub, db) = (vec(up_bias, &UP_BIAS)?, vec(down_bias, &DOWN_BIAS)?);
        let (gs, us, ds) = (
            gate.as_ref().map(|g| g.as_slice()),
            up.as_slice(),
            down.as_slice(),
        );
        // The shape checks live in the core (`InputSparseFfn::new`).
        let inner = py
            .detach(|| -> neuropil::Result<Ffn> {
                Ok(match dtype {
                    "float32" => Ffn::F32(InputSparseFfn::new(gs, us, ds, (h, d), act, ub, db)?),
                    "float16" => Ffn::F16(InputSparseFfn::new(gs, us, ds, (h, d), act, ub, db)?),
                    "int8" => Ffn::Q8(InputSparseFfn::new(gs, us, ds, (h, d), act, ub, db)?),
                    "int4" => Ffn::Q4(InputSparseFfn::new(gs, us, ds, (h, d), act, ub, db)?),
                    other => {
                        return Err(Error::value(
                            "dtype",
                            "one of 'float32', 'float16', 'int8', 'int4'",
                            format!("{other:?}"),
                        ))
                    }
                })
            })
            .or_raise()?;
        Ok(PyInputSparseFfn { inner })
    }

    #[getter]
    fn num_neurons(&self) -> usize {
        with_ffn!(&self.inner, f => f.num_neurons())
    }

    #[getter]
    fn dim(&self) -> usize {
        with_ffn!(&self.inner, f => f.dim())
    }

    #[getter]
    fn gated(&self) -> bool {
        with_ffn!(&self.inner, f => f.gated())
    }

    #[getter]
    fn memory_bytes(&self) -> usize {
        with_ffn!(&self.inner, f => f.memory_bytes())
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        match self.inner {
            Ffn::F32(_) => "float32",
            Ffn::F16(_) => "float16",
            Ffn::Q8(_) => "int8",
            Ffn::Q4(_) => "int4",
        }
    }

    /// The output for `x` (d,) or rows `x` (n, d), of the same rank; None
    /// thresholds keep everything. (A 1-D `x` is the per-token call: no
    /// reshaping on either side.)
    #[pyo3(signature = (x, t_in=None, t_hidden=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t_in: Option<f32>,
        t_hidden: Option<f32>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let x = X_ROWS.read_width(x, self.dim())?;
        let single = x.shape().len() == 1;
        let (rows, xs) = (if single { 1 } else { x.shape()[0] }, x.as_slice());
        let y = with_ffn!(&self.inner, f => {
            let kept = f.prepare(xs, rows, t_in, t_hidden).or_raise()?;
            // A short sweep keeps the GIL (see `Kept::is_short`).
            if kept.is_short() {
                f.sweep(kept)
            } else {
                py.detach(|| f.sweep(kept))
            }
        })
        .or_raise()?;
        if single {
            return Ok(y.into_pyarray(py).into_any());
        }
        Ok(matrix(py, y, rows, self.dim())?.into_any())
    }

    /// The hidden values (n, h) before the hidden mask, inputs masked by `t_in`.
    #[pyo3(signature = (x, t_in=None))]
    fn hidden<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        t_in: Option<f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let x = X.read_width(x, self.dim())?;
        let (rows, xs) = (x.shape()[0], x.as_slice());
        let v = py
            .detach(|| with_ffn!(&self.inner, f => f.hidden(xs, rows, t_in)))
            .or_raise()?;
        matrix(py, v, rows, self.num_neurons())
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = with_ffn!(&self.inner, f => f.stats());
        let d = PyDict::new(py);
        d.set_item("calls", s.calls)?;
        d.set_item("rows", s.rows)?;
        d.set_item("kept_inputs", s.kept_inputs)?;
        d.set_item("kept_hidden", s.kept_hidden)?;
        Ok(d)
    }

    fn reset_stats(&self) {
        with_ffn!(&self.inner, f => f.reset_stats());
    }

    /// The stored weights back in torch layout, as float32: (gate or None, up, down).
    #[allow(clippy::type_complexity)]
    fn to_matrices<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(
        Option<Bound<'py, PyArray2<f32>>>,
        Bound<'py, PyArray2<f32>>,
        Bound<'py, PyArray2<f32>>,
    )> {
        let (h, d) = (self.num_neurons(), self.dim());
        let (g, u, dn) = with_ffn!(&self.inner, f => f.to_matrices());
        Ok((
            g.map(|g| matrix(py, g, h, d)).transpose()?,
            matrix(py, u, h, d)?,
            matrix(py, dn, d, h)?,
        ))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyInputSparseFfn>()
}

//! Bindings of `neuropil::quant`: stateless functions over the packed buffers
//! (codes `uint8`, scales/mins as `uint16` float16 bits or `float32`), so the
//! Python class and `QuantizedLinear`'s torch buffers are read in place.

use numpy::{IntoPyArray, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn};
use pyo3::prelude::*;

use crate::buffers::{exact_input, Expect};
use crate::errors::OrRaise;
use neuropil::quant::{self, Params, QuantRef, ScaleSlice, ScaleType, Scales, Scheme};
use neuropil::simd::{self, Level};
use neuropil::Error;

enum ScaleArray<'py> {
    F16(PyReadonlyArrayDyn<'py, u16>),
    F32(PyReadonlyArrayDyn<'py, f32>),
}

impl<'py> ScaleArray<'py> {
    fn read(obj: &Bound<'py, PyAny>, arg: &'static str) -> PyResult<Self> {
        if obj.cast::<PyArrayDyn<u16>>().is_ok() {
            return Ok(ScaleArray::F16(exact_input(
                obj,
                arg,
                "uint16 (float16 bits)",
            )?));
        }
        Ok(ScaleArray::F32(exact_input(
            obj,
            arg,
            "uint16 (float16 bits) or float32",
        )?))
    }

    fn slice(&self) -> ScaleSlice<'_> {
        match self {
            // Both were made C-contiguous by `exact_input`.
            ScaleArray::F16(a) => ScaleSlice::F16(a.as_slice().unwrap_or(&[])),
            ScaleArray::F32(a) => ScaleSlice::F32(a.as_slice().unwrap_or(&[])),
        }
    }
}

/// The arguments every call on a packed matrix takes, read without copying.
struct Packed<'py> {
    params: Params,
    rows: usize,
    cols: usize,
    data: PyReadonlyArrayDyn<'py, u8>,
    scales: ScaleArray<'py>,
    mins: Option<ScaleArray<'py>>,
}

impl<'py> Packed<'py> {
    #[allow(clippy::too_many_arguments)]
    fn read(
        data: &Bound<'py, PyAny>,
        scales: &Bound<'py, PyAny>,
        mins: Option<&Bound<'py, PyAny>>,
        rows: usize,
        cols: usize,
        bits: u8,
        group_size: usize,
        scheme: &str,
    ) -> PyResult<Self> {
        let scales = ScaleArray::read(scales, "scales")?;
        let t = match scales {
            ScaleArray::F16(_) => ScaleType::F16,
            ScaleArray::F32(_) => ScaleType::F32,
        };
        let params =
            Params::new(bits, group_size, Scheme::parse(scheme).or_raise()?, t).or_raise()?;
        let mins = mins.map(|m| ScaleArray::read(m, "mins")).transpose()?;
        let packed = Packed {
            params,
            rows,
            cols,
            data: exact_input(data, "data", "uint8")?,
            scales,
            mins,
        };
        packed.view()?;
        Ok(packed)
    }

    fn view(&self) -> PyResult<QuantRef<'_>> {
        QuantRef::new(
            self.params,
            self.rows,
            self.cols,
            self.data.as_slice().unwrap_or(&[]),
            self.scales.slice(),
            self.mins.as_ref().map(ScaleArray::slice),
        )
        .or_raise()
    }
}

fn level_arg(level: Option<&str>) -> PyResult<Level> {
    simd::resolve(level).or_raise()
}

type PackedOut<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
);

fn scales_out<'py>(py: Python<'py>, s: Scales, rows: usize) -> PyResult<Bound<'py, PyAny>> {
    Ok(match s {
        Scales::F16(v) => {
            let n = v.len() / rows;
            v.into_pyarray(py).reshape([rows, n])?.into_any()
        }
        Scales::F32(v) => {
            let n = v.len() / rows;
            v.into_pyarray(py).reshape([rows, n])?.into_any()
        }
    })
}

fn packed_out(py: Python<'_>, q: quant::QuantizedWeights) -> PyResult<PackedOut<'_>> {
    let rb = q.params.row_bytes(q.cols);
    let data = q.data.into_pyarray(py).reshape([q.rows, rb])?.into_any();
    let scales = scales_out(py, q.scales, q.rows)?;
    let mins = q.mins.map(|m| scales_out(py, m, q.rows)).transpose()?;
    Ok((data, scales, mins))
}

// Finiteness is checked by `quant::quantize` inside its row tasks (the same
// message), so the weights are read once, not twice.
const W: Expect = Expect::new("w", &[2], "(rows, cols)").allow_non_finite();

/// Quantizes a (rows, cols) float matrix; returns (data uint8 (rows, row_bytes),
/// scales (rows, groups) uint16 float16 bits or float32, mins like scales or None).
#[pyfunction]
#[pyo3(signature = (w, bits, group_size, scheme, scale_dtype="float16", search=false))]
fn quant_quantize<'py>(
    py: Python<'py>,
    w: &Bound<'py, PyAny>,
    bits: i64,
    group_size: i64,
    scheme: &str,
    scale_dtype: &str,
    search: bool,
) -> PyResult<PackedOut<'py>> {
    let bits = u8::try_from(bits)
        .map_err(|_| Error::value("bits", "one of 2, 3, 4, 8", bits))
        .or_raise()?;
    let group_size = usize::try_from(group_size)
        .map_err(|_| Error::value("group_size", "one of 32, 64, 128, 256", group_size))
        .or_raise()?;
    let params = Params::new(
        bits,
        group_size,
        Scheme::parse(scheme).or_raise()?,
        ScaleType::parse(scale_dtype).or_raise()?,
    )
    .or_raise()?;
    let w = W.read(w)?;
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let ws = w.as_slice();
    let q = py
        .detach(|| quant::quantize(ws, rows, cols, params, search))
        .or_raise()?;
    packed_out(py, q)
}

/// Raises unless the buffers form a valid packed matrix.
#[pyfunction]
#[pyo3(signature = (data, scales, mins, rows, cols, bits, group_size, scheme))]
#[allow(clippy::too_many_arguments)]
fn quant_check(
    data: &Bound<'_, PyAny>,
    scales: &Bound<'_, PyAny>,
    mins: Option<&Bound<'_, PyAny>>,
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
    scheme: &str,
) -> PyResult<()> {
    Packed::read(data, scales, mins, rows, cols, bits, group_size, scheme).map(|_| ())
}

/// The float32 (rows, cols) matrix the codes stand for.
#[pyfunction]
#[pyo3(signature = (data, scales, mins, rows, cols, bits, group_size, scheme))]
#[allow(clippy::too_many_arguments)]
fn quant_dequantize<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    mins: Option<&Bound<'py, PyAny>>,
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
    scheme: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let p = Packed::read(data, scales, mins, rows, cols, bits, group_size, scheme)?;
    let q = p.view()?;
    let out = py.detach(|| quant::dequantize(&q)).or_raise()?;
    Ok(out.into_pyarray(py).reshape([rows, cols])?.into_any())
}

// A batch of 0 rows gives (0, rows), as `np.zeros((0, cols)) @ W.T` does.
const X: Expect = Expect::new("x", &[1, 2], "(cols,) or (n, cols)").empty_batch_at(2);

/// `W x` for x of shape (cols,) -> (rows,), or `x W^T` for (n, cols) -> (n, rows).
#[pyfunction]
#[pyo3(signature = (data, scales, mins, rows, cols, bits, group_size, scheme, x, level=None))]
#[allow(clippy::too_many_arguments)]
fn quant_matvec<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    mins: Option<&Bound<'py, PyAny>>,
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
    scheme: &str,
    x: &Bound<'py, PyAny>,
    level: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let level = level_arg(level)?;
    let p = Packed::read(data, scales, mins, rows, cols, bits, group_size, scheme)?;
    let q = p.view()?;
    let x = X.read(x)?;
    let shape = x.shape().to_vec();
    let xs = x.as_slice();
    if shape[shape.len() - 1] != cols {
        let hint = if shape.len() == 1 {
            format!("({cols},)")
        } else {
            format!("(n, {cols})")
        };
        return Err(Error::shape("x", hint, &shape)).or_raise();
    }
    if shape.len() == 1 {
        let mut out = vec![0f32; rows];
        py.detach(|| quant::matvec_at(level, &q, xs, None, &mut out))
            .or_raise()?;
        return Ok(out.into_pyarray(py).into_any());
    }
    let n = shape[0];
    let mut out = vec![0f32; n * rows];
    py.detach(|| quant::matmul_at(level, &q, xs, n, &mut out))
        .or_raise()?;
    Ok(out.into_pyarray(py).reshape([n, rows])?.into_any())
}

/// The selected rows of `W x`: out[i] = W[rows[i]] . x, x of shape (cols,).
#[pyfunction]
#[pyo3(signature = (data, scales, mins, rows, cols, bits, group_size, scheme, x, index, level=None))]
#[allow(clippy::too_many_arguments)]
fn quant_matvec_rows<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    mins: Option<&Bound<'py, PyAny>>,
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
    scheme: &str,
    x: &Bound<'py, PyAny>,
    index: &Bound<'py, PyAny>,
    level: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    const X1: Expect = Expect::new("x", &[1], "(cols,)");
    let level = level_arg(level)?;
    let p = Packed::read(data, scales, mins, rows, cols, bits, group_size, scheme)?;
    let q = p.view()?;
    let x = X1.read(x)?;
    let idx = exact_input::<i64>(index, "rows", "int64")?;
    let idx: Vec<u32> = idx
        .as_slice()
        .unwrap_or(&[])
        .iter()
        .map(|&i| {
            u32::try_from(i)
                .ok()
                .filter(|&u| (u as usize) < rows)
                .ok_or(Error::Index {
                    arg: "rows",
                    index: i,
                    len: rows,
                })
        })
        .collect::<neuropil::Result<_>>()
        .or_raise()?;
    let xs = x.as_slice();
    let mut out = vec![0f32; idx.len()];
    py.detach(|| quant::matvec_at(level, &q, xs, Some(&idx), &mut out))
        .or_raise()?;
    Ok(out.into_pyarray(py).into_any())
}

/// GGUF block bytes (uint8, 1-D) of a matrix quantized with q4_0, q4_1 or q8_0.
#[pyfunction]
#[pyo3(signature = (data, scales, mins, rows, cols, bits, group_size, scheme))]
#[allow(clippy::too_many_arguments)]
fn quant_to_gguf<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    mins: Option<&Bound<'py, PyAny>>,
    rows: usize,
    cols: usize,
    bits: u8,
    group_size: usize,
    scheme: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let p = Packed::read(data, scales, mins, rows, cols, bits, group_size, scheme)?;
    let raw = quant::to_gguf(&p.view()?).or_raise()?;
    Ok(raw.into_pyarray(py).into_any())
}

/// Packed buffers (as `quant_quantize` returns) of GGUF blocks of a (rows, cols) tensor.
#[pyfunction]
fn quant_from_gguf<'py>(
    py: Python<'py>,
    raw: &Bound<'py, PyAny>,
    scheme: &str,
    rows: usize,
    cols: usize,
) -> PyResult<PackedOut<'py>> {
    let scheme = Scheme::parse(scheme).or_raise()?;
    let raw = exact_input::<u8>(raw, "raw", "uint8")?;
    let q = quant::from_gguf(raw.as_slice().unwrap_or(&[]), scheme, rows, cols).or_raise()?;
    packed_out(py, q)
}

/// Median memory read bandwidth in GB/s: every pool thread streams its share
/// of a `mib`-MiB buffer, `repeat` times.
#[pyfunction]
#[pyo3(signature = (mib=512, repeat=5))]
fn memory_read_bandwidth(py: Python<'_>, mib: usize, repeat: usize) -> PyResult<f64> {
    py.detach(|| quant::read_bandwidth(mib << 20, repeat))
        .or_raise()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quant_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant_check, m)?)?;
    m.add_function(wrap_pyfunction!(quant_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant_matvec, m)?)?;
    m.add_function(wrap_pyfunction!(quant_matvec_rows, m)?)?;
    m.add_function(wrap_pyfunction!(quant_to_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(quant_from_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(memory_read_bandwidth, m)?)?;
    Ok(())
}

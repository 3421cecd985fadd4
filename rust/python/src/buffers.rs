//! Zero-copy input helper used by every binding.
//!
//! A float32, C-contiguous, aligned numpy array is borrowed in place: the core
//! reads the very memory the caller owns. Anything else that numpy can view as
//! a float array (float16/float64 arrays, non-contiguous views, CPU torch
//! tensors, lists of floats) is converted once to a float32 C-contiguous copy.
//! Non-float input (ints, bools, complex, objects) is rejected with `DTypeError`
//! rather than cast silently.

use numpy::ndarray::Dimension;
use numpy::{
    Element, PyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArray,
    PyReadonlyArrayDyn, PyReadwriteArray, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyException, PyMemoryError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::errors::OrRaise;
use neuropil::{validate, Error};

/// A float32 C-contiguous view of a Python array argument.
pub struct F32Input<'py> {
    array: PyReadonlyArrayDyn<'py, f32>,
    /// Whether the input had to be converted (false: the caller's memory is used).
    pub copied: bool,
}

impl<'py> F32Input<'py> {
    /// Whether the core can read `a` in place: C-contiguous and f32-aligned.
    fn usable(a: &Bound<'py, PyArrayDyn<f32>>) -> bool {
        a.is_c_contiguous() && (a.data() as usize).is_multiple_of(std::mem::align_of::<f32>())
    }

    fn new(a: &Bound<'py, PyArrayDyn<f32>>, copied: bool) -> PyResult<Self> {
        let array = a.try_readonly()?;
        // Checked once here so `as_slice` below can never fall back to a wrong answer.
        if array.as_slice().is_err() {
            return Err(crate::errors::NeuropilError::new_err(
                "internal error: numpy returned a non-contiguous float32 array after conversion",
            ));
        }
        Ok(F32Input { array, copied })
    }

    /// The elements, in C order.
    pub fn as_slice(&self) -> &[f32] {
        // `new` proved the array contiguous; it stays borrowed read-only while we hold it.
        self.array.as_slice().unwrap_or(&[])
    }

    pub fn shape(&self) -> &[usize] {
        self.array.shape()
    }

    pub fn ptr(&self) -> usize {
        self.array.as_array().as_ptr() as usize
    }
}

/// `wrap(e)` for numpy's (or a tensor's `__array__`) refusal of the input: a
/// `TypeError`, the `ValueError` of a ragged list, a tensor's `RuntimeError`
/// (it requires grad)...; a `MemoryError` (a copy too large, of a broadcast
/// view) or an interrupt is not about the argument's type and propagates as
/// it is.
fn if_type_error(py: Python<'_>, e: PyErr, wrap: impl FnOnce(PyErr) -> PyErr) -> PyErr {
    if e.is_instance_of::<PyMemoryError>(py) || !e.is_instance_of::<PyException>(py) {
        e
    } else {
        wrap(e)
    }
}

fn numpy(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    static NUMPY: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    Ok(NUMPY
        .get_or_try_init(py, || py.import("numpy").map(Bound::unbind))?
        .bind(py))
}

/// Borrows or converts `obj` to float32, C-contiguous. `arg` names the argument
/// in error messages.
pub fn f32_input<'py>(obj: &Bound<'py, PyAny>, arg: &'static str) -> PyResult<F32Input<'py>> {
    let py = obj.py();
    if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        if F32Input::usable(a) {
            return F32Input::new(a, false);
        }
    }
    let np = numpy(py)?;
    // One view through numpy (no copy for arrays and CPU tensors), to read the dtype.
    let viewed = if obj.cast::<PyUntypedArray>().is_ok() {
        obj.clone()
    } else {
        np.call_method1("asarray", (obj,)).map_err(|e| {
            if_type_error(py, e, |e| {
                let found = obj.get_type().name().map(|n| n.to_string()).unwrap_or_default();
                crate::errors::DTypeError::new_err(format!(
                    "{arg} must be a float array (numpy, torch CPU tensor or nested list); got {found} ({e})"
                ))
            })
        })?
    };
    let untyped = viewed.cast::<PyUntypedArray>()?;
    let dtype = untyped.dtype();
    let kind = dtype.kind();
    if kind != b'f' {
        return Err(Error::DType {
            arg,
            expected: "float32 (or another float dtype, converted once)".into(),
            found: dtype.to_string(),
        })
        .or_raise();
    }
    // `asarray(order="C")` keeps 0-d arrays 0-d (ascontiguousarray would not);
    // an unaligned float32 view still needs a real copy, hence `array(copy=True)`.
    let kwargs = PyDict::new(py);
    kwargs.set_item("dtype", np.getattr("float32")?)?;
    kwargs.set_item("order", "C")?;
    let mut converted = np.call_method("asarray", (&viewed,), Some(&kwargs))?;
    if !F32Input::usable(converted.cast::<PyArrayDyn<f32>>()?) {
        kwargs.set_item("copy", true)?;
        converted = np.call_method("array", (&viewed,), Some(&kwargs))?;
    }
    // A CPU tensor or other buffer already in float32 C order comes back from
    // `asarray` as the very view made above: borrowed, not copied.
    let copied = !converted.is(&viewed);
    F32Input::new(converted.cast::<PyArrayDyn<f32>>()?, copied)
}

/// A C-contiguous view of an integer array argument (codes, ids, indices).
pub struct IntInput<'py, T: numpy::Element> {
    array: PyReadonlyArrayDyn<'py, T>,
}

impl<'py, T: numpy::Element> IntInput<'py, T> {
    /// The elements, in C order.
    pub fn as_slice(&self) -> &[T] {
        // `int_input` made the array C-contiguous; it stays borrowed read-only.
        self.array.as_slice().unwrap_or(&[])
    }

    pub fn shape(&self) -> &[usize] {
        self.array.shape()
    }
}

/// Reads `obj` as a C-contiguous array of `T` (borrowed when it already is one).
///
/// `accept(kind, itemsize)` decides which source dtypes are taken (numpy kind
/// characters: `b'u'`, `b'i'`...); accepted ones are converted to `T` with
/// numpy's "safe" casting, so no value is ever wrapped or truncated. Anything
/// else is a `DTypeError` naming `arg` and `expected`; a failure that is not
/// about the dtype (a `MemoryError` copying a broadcast view) propagates as it is.
pub fn int_input<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    arg: &'static str,
    expected: &'static str,
    accept: fn(u8, usize) -> bool,
) -> PyResult<IntInput<'py, T>> {
    let py = obj.py();
    if let Ok(a) = obj.cast::<PyArrayDyn<T>>() {
        if a.is_c_contiguous() {
            return Ok(IntInput {
                array: a.try_readonly()?,
            });
        }
    }
    let np = numpy(py)?;
    let viewed = np.call_method1("asarray", (obj,)).map_err(|e| {
        if_type_error(py, e, |e| {
            crate::errors::DTypeError::new_err(format!("{arg} must be {expected}; got {e}"))
        })
    })?;
    let untyped = viewed.cast::<PyUntypedArray>()?;
    let dtype = untyped.dtype();
    if !accept(dtype.kind(), dtype.itemsize()) {
        return Err(Error::DType {
            arg,
            expected: expected.into(),
            found: dtype.to_string(),
        })
        .or_raise();
    }
    let kwargs = PyDict::new(py);
    kwargs.set_item("order", "C")?;
    kwargs.set_item("casting", "safe")?;
    kwargs.set_item("copy", false)?;
    let converted = viewed
        .call_method("astype", (numpy::dtype::<T>(py),), Some(&kwargs))
        .map_err(|e| {
            if_type_error(py, e, |e| {
                crate::errors::DTypeError::new_err(format!(
                    "{arg} must be {expected}; got {dtype} ({e})"
                ))
            })
        })?;
    Ok(IntInput {
        array: converted.cast::<PyArrayDyn<T>>()?.try_readonly()?,
    })
}

/// Argument checks applied after conversion; each error names `arg`.
pub struct Expect {
    arg: &'static str,
    ndim: &'static [usize],
    shape_hint: &'static str,
    non_empty: bool,
    /// The rank at which the first axis is a batch that may hold 0 items.
    batch_rank: Option<usize>,
    finite: bool,
}

impl Expect {
    /// `ndim`: the accepted ranks; `shape_hint`: how the message spells the
    /// expected shape, e.g. `"(n,) or (n, d)"`.
    pub const fn new(arg: &'static str, ndim: &'static [usize], shape_hint: &'static str) -> Self {
        Expect {
            arg,
            ndim,
            shape_hint,
            non_empty: true,
            batch_rank: None,
            finite: true,
        }
    }

    /// At rank `rank`, the first axis is a batch (rows of `x`, queries,
    /// thresholds) and may hold 0 items, so an empty batch gets an empty
    /// result as in numpy and torch; every other axis must still be >= 1.
    /// Other ranks (a 1-D `x` is one vector) stay non-empty.
    pub const fn empty_batch_at(mut self, rank: usize) -> Self {
        self.batch_rank = Some(rank);
        self
    }

    /// Lets NaN and Inf through (for kernels where they propagate like numpy's).
    pub const fn allow_non_finite(mut self) -> Self {
        self.finite = false;
        self
    }

    pub fn check(&self, input: &F32Input<'_>) -> PyResult<()> {
        let shape = input.shape();
        if !self.ndim.contains(&shape.len()) {
            return Err(Error::shape(self.arg, self.shape_hint, shape)).or_raise();
        }
        if self.batch_rank == Some(shape.len()) {
            validate::non_empty_rows(self.arg, shape).or_raise()?;
        } else if self.non_empty {
            validate::non_empty(self.arg, shape).or_raise()?;
        }
        if self.finite {
            validate::finite(self.arg, input.as_slice()).or_raise()?;
        }
        Ok(())
    }

    /// Converts and checks in one step.
    pub fn read<'py>(&self, obj: &Bound<'py, PyAny>) -> PyResult<F32Input<'py>> {
        let input = f32_input(obj, self.arg)?;
        self.check(&input)?;
        Ok(input)
    }

    /// [`Expect::read`], and the last axis must hold `d` values: with a batch
    /// of 0 rows a core's length check (`n * d` values) holds for any width.
    pub fn read_width<'py>(&self, obj: &Bound<'py, PyAny>, d: usize) -> PyResult<F32Input<'py>> {
        let input = self.read(obj)?;
        let shape = input.shape();
        if shape.last() != Some(&d) {
            let want = if shape.len() == 1 {
                format!("({d},) or (n, {d})")
            } else {
                format!("(n, {d})")
            };
            return Err(Error::shape(self.arg, want, shape)).or_raise();
        }
        Ok(input)
    }
}

/// Describes `obj` for an error message: `ndarray of int32, shape (3, 4)` or its type name.
fn describe(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!(
            "ndarray of {}, shape {}",
            a.dtype(),
            neuropil::error::Shape(a.shape().to_vec())
        ),
        Err(_) => obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default(),
    }
}

/// Casts `obj` to a C-contiguous numpy array of exactly `T` and rank `D`,
/// without any conversion (ints, bytes, index arrays, outputs). Anything else
/// is a `DTypeError` (wrong type or dtype) or `ShapeError` (wrong rank), each
/// naming `arg`; a non-contiguous array is an `ArgumentError`.
fn typed<'py, 'a, T: Element, D: Dimension>(
    obj: &'a Bound<'py, PyAny>,
    arg: &'static str,
) -> PyResult<&'a Bound<'py, PyArray<T, D>>> {
    // Rendered only on error: str(dtype) runs Python code.
    let wrong_type = || {
        crate::errors::DTypeError::new_err(format!(
            "{arg} must be a numpy array of {}; got {}",
            T::get_dtype(obj.py()),
            describe(obj)
        ))
    };
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| wrong_type())?;
    if let Some(nd) = D::NDIM {
        if untyped.ndim() != nd {
            return Err(crate::errors::ShapeError::new_err(format!(
                "{arg} must have {nd} dimension(s); got shape {}",
                neuropil::error::Shape(untyped.shape().to_vec())
            )));
        }
    }
    let array = obj.cast::<PyArray<T, D>>().map_err(|_| wrong_type())?;
    if !array.is_c_contiguous() {
        return Err(crate::errors::ArgumentError::new_err(format!(
            "{arg} must be C-contiguous; got strides {:?}",
            array.strides()
        )));
    }
    Ok(array)
}

/// A read-only borrow of a C-contiguous `T` array of rank `D` (see [`typed`]).
pub fn typed_input<'py, T: Element, D: Dimension>(
    obj: &Bound<'py, PyAny>,
    arg: &'static str,
) -> PyResult<PyReadonlyArray<'py, T, D>> {
    typed::<T, D>(obj, arg)?
        .try_readonly()
        .map_err(|e| crate::errors::ArgumentError::new_err(format!("{arg} cannot be read: {e}")))
}

/// A writable borrow of a C-contiguous `T` array of rank `D`, for outputs the
/// caller provides. Fails with `ArgumentError` when the array is read-only or
/// overlaps another array borrowed by the same call.
pub fn typed_output<'py, T: Element, D: Dimension>(
    obj: &Bound<'py, PyAny>,
    arg: &'static str,
) -> PyResult<PyReadwriteArray<'py, T, D>> {
    typed::<T, D>(obj, arg)?.try_readwrite().map_err(|e| {
        crate::errors::ArgumentError::new_err(format!(
            "{arg} must be a writeable array that overlaps no input: {e}"
        ))
    })
}

/// Borrows `obj` as a numpy array of exactly element type `T`, any rank (`dtype` names it
/// in messages): no conversion of the values, since for packed integer data a
/// cast would be a silent wrong answer. A non-contiguous array of the right
/// type is copied once to C order.
pub fn exact_input<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    arg: &'static str,
    dtype: &'static str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let Ok(a) = obj.cast::<PyArrayDyn<T>>() else {
        let found = match obj.cast::<PyUntypedArray>() {
            Ok(u) => u.dtype().to_string(),
            Err(_) => obj
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        };
        return Err(Error::DType {
            arg,
            expected: dtype.into(),
            found,
        })
        .or_raise();
    };
    if a.is_c_contiguous() {
        return Ok(a.try_readonly()?);
    }
    let c = numpy(obj.py())?.call_method1("ascontiguousarray", (a,))?;
    Ok(c.cast::<PyArrayDyn<T>>()?.try_readonly()?)
}

//! Bindings of `neuropil::windows`: the window layout (index math and epoch
//! order) and the byte-wise gather. `neuropil/windows.py` builds the Python
//! API on top; arrays arrive here as raw `uint8` row views, so every dtype is
//! gathered without conversion.

use numpy::ndarray::{Ix1, Ix2};
use numpy::{PyArray1, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::buffers::{typed_input, typed_output};
use crate::errors::OrRaise;
use neuropil::windows::{self, Layout};
use neuropil::Error;

fn nonneg(arg: &'static str, v: i64) -> PyResult<u64> {
    u64::try_from(v)
        .map_err(|_| Error::value(arg, "a non-negative integer", v))
        .or_raise()
}

fn u64_values(arg: &'static str, obj: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    let a = typed_input::<i64, Ix1>(obj, arg)?;
    let s = a.as_slice()?;
    if let Some((k, v)) = s.iter().enumerate().find(|(_, v)| **v < 0) {
        return Err(Error::value(
            arg,
            "non-negative",
            format!("{v} at position {k}"),
        ))
        .or_raise();
    }
    Ok(s.iter().map(|&v| v as u64).collect())
}

fn to_numpy(py: Python<'_>, v: Vec<u64>) -> Bound<'_, PyArray1<i64>> {
    // Window indices and frame numbers are below 2^63 (they count array rows).
    PyArray1::from_vec(py, v.into_iter().map(|x| x as i64).collect())
}

/// Where every window of a frame sequence starts (see `neuropil::windows::layout`).
#[pyclass(frozen, module = "neuropil._native", name = "WindowLayout")]
struct WindowLayout {
    inner: Layout,
}

#[pymethods]
impl WindowLayout {
    /// `episodes` holds offsets (`kind="offsets"`) or lengths (`kind="lengths"`),
    /// int64; `None` means one episode.
    #[new]
    #[pyo3(signature = (n_frames, window, stride=1, lookahead=0, episodes=None, kind="offsets"))]
    fn new(
        n_frames: i64,
        window: i64,
        stride: i64,
        lookahead: i64,
        episodes: Option<&Bound<'_, PyAny>>,
        kind: &str,
    ) -> PyResult<Self> {
        let n = nonneg("n_frames", n_frames)?;
        let (w, s) = (nonneg("window", window)?, nonneg("stride", stride)?);
        let a = nonneg("target_offset", lookahead)?;
        let inner = match (episodes, kind) {
            (None, _) => Layout::new(n, None, w, s, a),
            (Some(e), "offsets") => Layout::new(n, Some(&u64_values("episodes", e)?), w, s, a),
            (Some(e), "lengths") => Layout::from_lengths(n, &u64_values("episodes", e)?, w, s, a),
            (Some(_), other) => Err(Error::value(
                "kind",
                "\"offsets\" or \"lengths\"",
                format!("{other:?}"),
            )),
        }
        .or_raise()?;
        Ok(WindowLayout { inner })
    }

    fn __len__(&self) -> usize {
        self.inner.len() as usize
    }

    #[getter]
    fn window(&self) -> u64 {
        self.inner.window()
    }

    #[getter]
    fn stride(&self) -> u64 {
        self.inner.stride()
    }

    #[getter]
    fn lookahead(&self) -> u64 {
        self.inner.lookahead()
    }

    #[getter]
    fn n_frames(&self) -> u64 {
        self.inner.n_frames()
    }

    /// Episode boundaries, int64 `(E + 1,)`.
    fn offsets<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        to_numpy(py, self.inner.offsets().to_vec())
    }

    /// Cumulative window counts per episode, int64 `(E + 1,)`.
    fn cumulative_counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        to_numpy(py, self.inner.cumulative_counts().to_vec())
    }

    /// First frame of window `index` (negative counts from the end); IndexError out of range.
    fn start(&self, index: i64) -> PyResult<u64> {
        self.inner.start(index).or_raise()
    }

    /// Episode of window `index`.
    fn episode_of(&self, index: i64) -> PyResult<usize> {
        self.inner.episode_of(index).or_raise()
    }

    /// First frames of int64 window `indices`, int64, same length.
    fn starts<'py>(
        &self,
        py: Python<'py>,
        indices: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let idx = typed_input::<i64, Ix1>(indices, "indices")?;
        let idx = idx.as_slice()?;
        let mut out = vec![0i64; idx.len()];
        py.detach(|| self.inner.starts_of(idx, &mut out))
            .or_raise()?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// First frame of every window in order, int64 `(len,)`.
    fn all_starts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let mut out = vec![0i64; self.inner.len() as usize];
        py.detach(|| self.inner.all_starts(&mut out)).or_raise()?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// Window indices rank `rank` visits in `epoch`, int64 (see `windows::order`).
    #[pyo3(signature = (shuffle, seed, epoch, rank=0, world_size=1, drop_last=false))]
    // The Python signature (keyword arguments of `SlidingWindows.batches`).
    #[allow(clippy::too_many_arguments)]
    fn epoch_order<'py>(
        &self,
        py: Python<'py>,
        shuffle: bool,
        seed: u64,
        epoch: i64,
        rank: i64,
        world_size: i64,
        drop_last: bool,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let (e, r, w) = (
            nonneg("epoch", epoch)?,
            nonneg("rank", rank)?,
            nonneg("world_size", world_size)?,
        );
        let n = self.inner.len();
        let order = py
            .detach(|| windows::epoch_order(n, shuffle, seed, e, r, w, drop_last))
            .or_raise()?;
        Ok(to_numpy(py, order))
    }

    /// First frames of the windows rank `rank` visits in `epoch`, in order: int32
    /// (4 bytes a window) when every frame number fits, else int64.
    // The Python signature (keyword arguments of `SlidingWindows.batches`).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (shuffle, seed, epoch, rank=0, world_size=1, drop_last=false))]
    fn epoch_starts<'py>(
        &self,
        py: Python<'py>,
        shuffle: bool,
        seed: u64,
        epoch: i64,
        rank: i64,
        world_size: i64,
        drop_last: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (e, r, w) = (
            nonneg("epoch", epoch)?,
            nonneg("rank", rank)?,
            nonneg("world_size", world_size)?,
        );
        let n = self.inner.len();
        if self.inner.n_frames() <= i32::MAX as u64 {
            let starts = py
                .detach(|| {
                    let mut order =
                        windows::epoch_order_of::<u32>(n, shuffle, seed, e, r, w, drop_last)?;
                    self.inner.starts_in_place(&mut order)?;
                    Ok::<_, Error>(order)
                })
                .or_raise()?;
            // Frame numbers below 2^31: the same values as int32 (index_select takes int32).
            let narrow: Vec<i32> = starts.into_iter().map(|x| x as i32).collect();
            return Ok(PyArray1::from_vec(py, narrow).into_any());
        }
        let starts = py
            .detach(|| {
                let mut order = windows::epoch_order(n, shuffle, seed, e, r, w, drop_last)?;
                self.inner.starts_in_place(&mut order)?;
                Ok::<_, Error>(order)
            })
            .or_raise()?;
        Ok(to_numpy(py, starts).into_any())
    }
}

/// Seeded permutation of `0..n`, int64 (SplitMix64 + Fisher-Yates, documented in the core).
#[pyfunction]
fn windows_permutation(
    py: Python<'_>,
    n: i64,
    seed: u64,
    epoch: i64,
) -> PyResult<Bound<'_, PyArray1<i64>>> {
    let (n, e) = (nonneg("n", n)?, nonneg("epoch", epoch)?);
    let p = py.detach(|| windows::permutation(n, seed, e));
    Ok(to_numpy(py, p))
}

/// Copies rows `s + shift .. s + shift + rows` of `src` (uint8 `(n, row_bytes)`)
/// for each `s` in `starts` (int64) into `out` (uint8 `(len(starts), rows * row_bytes)`),
/// in parallel with the GIL released. `arg` names `src` in errors.
#[pyfunction]
#[pyo3(signature = (src, starts, shift, rows, out, arg="frames"))]
fn windows_gather(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    starts: &Bound<'_, PyAny>,
    shift: i64,
    rows: i64,
    out: &Bound<'_, PyAny>,
    arg: &str,
) -> PyResult<()> {
    let arg: &'static str = match arg {
        "frames" => "frames",
        _ => "targets",
    };
    let (shift, rows) = (nonneg("shift", shift)?, nonneg("rows", rows)? as usize);
    let src = typed_input::<u8, Ix2>(src, "src")?;
    // int64 or int32 start frames (the epoch order is int32 when frames fit).
    let (wide, narrow) = if starts.cast::<PyArray1<i32>>().is_ok() {
        (None, Some(typed_input::<i32, Ix1>(starts, "starts")?))
    } else {
        (Some(typed_input::<i64, Ix1>(starts, "starts")?), None)
    };
    let count = wide
        .as_ref()
        .map_or_else(|| narrow.as_ref().map_or(0, |a| a.len()), |a| a.len());
    let expected = [count, rows * src.shape()[1]];
    let mut out = typed_output::<u8, Ix2>(out, "out")?;
    if out.shape() != expected {
        return Err(Error::shape(
            "out",
            format!("({}, {})", expected[0], expected[1]),
            out.shape(),
        ))
        .or_raise();
    }
    let row_bytes = src.shape()[1];
    let src_bytes = src.as_slice()?;
    let out_bytes = out.as_slice_mut()?;
    match (&wide, &narrow) {
        (Some(a), _) => {
            let starts = a.as_slice()?;
            py.detach(|| {
                let rows_view = windows::Rows::new(src_bytes, row_bytes.max(1))?;
                windows::gather(arg, rows_view, starts, shift, rows, out_bytes)
            })
        }
        (None, Some(a)) => {
            let starts = a.as_slice()?;
            py.detach(|| {
                let rows_view = windows::Rows::new(src_bytes, row_bytes.max(1))?;
                windows::gather(arg, rows_view, starts, shift, rows, out_bytes)
            })
        }
        (None, None) => Ok(()),
    }
    .or_raise()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<WindowLayout>()?;
    m.add_function(wrap_pyfunction!(windows_permutation, m)?)?;
    m.add_function(wrap_pyfunction!(windows_gather, m)?)?;
    Ok(())
}

//! Bindings of the FlyHash encoder and the binary-code index
//! (`neuropil.flyhash` wraps them with the Python-facing API and the torch path).

use std::path::PathBuf;

use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::buffers::{int_input, Expect, IntInput};
use crate::errors::OrRaise;
use crate::shared::Shared;
use neuropil::flyhash::{file, BinaryIndex, Config, FlyHash, Kind, Output, Weights};
use neuropil::simd::{self, Level};
use neuropil::Error;

// A batch of 0 rows gives a (0, ...) output of the method's dtype.
const X: Expect = Expect::new("x", &[2], "(n, d)").empty_batch_at(2);

fn level_of(level: Option<&str>) -> PyResult<Level> {
    simd::resolve(level).or_raise()
}

fn u8_codes<'py>(obj: &Bound<'py, PyAny>, arg: &'static str) -> PyResult<IntInput<'py, u8>> {
    int_input::<u8>(obj, arg, "uint8 (packed codes)", |kind, size| {
        kind == b'u' && size == 1
    })
}

/// The FlyHash encoder of the core (see `neuropil.flyhash.FlyHash`).
#[pyclass(name = "FlyHash", module = "neuropil._native", frozen)]
struct PyFlyHash {
    inner: FlyHash,
}

#[derive(Clone, Copy)]
enum Want {
    Dense,
    Activations,
    Indices,
    Packed,
}

impl Want {
    fn parse(want: &str) -> PyResult<Self> {
        Ok(match want {
            "encode" => Want::Dense,
            "activations" => Want::Activations,
            "encode_indices" => Want::Indices,
            "hash" => Want::Packed,
            other => {
                return Err(Error::value(
                    "want",
                    "'encode', 'activations', 'encode_indices' or 'hash'",
                    format!("{other:?}"),
                ))
                .or_raise()
            }
        })
    }

    /// Elements per output row and bytes per element.
    fn row(self, fh: &FlyHash) -> (usize, usize) {
        match self {
            Want::Dense | Want::Activations => (fh.output_dim, 4),
            Want::Indices => (fh.active_bits, 4),
            Want::Packed => (fh.code_bytes(), 1),
        }
    }
}

impl PyFlyHash {
    fn run<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        want: Want,
        level: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let level = level_of(level)?;
        let fh = &self.inner;
        let x = f32_2d(fh, x)?;
        let n = x.shape()[0];
        let xs = x.as_slice();
        let (per_row, elem) = want.row(fh);
        fh.output_len(n, per_row, elem).or_raise()?;
        Ok(match want {
            Want::Dense | Want::Activations => {
                let arr = PyArray2::<f32>::zeros(py, [n, fh.output_dim], false);
                {
                    let mut rw = arr.readwrite();
                    let out = rw.as_slice_mut()?;
                    py.detach(|| {
                        let o = match want {
                            Want::Dense => Output::Dense(out),
                            _ => Output::Activations(out),
                        };
                        fh.encode_at(level, xs, n, o)
                    })
                    .or_raise()?;
                }
                arr.into_any()
            }
            Want::Indices => {
                let arr = PyArray2::<u32>::zeros(py, [n, fh.active_bits], false);
                {
                    let mut rw = arr.readwrite();
                    let out = rw.as_slice_mut()?;
                    py.detach(|| fh.encode_at(level, xs, n, Output::Indices(out)))
                        .or_raise()?;
                }
                arr.into_any()
            }
            Want::Packed => {
                let arr = PyArray2::<u8>::zeros(py, [n, fh.code_bytes()], false);
                {
                    let mut rw = arr.readwrite();
                    let out = rw.as_slice_mut()?;
                    py.detach(|| fh.encode_at(level, xs, n, Output::Packed(out)))
                        .or_raise()?;
                }
                arr.into_any()
            }
        })
    }
}

fn f32_2d<'py>(fh: &FlyHash, x: &Bound<'py, PyAny>) -> PyResult<crate::buffers::F32Input<'py>> {
    let d = fh.config.input_dim;
    let input = crate::buffers::f32_input(x, "x")?;
    let shape = input.shape();
    if shape.len() != 2 || shape[1] != d {
        return Err(Error::shape("x", format!("(n, {d})"), shape)).or_raise();
    }
    X.check(&input)?;
    Ok(input)
}

#[pymethods]
impl PyFlyHash {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (input_dim, expansion_ratio, active_fraction, seed, projection, connectivity, binary))]
    fn new(
        py: Python<'_>,
        input_dim: i64,
        expansion_ratio: f64,
        active_fraction: f64,
        seed: u64,
        projection: &str,
        connectivity: f64,
        binary: bool,
    ) -> PyResult<Self> {
        let input_dim = usize::try_from(input_dim)
            .map_err(|_| Error::value("input_dim", "a positive integer", input_dim))
            .or_raise()?;
        let kind = Kind::parse(projection)
            .ok_or_else(|| {
                Error::value(
                    "projection",
                    "one of 'sign', 'sparse', 'seeded'",
                    format!("{projection:?}"),
                )
            })
            .or_raise()?;
        let config = Config {
            input_dim,
            expansion_ratio,
            active_fraction,
            seed,
            kind,
            connectivity,
            binary,
        };
        let inner = py.detach(|| FlyHash::new(config)).or_raise()?;
        Ok(PyFlyHash { inner })
    }

    #[getter]
    fn input_dim(&self) -> usize {
        self.inner.config.input_dim
    }
    #[getter]
    fn output_dim(&self) -> usize {
        self.inner.output_dim
    }
    #[getter]
    fn active_bits(&self) -> usize {
        self.inner.active_bits
    }
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.config.seed
    }
    #[getter]
    fn projection(&self) -> &'static str {
        self.inner.config.kind.name()
    }
    #[getter]
    fn expansion_ratio(&self) -> f64 {
        self.inner.config.expansion_ratio
    }
    #[getter]
    fn active_fraction(&self) -> f64 {
        self.inner.config.active_fraction
    }
    #[getter]
    fn connectivity(&self) -> f64 {
        self.inner.config.connectivity
    }
    #[getter]
    fn connections(&self) -> usize {
        self.inner.connections
    }
    #[getter]
    fn binary(&self) -> bool {
        self.inner.config.binary
    }
    #[getter]
    fn memory_bytes(&self) -> usize {
        self.inner.memory_bytes()
    }

    /// Refuses `n` rows whose output for `want` (a method's name) would pass
    /// the 8 GiB limit; called before `x` is converted or copied anywhere.
    fn check_rows(&self, n: i64, want: &str) -> PyResult<()> {
        let (per_row, elem) = Want::parse(want)?.row(&self.inner);
        let n = usize::try_from(n)
            .map_err(|_| Error::value("x", "a non-negative number of rows", n))
            .or_raise()?;
        self.inner.output_len(n, per_row, elem).or_raise()?;
        Ok(())
    }

    /// `(n, d)` -> `(n, m)` float32, winners' activations, zeros elsewhere.
    #[pyo3(signature = (x, level=None))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        level: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.run(py, x, Want::Dense, level)
    }

    /// `(n, d)` -> `(n, m)` float32, every activation (before winner-take-all).
    #[pyo3(signature = (x, level=None))]
    fn activations<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        level: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.run(py, x, Want::Activations, level)
    }

    /// `(n, d)` -> `(n, k)` uint32 winner indices, ascending.
    #[pyo3(signature = (x, level=None))]
    fn encode_indices<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        level: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.run(py, x, Want::Indices, level)
    }

    /// `(n, d)` -> `(n, ceil(m / 8))` uint8 packed winner bits (faiss layout).
    #[pyo3(signature = (x, level=None))]
    fn hash<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        level: Option<&str>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.run(py, x, Want::Packed, level)
    }

    /// The projection's arrays: `{"sign_bits": (m, row_bytes) uint8}` for sign and
    /// seeded (regenerated), or `{"indices": (m, c) uint16, "signs": (m, ceil(c/8)) uint8}`.
    fn projection_arrays<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Vec<(&'static str, Bound<'py, PyAny>)>> {
        let fh = &self.inner;
        let m = fh.output_dim;
        let d = fh.config.input_dim;
        let sign = |bits: &[u8]| -> PyResult<Bound<'py, PyAny>> {
            Ok(PyArray1::from_slice(py, bits)
                .reshape([m, bits.len() / m])?
                .into_any())
        };
        Ok(match &fh.weights {
            Weights::Sign(bits) => vec![("sign_bits", sign(bits)?)],
            Weights::Seeded => {
                let bits = py
                    .detach(|| neuropil::flyhash::projection::generate_sign(fh.config.seed, d, m));
                vec![("sign_bits", sign(&bits)?)]
            }
            Weights::Sparse { c, plan, signs } => vec![
                (
                    "indices",
                    PyArray1::from_slice(py, &py.detach(|| plan.row_major().0))
                        .reshape([m, *c])?
                        .into_any(),
                ),
                (
                    "signs",
                    PyArray1::from_slice(py, signs)
                        .reshape([m, signs.len() / m])?
                        .into_any(),
                ),
            ],
        })
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| file::save_flyhash(&self.inner, &path))
            .or_raise()
    }

    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| file::load_flyhash(&path)).or_raise()?;
        Ok(PyFlyHash { inner })
    }
}

/// `(lims, distances, ids)` of a range search.
type RangeResult<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i32>>,
    Bound<'py, PyArray1<i64>>,
);

/// Exact Hamming / Jaccard search over packed binary codes.
#[pyclass(name = "BinaryIndex", module = "neuropil._native", frozen)]
struct PyBinaryIndex {
    inner: Shared<BinaryIndex>,
    nbits: usize,
}

fn codes_2d<'py>(
    nbits: usize,
    obj: &Bound<'py, PyAny>,
    arg: &'static str,
) -> PyResult<(IntInput<'py, u8>, usize)> {
    let codes = u8_codes(obj, arg)?;
    let shape = codes.shape();
    let nb = nbits.div_ceil(8);
    if shape.len() != 2 || shape[1] != nb {
        return Err(Error::shape(
            arg,
            format!("(n, {nb}) for {nbits} bits"),
            shape,
        ))
        .or_raise();
    }
    let n = shape[0];
    Ok((codes, n))
}

#[pymethods]
impl PyBinaryIndex {
    #[new]
    fn new(nbits: i64) -> PyResult<Self> {
        let nbits = usize::try_from(nbits)
            .map_err(|_| Error::value("nbits", "a positive integer", nbits))
            .or_raise()?;
        Ok(PyBinaryIndex::from(BinaryIndex::new(nbits).or_raise()?))
    }

    #[getter]
    fn nbits(&self) -> usize {
        self.nbits
    }

    #[getter]
    fn code_bytes(&self) -> usize {
        self.nbits.div_ceil(8)
    }

    fn __len__(&self) -> usize {
        self.inner.peek().len()
    }

    #[pyo3(signature = (codes, ids=None))]
    fn add(
        &self,
        py: Python<'_>,
        codes: &Bound<'_, PyAny>,
        ids: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (codes, n) = codes_2d(self.nbits, codes, "codes")?;
        let ids = match ids {
            None => None,
            Some(obj) => Some(int_input::<i64>(
                obj,
                "ids",
                "int64 (or another integer dtype)",
                |kind, _| kind == b'i' || kind == b'u',
            )?),
        };
        if let Some(ids) = &ids {
            if ids.shape().len() != 1 {
                return Err(Error::shape("ids", format!("({n},)"), ids.shape())).or_raise();
            }
        }
        let cs = codes.as_slice();
        let is = ids.as_ref().map(|i| i.as_slice());
        self.inner.write(py, |ix| ix.add(cs, n, is)).or_raise()
    }

    fn remove(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<usize> {
        let ids = int_input::<i64>(ids, "ids", "int64 (or another integer dtype)", |kind, _| {
            kind == b'i' || kind == b'u'
        })?;
        let is = ids.as_slice();
        Ok(self.inner.write(py, |ix| ix.remove(is)))
    }

    #[pyo3(signature = (queries, k, metric="hamming", level=None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        k: i64,
        metric: &str,
        level: Option<&str>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let level = level_of(level)?;
        let k = usize::try_from(k)
            .map_err(|_| Error::value("k", "a positive integer", k))
            .or_raise()?;
        let (q, nq) = codes_2d(self.nbits, queries, "queries")?;
        let qs = q.as_slice();
        let ids_of = |ids: Vec<i64>| -> PyResult<Bound<'py, PyAny>> {
            Ok(PyArray1::from_vec(py, ids).reshape([nq, k])?.into_any())
        };
        match metric {
            "hamming" => {
                let hits = self
                    .inner
                    .read(py, |ix| ix.search_hamming(level, qs, nq, k))
                    .or_raise()?;
                let d = PyArray1::from_vec(py, hits.distances).reshape([nq, k])?;
                Ok((d.into_any(), ids_of(hits.ids)?))
            }
            "jaccard" => {
                let hits = self
                    .inner
                    .read(py, |ix| ix.search_jaccard(level, qs, nq, k))
                    .or_raise()?;
                let d = PyArray1::from_vec(py, hits.distances).reshape([nq, k])?;
                Ok((d.into_any(), ids_of(hits.ids)?))
            }
            other => Err(Error::value(
                "metric",
                "'hamming' or 'jaccard'",
                format!("{other:?}"),
            ))
            .or_raise(),
        }
    }

    #[pyo3(signature = (queries, max_distance, level=None))]
    fn range_search<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        max_distance: i64,
        level: Option<&str>,
    ) -> PyResult<RangeResult<'py>> {
        let level = level_of(level)?;
        let max_distance = u32::try_from(max_distance)
            .map_err(|_| Error::value("max_distance", "a non-negative integer", max_distance))
            .or_raise()?;
        let (q, nq) = codes_2d(self.nbits, queries, "queries")?;
        let qs = q.as_slice();
        let r = self
            .inner
            .read(py, |ix| ix.range_search(level, qs, nq, max_distance))
            .or_raise()?;
        Ok((
            PyArray1::from_vec(py, r.lims),
            PyArray1::from_vec(py, r.distances),
            PyArray1::from_vec(py, r.ids),
        ))
    }

    /// `(codes (n, code_bytes) uint8, ids (n,) int64)`: copies of the contents.
    fn contents<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyArray1<i64>>)> {
        let ix = self.inner.peek();
        let (codes, ids, _) = ix.parts();
        let c = PyArray1::from_slice(py, codes)
            .reshape([ids.len(), self.nbits.div_ceil(8)])?
            .into_any();
        Ok((c, PyArray1::from_slice(py, ids)))
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        self.inner
            .read(py, |ix| file::save_index(ix, &path))
            .or_raise()
    }

    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| file::load_index(&path)).or_raise()?;
        Ok(PyBinaryIndex::from(inner))
    }

    /// The bytes `save` writes (a safetensors file in memory), taken under the
    /// index's lock: the state a pickle carries.
    fn to_bytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.inner.read(py, file::index_bytes).or_raise()?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// An index from the bytes of `to_bytes`, validated as `load` validates a
    /// file (`FormatError`, naming `origin`, on anything malformed).
    #[staticmethod]
    #[pyo3(signature = (data, origin="BinaryIndex state"))]
    fn from_bytes(py: Python<'_>, data: &[u8], origin: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| file::index_from_bytes(data.to_vec(), origin))
            .or_raise()?;
        Ok(PyBinaryIndex::from(inner))
    }
}

impl From<BinaryIndex> for PyBinaryIndex {
    fn from(ix: BinaryIndex) -> Self {
        PyBinaryIndex {
            nbits: ix.nbits(),
            inner: Shared::new(ix),
        }
    }
}

/// The popcount kernel a level runs: `scalar`, `popcnt` or `avx512-vpopcntdq`.
#[pyfunction]
#[pyo3(signature = (level=None))]
fn popcount_kernel(level: Option<&str>) -> PyResult<&'static str> {
    Ok(neuropil::flyhash::hamming::kernel_name(level_of(level)?))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFlyHash>()?;
    m.add_class::<PyBinaryIndex>()?;
    m.add_function(wrap_pyfunction!(popcount_kernel, m)?)?;
    Ok(())
}

//! Bindings of the exact range-search index (`neuropil.range`).

use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffers::Expect;
use crate::errors::OrRaise;
use crate::shared::Shared;
use neuropil::range::{Method, Params, RangeIndex};
use neuropil::simd::{self, Level};
use neuropil::Error;

const KEYS: Expect = Expect::new("keys", &[2], "(n, d)");
// The keys an index is built from must not be empty; keys added later, the
// queries and their thresholds may be 0 rows (an empty batch: empty answers, as
// from faiss).
const KEYS_ADDED: Expect = Expect::new("keys", &[2], "(m, d)").empty_batch_at(2);
const QUERIES: Expect = Expect::new("queries", &[2], "(nq, d)").empty_batch_at(2);
const THRESHOLDS: Expect = Expect::new("thresholds", &[1], "(nq,)").empty_batch_at(1);

fn level_of(level: Option<&str>) -> PyResult<Level> {
    simd::resolve(level).or_raise()
}

/// Exact halfspace range search index (see `neuropil.range.RangeIndex`).
#[pyclass(name = "_RangeIndex", module = "neuropil._native", frozen)]
pub struct PyRangeIndex {
    inner: Shared<RangeIndex>,
    d: usize,
}

type RangeOut<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
);

type TopKOut<'py> = (
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<f32>>,
);

#[pymethods]
impl PyRangeIndex {
    #[new]
    #[pyo3(signature = (keys, method="auto", leaf=64, branching=8, rebuild_fraction=0.25, rebuild_min=256, seed=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        method: &str,
        leaf: usize,
        branching: usize,
        rebuild_fraction: f64,
        rebuild_min: usize,
        seed: u64,
    ) -> PyResult<Self> {
        let method = Method::parse(method).or_raise()?;
        let keys = KEYS.read(keys)?;
        let d = keys.shape()[1];
        let params = Params {
            leaf,
            branching,
            rebuild_fraction,
            rebuild_min,
            seed,
        };
        let slice = keys.as_slice();
        let inner = py
            .detach(|| RangeIndex::new(slice, d, method, params))
            .or_raise()?;
        Ok(PyRangeIndex {
            inner: Shared::new(inner),
            d,
        })
    }

    /// (lims, ids, scores, scanned, work) for queries (nq, d) and thresholds (nq,).
    #[pyo3(signature = (queries, thresholds, level=None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        thresholds: &Bound<'py, PyAny>,
        level: Option<&str>,
    ) -> PyResult<RangeOut<'py>> {
        let level = level_of(level)?;
        let q = QUERIES.read(queries)?;
        let t = THRESHOLDS.read(thresholds)?;
        self.check_d(q.shape())?;
        let (qs, ts) = (q.as_slice(), t.as_slice());
        let r = self
            .inner
            .read(py, |ix| ix.search_at(level, qs, ts))
            .or_raise()?;
        let lims: Vec<i64> = r.lims.iter().map(|&x| x as i64).collect();
        Ok((
            lims.into_pyarray(py),
            r.ids.into_pyarray(py),
            r.scores.into_pyarray(py),
            r.scanned.into_pyarray(py),
            r.work.into_pyarray(py),
        ))
    }

    /// (ids (nq, k), scores (nq, k), scanned (nq,)), best first.
    #[pyo3(signature = (queries, k, level=None))]
    fn topk<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        k: i64,
        level: Option<&str>,
    ) -> PyResult<TopKOut<'py>> {
        let level = level_of(level)?;
        let q = QUERIES.read(queries)?;
        self.check_d(q.shape())?;
        let n = self.inner.peek().len();
        let k = usize::try_from(k)
            .map_err(|_| Error::value("k", format!("between 1 and the number of keys ({n})"), k))
            .or_raise()?;
        let nq = q.shape()[0];
        let qs = q.as_slice();
        let r = self
            .inner
            .read(py, |ix| ix.topk_at(level, qs, k))
            .or_raise()?;
        let ids = r.ids.into_pyarray(py).reshape([nq, k])?;
        let scores = r.scores.into_pyarray(py).reshape([nq, k])?;
        Ok((ids, scores, r.scanned.into_pyarray(py)))
    }

    /// Appends keys (m, d); ids continue from len.
    fn add(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<()> {
        let k = KEYS_ADDED.read(keys)?;
        self.check_d_named("keys", k.shape())?;
        let slice = k.as_slice();
        self.inner.write(py, |ix| ix.add(slice)).or_raise()
    }

    /// An independent copy: the tree cloned, not rebuilt (read with the GIL released).
    fn copy(&self, py: Python<'_>) -> Self {
        let inner = self.inner.read(py, |ix| ix.clone());
        PyRangeIndex {
            inner: Shared::new(inner),
            d: self.d,
        }
    }

    fn rebuild(&self, py: Python<'_>) {
        self.inner.write(py, |ix| ix.rebuild());
    }

    /// Every key (n, d), by id.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f32>>> {
        // An O(n d) copy: made with the GIL released.
        let keys = self.inner.read(py, |ix| ix.keys());
        let n = keys.len() / self.d;
        keys.into_pyarray(py).reshape([n, self.d])
    }

    /// `(keys (n, d), indexed, builds)` read under one lock: every key by id,
    /// how many of them the tree holds (the first `indexed`; 0 for `flat`),
    /// and the builds so far. What a pickle carries.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyArray2<f32>>, usize, u64)> {
        let (keys, indexed, builds) = self.inner.read(py, |ix| {
            let s = ix.stats();
            (ix.keys(), s.indexed, s.builds)
        });
        let n = keys.len() / self.d;
        Ok((keys.into_pyarray(py).reshape([n, self.d])?, indexed, builds))
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ix = self.inner.peek();
        let s = ix.stats();
        let out = PyDict::new(py);
        out.set_item("n", s.n)?;
        out.set_item("d", s.d)?;
        out.set_item("method", s.method)?;
        out.set_item("indexed", s.indexed)?;
        out.set_item("pending", s.pending)?;
        out.set_item("nodes", s.nodes)?;
        out.set_item("blocks", s.blocks)?;
        out.set_item("builds", s.builds)?;
        out.set_item("bytes", s.bytes)?;
        out.set_item("stages", s.stages)?;
        out.set_item("explained_variance", s.explained)?;
        out.set_item("auto_work", s.auto_work)?;
        let p = ix.params();
        out.set_item("leaf", p.leaf)?;
        out.set_item("branching", p.branching)?;
        out.set_item("rebuild_fraction", p.rebuild_fraction)?;
        out.set_item("rebuild_min", p.rebuild_min)?;
        out.set_item("seed", p.seed)?;
        Ok(out)
    }

    #[getter]
    fn d(&self) -> usize {
        self.d
    }

    fn __len__(&self) -> usize {
        self.inner.peek().len()
    }

    #[getter]
    fn method(&self) -> &'static str {
        self.inner.peek().method().name()
    }
}

impl PyRangeIndex {
    fn check_d(&self, shape: &[usize]) -> PyResult<()> {
        self.check_d_named("queries", shape)
    }

    fn check_d_named(&self, arg: &'static str, shape: &[usize]) -> PyResult<()> {
        let d = self.d;
        if shape[1] != d {
            let hint = if arg == "queries" {
                format!("(nq, {d}) to match the keys")
            } else {
                format!("(m, {d}) to match the index")
            };
            return Err(Error::shape(arg, hint, shape)).or_raise();
        }
        Ok(())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRangeIndex>()?;
    Ok(())
}

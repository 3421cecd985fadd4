//! Bindings of the neuron cache and the sparse FFN (`neuropil.neurons` wraps them).

use half::f16;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffers::Expect;
use crate::errors::OrRaise;
use crate::shared::Shared;
use neuropil::neurons::{
    Activation, Bundled, CacheConfig, CacheState, NeuronCache, NeuronWeights, Policy, Select,
    SparseFfn, Q4, Q8,
};
use neuropil::Error;

fn policy(name: &str, decay: Option<f32>, window: Option<u64>) -> PyResult<Policy> {
    match (name, window) {
        ("frequency", None) => Ok(Policy::Frequency { decay }),
        ("window", Some(k)) if decay.is_none() => Ok(Policy::Window { k }),
        ("static", None) if decay.is_none() => Ok(Policy::Static),
        ("window", None) => Err(Error::value(
            "window",
            "a token count for policy 'window'",
            "None",
        ))
        .or_raise(),
        ("frequency" | "window" | "static", _) => Err(Error::value(
            "decay/window",
            "decay only with policy 'frequency', window only with policy 'window'",
            // (Python's spelling of the values: None, not Rust's Some(5))
            format!(
                "policy={name:?}, decay={}, window={}",
                decay.map_or("None".into(), |g| g.to_string()),
                window.map_or("None".into(), |k| k.to_string())
            ),
        ))
        .or_raise(),
        _ => Err(Error::value(
            "policy",
            "one of 'frequency', 'window', 'static'",
            format!("{name:?}"),
        ))
        .or_raise(),
    }
}

/// The core neuron cache (see `neuropil.neurons.NeuronCache`).
#[pyclass(name = "_NeuronCache", module = "neuropil._native", frozen)]
pub struct PyNeuronCache {
    inner: Shared<NeuronCache>,
}

#[pymethods]
impl PyNeuronCache {
    #[new]
    #[pyo3(signature = (num_neurons, capacity, bytes_per_neuron, policy_name, decay=None, window=None, hysteresis=0.0, reclassify_every=0))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_neurons: usize,
        capacity: usize,
        bytes_per_neuron: u64,
        policy_name: &str,
        decay: Option<f32>,
        window: Option<u64>,
        hysteresis: f32,
        reclassify_every: u64,
    ) -> PyResult<Self> {
        let cfg = CacheConfig {
            capacity,
            bytes_per_neuron,
            policy: policy(policy_name, decay, window)?,
            hysteresis,
            reclassify_every,
        };
        Ok(PyNeuronCache {
            inner: Shared::new(NeuronCache::new(num_neurons, cfg).or_raise()?),
        })
    }

    #[getter]
    fn num_neurons(&self) -> usize {
        self.inner.peek().num_neurons()
    }

    fn record_indices(&self, py: Python<'_>, ids: PyReadonlyArray1<'_, i64>) -> PyResult<()> {
        let ids = ids.as_slice()?;
        self.inner.write(py, |c| c.record_indices(ids)).or_raise()
    }

    fn record_batch(&self, py: Python<'_>, mask: PyReadonlyArray2<'_, u8>) -> PyResult<()> {
        let rows = mask.shape()[0];
        let m = mask.as_slice()?;
        self.inner.write(py, |c| c.record_batch(m, rows)).or_raise()
    }

    fn reclassify(&self, py: Python<'_>) {
        self.inner.write(py, |c| c.reclassify());
    }

    fn set_hot(&self, ids: PyReadonlyArray1<'_, i64>) -> PyResult<()> {
        self.inner.poke().set_hot(ids.as_slice()?).or_raise()
    }

    fn hot_neurons<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        let hot = self.inner.peek().hot_neurons().to_vec();
        hot.into_pyarray(py)
    }

    fn cold_neurons<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        let cold = self.inner.peek().cold_neurons();
        cold.into_pyarray(py)
    }

    fn counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        self.inner
            .peek()
            .counts()
            .iter()
            .map(|&c| u64::from(c))
            .collect::<Vec<u64>>()
            .into_pyarray(py)
    }

    fn activation_frequency(&self, neuron: i64) -> PyResult<f64> {
        self.inner.peek().activation_frequency(neuron).or_raise()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.peek().stats();
        let d = PyDict::new(py);
        d.set_item("num_hot", s.num_hot)?;
        d.set_item("num_cold", s.num_cold)?;
        d.set_item("total_activations", s.total_activations)?;
        d.set_item("events", s.events)?;
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("hot_ratio", s.hot_ratio)?;
        d.set_item("hit_rate", s.hit_rate)?;
        d.set_item("bytes_fetched", s.bytes_fetched)?;
        d.set_item("hot_bytes", s.hot_bytes)?;
        Ok(d)
    }

    fn reset_stats(&self) {
        self.inner.poke().reset_stats();
    }

    fn clear(&self) {
        self.inner.poke().clear();
    }

    /// Arrays and counters of the full state: (counts u64, scores f32, last u64,
    /// hot u32, [tokens, events, hits, misses, pending], classified).
    #[allow(clippy::type_complexity)]
    fn state<'py>(
        &self,
        py: Python<'py>,
    ) -> (
        Bound<'py, PyArray1<u64>>,
        Bound<'py, PyArray1<f32>>,
        Bound<'py, PyArray1<u64>>,
        Bound<'py, PyArray1<u32>>,
        Vec<u64>,
        bool,
    ) {
        let st = self.inner.peek().state();
        (
            st.counts.into_pyarray(py),
            st.scores.into_pyarray(py),
            st.last.into_pyarray(py),
            st.hot.into_pyarray(py),
            st.counters.to_vec(),
            st.classified,
        )
    }

    /// Restores the state written by `state()`; raises FormatError if inconsistent.
    #[allow(clippy::too_many_arguments)]
    fn load_state(
        &self,
        counts: PyReadonlyArray1<'_, u64>,
        scores: PyReadonlyArray1<'_, f32>,
        last: PyReadonlyArray1<'_, u64>,
        hot: PyReadonlyArray1<'_, u32>,
        counters: Vec<u64>,
        classified: bool,
    ) -> PyResult<()> {
        let counters: [u64; 5] = counters
            .try_into()
            .map_err(|v: Vec<u64>| {
                Error::format(
                    "neuron cache state: counters",
                    format!("expected 5 values, found {}", v.len()),
                )
            })
            .or_raise()?;
        let st = CacheState {
            counts: counts.as_slice()?.to_vec(),
            scores: scores.as_slice()?.to_vec(),
            last: last.as_slice()?.to_vec(),
            hot: hot.as_slice()?.to_vec(),
            counters,
            classified,
        };
        let mut cache = self.inner.poke();
        *cache = NeuronCache::from_state(cache.num_neurons(), *cache.config(), st).or_raise()?;
        Ok(())
    }
}

enum Ffn {
    F32(SparseFfn<Bundled<f32>>),
    F16(SparseFfn<Bundled<f16>>),
    Q8(SparseFfn<Bundled<Q8>>),
    Q4(SparseFfn<Bundled<Q4>>),
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

/// The core sparse FFN (see `neuropil.neurons.SparseFFN`).
#[pyclass(name = "_SparseFfn", module = "neuropil._native", frozen)]
pub struct PySparseFfn {
    inner: Shared<Ffn>,
}

const GATE: Expect = Expect::new("gate", &[2], "(h, d)");
const UP: Expect = Expect::new("up", &[2], "(h, d)");
const DOWN: Expect = Expect::new("down", &[2], "(d, h)");
const UP_BIAS: Expect = Expect::new("up_bias", &[1], "(h,)");
const DOWN_BIAS: Expect = Expect::new("down_bias", &[1], "(d,)");
// A batch of 0 rows gives an empty result, as `nn.Linear` does.
const X: Expect = Expect::new("x", &[2], "(n, d)").empty_batch_at(2);

#[pymethods]
impl PySparseFfn {
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
        if let Some(g) = &gate {
            if g.shape() != [h, d] {
                return Err(Error::shape(
                    "gate",
                    format!("({h}, {d}) to match up"),
                    g.shape(),
                ))
                .or_raise();
            }
        }
        let down = DOWN.read(down)?;
        if down.shape() != [d, h] {
            return Err(Error::shape(
                "down",
                format!("({d}, {h}) to match up"),
                down.shape(),
            ))
            .or_raise();
        }
        let ub = up_bias
            .map(|b| UP_BIAS.read(b))
            .transpose()?
            .map(|b| b.as_slice().to_vec());
        let db = down_bias
            .map(|b| DOWN_BIAS.read(b))
            .transpose()?
            .map(|b| b.as_slice().to_vec());
        let (gs, us, ds) = (
            gate.as_ref().map(|g| g.as_slice()),
            up.as_slice(),
            down.as_slice(),
        );
        let inner = py
            .detach(|| -> neuropil::Result<Ffn> {
                Ok(match dtype {
                    "float32" => Ffn::F32(SparseFfn::new(
                        Bundled::from_matrices(gs, us, ds, h, d)?,
                        act,
                        ub,
                        db,
                    )?),
                    "float16" => Ffn::F16(SparseFfn::new(
                        Bundled::from_matrices(gs, us, ds, h, d)?,
                        act,
                        ub,
                        db,
                    )?),
                    "int8" => Ffn::Q8(SparseFfn::new(
                        Bundled::from_matrices(gs, us, ds, h, d)?,
                        act,
                        ub,
                        db,
                    )?),
                    "int4" => Ffn::Q4(SparseFfn::new(
                        Bundled::from_matrices(gs, us, ds, h, d)?,
                        act,
                        ub,
                        db,
                    )?),
                    other => {
                        return Err(Error::value(
                            "dtype",
                            "one of 'float32', 'float16', 'int8', 'int4'",
                            format!("{other:?}"),
                        ));
                    }
                })
            })
            .or_raise()?;
        Ok(PySparseFfn {
            inner: Shared::new(inner),
        })
    }

    #[getter]
    fn num_neurons(&self) -> usize {
        with_ffn!(&*self.inner.peek(), f => f.weights().num_neurons())
    }

    #[getter]
    fn dim(&self) -> usize {
        with_ffn!(&*self.inner.peek(), f => f.weights().dim())
    }

    #[getter]
    fn gated(&self) -> bool {
        with_ffn!(&*self.inner.peek(), f => f.weights().gated())
    }

    #[getter]
    fn bytes_per_neuron(&self) -> usize {
        with_ffn!(&*self.inner.peek(), f => f.weights().bytes_per_neuron())
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        match *self.inner.peek() {
            Ffn::F32(_) => "float32",
            Ffn::F16(_) => "float16",
            Ffn::Q8(_) => "int8",
            Ffn::Q4(_) => "int4",
        }
    }

    /// `mode`: "dense", "threshold" (value = t) or "topk" (value = k).
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        mode: &str,
        value: f64,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let x = X.read_width(x, self.dim())?;
        let rows = x.shape()[0];
        let select = match mode {
            "dense" => Select::Dense,
            "threshold" => Select::Threshold(value as f32),
            "topk" => Select::TopK(value as usize),
            _ => {
                return Err(Error::value(
                    "mode",
                    "'dense', 'threshold' or 'topk'",
                    format!("{mode:?}"),
                ))
                .or_raise()
            }
        };
        let xs = x.as_slice();
        let d = self.dim();
        let y = self
            .inner
            .read(py, |ffn| with_ffn!(ffn, f => f.forward(xs, rows, select)))
            .or_raise()?;
        Ok(numpy::ndarray::Array2::from_shape_vec((rows, d), y)
            .map_err(|e| Error::value("x", "a valid shape", e))
            .or_raise()?
            .into_pyarray(py))
    }

    /// `act(pre)` of every neuron for each row of `x`: shape (n, h).
    fn activations<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let x = X.read_width(x, self.dim())?;
        let rows = x.shape()[0];
        let xs = x.as_slice();
        let h = self.num_neurons();
        let a = self
            .inner
            .read(py, |ffn| with_ffn!(ffn, f => f.activations(xs, rows)))
            .or_raise()?;
        Ok(numpy::ndarray::Array2::from_shape_vec((rows, h), a)
            .map_err(|e| Error::value("x", "a valid shape", e))
            .or_raise()?
            .into_pyarray(py))
    }

    fn set_hot(&self, py: Python<'_>, ids: PyReadonlyArray1<'_, u32>) -> PyResult<()> {
        let ids = ids.as_slice()?;
        self.inner
            .write(py, |ffn| with_ffn!(ffn, f => f.set_hot(ids)))
            .or_raise()
    }

    fn hot_neurons<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u32>> {
        let hot = with_ffn!(&*self.inner.peek(), f => f.hot_neurons().to_vec());
        hot.into_pyarray(py)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = with_ffn!(&*self.inner.peek(), f => f.stats());
        let d = PyDict::new(py);
        d.set_item("calls", s.calls)?;
        d.set_item("rows", s.rows)?;
        d.set_item("active_pairs", s.active_pairs)?;
        d.set_item("hot_fetches", s.hot_fetches)?;
        d.set_item("cold_fetches", s.cold_fetches)?;
        d.set_item("cold_bytes", s.cold_bytes)?;
        Ok(d)
    }

    fn reset_stats(&self) {
        with_ffn!(&*self.inner.peek(), f => f.reset_stats());
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
        let (g, u, dn) = with_ffn!(&*self.inner.peek(), f => f.weights().to_matrices());
        let arr = |v: Vec<f32>, r: usize, c: usize| -> PyResult<Bound<'py, PyArray2<f32>>> {
            Ok(numpy::ndarray::Array2::from_shape_vec((r, c), v)
                .map_err(|e| Error::value("weights", "a valid shape", e))
                .or_raise()?
                .into_pyarray(py))
        };
        Ok((
            g.map(|g| arr(g, h, d)).transpose()?,
            arr(u, h, d)?,
            arr(dn, d, h)?,
        ))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyNeuronCache>()?;
    m.add_class::<PySparseFfn>()?;
    Ok(())
}

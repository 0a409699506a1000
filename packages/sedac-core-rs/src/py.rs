//! The pyo3 layer of `sedac_core._native`: buffer checks, GIL release, calls
//! into [`crate::decide`] / [`crate::replay`]. Inputs are read through the
//! buffer protocol without copying; results are written into arrays the Python
//! side allocated. Argument validation with user-facing messages happens in the
//! Python wrapper (shared by both backends); the checks here only guarantee that
//! no buffer is read or written out of bounds.

// pyo3 0.22's #[pyfunction]/#[pymethods] expansions trip this lint on every
// PyResult return with clippy >= 1.80 (fixed in later pyo3 releases).
#![allow(clippy::useless_conversion)]

use crate::channel;
use crate::decide::{self, ProbeParams, Rule};
use crate::replay::{self, Counts, MonitorConfig, ProbeConfig};
use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

fn buffer<T: Element>(
    obj: &Bound<'_, PyAny>,
    name: &str,
    dtype: &str,
    ndim: usize,
) -> PyResult<PyBuffer<T>> {
    let wrong = || {
        PyTypeError::new_err(format!(
            "{name}: expected a C-contiguous {ndim}-D {dtype} array"
        ))
    };
    let buf = PyBuffer::<T>::get_bound(obj).map_err(|_| wrong())?;
    // pyo3 accepts explicit byte orders ('>f', '!f'); only native order is read correctly.
    let fmt = buf.format().to_bytes();
    let foreign = matches!(fmt.first(), Some(b'>') | Some(b'!')) && cfg!(target_endian = "little")
        || matches!(fmt.first(), Some(b'<')) && cfg!(target_endian = "big");
    if foreign || !buf.is_c_contiguous() || buf.dimensions() != ndim {
        return Err(wrong());
    }
    Ok(buf)
}

fn output<T: Element>(
    obj: &Bound<'_, PyAny>,
    name: &str,
    dtype: &str,
    ndim: usize,
) -> PyResult<PyBuffer<T>> {
    let buf = buffer::<T>(obj, name, dtype, ndim)?;
    if buf.readonly() {
        return Err(PyValueError::new_err(format!(
            "{name}: output array is read-only"
        )));
    }
    Ok(buf)
}

/// # Safety
/// The buffer must stay alive and unmodified by others while the slice is used.
unsafe fn view<T: Element>(buf: &PyBuffer<T>) -> &[T] {
    match buf.item_count() {
        0 => &[],
        n => std::slice::from_raw_parts(buf.buf_ptr() as *const T, n),
    }
}

/// # Safety
/// As [`view`], and no other slice may alias this buffer (see [`disjoint`]).
#[allow(clippy::mut_from_ref)]
unsafe fn view_mut<T: Element>(buf: &PyBuffer<T>) -> &mut [T] {
    match buf.item_count() {
        0 => &mut [],
        n => std::slice::from_raw_parts_mut(buf.buf_ptr() as *mut T, n),
    }
}

fn span<T: Element>(buf: &PyBuffer<T>) -> (usize, usize) {
    let start = buf.buf_ptr() as usize;
    (start, start + buf.len_bytes())
}

/// Outputs must not overlap each other or any input: writing through one
/// slice while another reads the same memory would be undefined behaviour.
fn disjoint(outputs: &[(usize, usize)], inputs: &[(usize, usize)]) -> PyResult<()> {
    let overlap = |a: &(usize, usize), b: &(usize, usize)| a.0 < b.1 && b.0 < a.1;
    for (i, o) in outputs.iter().enumerate() {
        if outputs[i + 1..].iter().chain(inputs).any(|x| overlap(o, x)) {
            return Err(PyValueError::new_err(
                "output arrays must not share memory with other arguments",
            ));
        }
    }
    Ok(())
}

fn shape_error(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

fn rule(code: u8) -> PyResult<Rule> {
    Rule::from_code(code).ok_or_else(|| PyValueError::new_err(format!("unknown rule code {code}")))
}

fn to_usize(v: i64, name: &str) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {v}")))
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn evaluate(
    py: Python<'_>,
    risk: &Bound<'_, PyAny>,
    thresholds: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    decay: f32,
    rule_code: u8,
    soft: bool,
    soft_k: f32,
    adaptive_decay: bool,
    decay_bonus: f32,
    history: f32,
    out_exit: &Bound<'_, PyAny>,
    out_conf: &Bound<'_, PyAny>,
    out_soft: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let risk = buffer::<f32>(risk, "risk", "float32", 2)?;
    let thr = buffer::<f32>(thresholds, "thresholds", "float32", 1)?;
    let tgt = buffer::<f32>(targets, "targets", "float32", 1)?;
    let w = buffer::<f32>(weights, "weights", "float32", 1)?;
    let e = output::<i32>(out_exit, "out_exit", "int32", 1)?;
    let c = output::<f32>(out_conf, "out_conf", "float32", 2)?;
    let s = output::<f32>(out_soft, "out_soft", "float32", 2)?;
    disjoint(
        &[span(&e), span(&c), span(&s)],
        &[span(&risk), span(&thr), span(&tgt), span(&w)],
    )?;
    let rule = rule(rule_code)?;
    py.allow_threads(|| {
        // SAFETY: buffers are held for the whole call and checked disjoint.
        let params = ProbeParams {
            thresholds: unsafe { view(&thr) },
            targets: unsafe { view(&tgt) },
            weights: unsafe { view(&w) },
            decay,
            rule,
            adaptive: adaptive_decay.then_some(decide::AdaptiveDecay {
                bonus: decay_bonus,
                history,
            }),
        };
        decide::evaluate(
            &params,
            unsafe { view(&risk) },
            soft,
            soft_k,
            unsafe { view_mut(&e) },
            unsafe { view_mut(&c) },
            unsafe { view_mut(&s) },
        )
    })
    .map_err(shape_error)
}

#[pyfunction]
fn consecutive_exit(
    py: Python<'_>,
    similarity: &Bound<'_, PyAny>,
    tau: f32,
    k: i64,
    min_layer: i64,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let sim = buffer::<f32>(similarity, "similarity", "float32", 2)?;
    let o = output::<i32>(out, "out", "int32", 1)?;
    disjoint(&[span(&o)], &[span(&sim)])?;
    let layers = sim.shape()[1];
    let (k, min_layer) = (to_usize(k, "k")?, to_usize(min_layer, "min_layer")?);
    py.allow_threads(|| {
        // SAFETY: as in `evaluate`.
        decide::consecutive_exit(unsafe { view(&sim) }, layers, tau, k, min_layer, unsafe {
            view_mut(&o)
        })
    })
    .map_err(shape_error)
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn gated_mlp(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    gate_up: &Bound<'_, PyAny>,
    down: &Bound<'_, PyAny>,
    t_in: f32,
    t_mid: f32,
    out: &Bound<'_, PyAny>,
) -> PyResult<(usize, usize)> {
    let x = buffer::<f32>(x, "x", "float32", 2)?;
    let gate_up = buffer::<f32>(gate_up, "gate_up", "float32", 2)?;
    let down = buffer::<f32>(down, "down", "float32", 2)?;
    let o = output::<f32>(out, "out", "float32", 2)?;
    disjoint(&[span(&o)], &[span(&x), span(&gate_up), span(&down)])?;
    let (rows, hidden, inter) = (x.shape()[0], x.shape()[1], down.shape()[0]);
    if gate_up.shape() != [hidden, 2 * inter] || down.shape()[1] != hidden || o.shape() != x.shape()
    {
        return Err(shape_error(format!(
            "gated_mlp: x {:?}, gate_up {:?}, down {:?}, out {:?}: expected [rows, hidden], [hidden, 2*inter], \
             [inter, hidden], [rows, hidden]",
            x.shape(),
            gate_up.shape(),
            down.shape(),
            o.shape()
        )));
    }
    py.allow_threads(|| {
        // SAFETY: as in `evaluate`.
        channel::gated_mlp(
            unsafe { view(&x) },
            rows,
            hidden,
            inter,
            unsafe { view(&gate_up) },
            unsafe { view(&down) },
            t_in,
            t_mid,
            unsafe { view_mut(&o) },
            channel::parallel(),
        )
    })
    .map(|k| (k.input, k.inner))
    // the shapes were checked above: what fails here is running the tasks
    .map_err(PyRuntimeError::new_err)
}

/// Run `gated_mlp`'s parallel tasks through the C function at `address`, which must have the
/// signature and contract of torch's `torch_parallel_for` (see `channel::ParallelFor`) and stay loaded
/// for the life of the process; 0: on rayon's pool (the default).
#[pyfunction]
fn set_parallel_for(address: usize) {
    // SAFETY: the caller's promise above; `sedac_core.set_parallel_for` documents it.
    unsafe { channel::set_parallel_for(address) }
}

/// Where `gated_mlp`'s tasks run: "rayon" or "external".
#[pyfunction]
fn parallel_for() -> &'static str {
    match channel::parallel() {
        channel::Parallel::Rayon => "rayon",
        channel::Parallel::External(_) => "external",
    }
}

#[pyfunction]
fn quantiles(
    py: Python<'_>,
    risk: &Bound<'_, PyAny>,
    rates: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let risk = buffer::<f32>(risk, "risk", "float32", 2)?;
    let rates = buffer::<f32>(rates, "rates", "float32", 1)?;
    let o = output::<f32>(out, "out", "float32", 1)?;
    disjoint(&[span(&o)], &[span(&risk), span(&rates)])?;
    if risk.shape()[1] != rates.item_count() {
        return Err(shape_error(format!(
            "quantiles: {} columns but {} rates",
            risk.shape()[1],
            rates.item_count()
        )));
    }
    py.allow_threads(|| {
        // SAFETY: as in `evaluate`.
        decide::column_quantiles(unsafe { view(&risk) }, unsafe { view(&rates) }, unsafe {
            view_mut(&o)
        })
    })
    .map_err(shape_error)
}

struct CountsOut {
    exits: PyBuffer<i64>,
    skipped: PyBuffer<i64>,
    unsafe_exits: PyBuffer<i64>,
}

impl CountsOut {
    fn new(
        e: &Bound<'_, PyAny>,
        s: &Bound<'_, PyAny>,
        u: &Bound<'_, PyAny>,
        configs: usize,
    ) -> PyResult<Self> {
        let out = CountsOut {
            exits: output::<i64>(e, "out_exits", "int64", 1)?,
            skipped: output::<i64>(s, "out_skipped", "int64", 1)?,
            unsafe_exits: output::<i64>(u, "out_unsafe", "int64", 1)?,
        };
        for b in [&out.exits, &out.skipped, &out.unsafe_exits] {
            if b.item_count() != configs {
                return Err(shape_error(format!(
                    "replay: output of {} values for {configs} configs",
                    b.item_count()
                )));
            }
        }
        Ok(out)
    }

    fn spans(&self) -> [(usize, usize); 3] {
        [
            span(&self.exits),
            span(&self.skipped),
            span(&self.unsafe_exits),
        ]
    }

    fn write(&self, counts: &[Counts]) {
        // SAFETY: sizes checked in `new`; outputs checked disjoint by the caller.
        let (e, s, u) = unsafe {
            (
                view_mut(&self.exits),
                view_mut(&self.skipped),
                view_mut(&self.unsafe_exits),
            )
        };
        for (i, c) in counts.iter().enumerate() {
            e[i] = c.exits;
            s[i] = c.skipped_layers;
            u[i] = c.unsafe_exits;
        }
    }
}

fn safe_labels(safe: &Option<Bound<'_, PyAny>>) -> PyResult<Option<PyBuffer<u8>>> {
    safe.as_ref()
        .map(|s| buffer::<u8>(s, "safe", "uint8", 2))
        .transpose()
}

/// The common tail of both replay bindings: check that the outputs alias no
/// input, run `replay` without the GIL over the trace, write the counts.
fn run_replay<F>(
    py: Python<'_>,
    signal: &PyBuffer<f32>,
    safe: &Option<PyBuffer<u8>>,
    out: &CountsOut,
    replay: F,
) -> PyResult<()>
where
    F: FnOnce(&[f32], Option<&[u8]>) -> Result<Vec<Counts>, String> + Send,
{
    let mut inputs = vec![span(signal)];
    inputs.extend(safe.as_ref().map(span));
    disjoint(&out.spans(), &inputs)?;
    let counts = py
        .allow_threads(|| {
            // SAFETY: buffers are held for the whole call and checked disjoint.
            let safe = safe.as_ref().map(|s| unsafe { view(s) });
            replay(unsafe { view(signal) }, safe)
        })
        .map_err(shape_error)?;
    out.write(&counts);
    Ok(())
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (similarity, safe, tau, k, min_layer, protect_last, per_layer, out_exits, out_skipped, out_unsafe))]
fn replay_monitor(
    py: Python<'_>,
    similarity: &Bound<'_, PyAny>,
    safe: Option<Bound<'_, PyAny>>,
    tau: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    min_layer: &Bound<'_, PyAny>,
    protect_last: &Bound<'_, PyAny>,
    per_layer: &Bound<'_, PyAny>,
    out_exits: &Bound<'_, PyAny>,
    out_skipped: &Bound<'_, PyAny>,
    out_unsafe: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let sim = buffer::<f32>(similarity, "similarity", "float32", 2)?;
    let safe = safe_labels(&safe)?;
    let tau = buffer::<f32>(tau, "tau", "float32", 1)?.to_vec(py)?;
    let k = buffer::<i64>(k, "k", "int64", 1)?.to_vec(py)?;
    let min_layer = buffer::<i64>(min_layer, "min_layer", "int64", 1)?.to_vec(py)?;
    let protect = buffer::<i64>(protect_last, "protect_last", "int64", 1)?.to_vec(py)?;
    let per_layer = buffer::<u8>(per_layer, "per_layer", "uint8", 1)?.to_vec(py)?;
    let m = tau.len();
    if [k.len(), min_layer.len(), protect.len(), per_layer.len()]
        .iter()
        .any(|&l| l != m)
    {
        return Err(shape_error(
            "replay: config arrays differ in length".to_string(),
        ));
    }
    let configs = (0..m)
        .map(|i| {
            Ok(MonitorConfig {
                tau: tau[i],
                k: to_usize(k[i], "k")?,
                min_layer: to_usize(min_layer[i], "min_layer")?,
                protect_last: to_usize(protect[i], "protect_last")?,
                per_layer: per_layer[i] != 0,
            })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let layers = sim.shape()[1];
    let out = CountsOut::new(out_exits, out_skipped, out_unsafe, m)?;
    run_replay(py, &sim, &safe, &out, |sim, safe| {
        replay::replay_monitor(sim, layers, safe, &configs)
    })
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (risk, safe, layer_of, num_layers, thresholds, targets, weights, decay, rule, protect_last, out_exits, out_skipped, out_unsafe))]
fn replay_probe(
    py: Python<'_>,
    risk: &Bound<'_, PyAny>,
    safe: Option<Bound<'_, PyAny>>,
    layer_of: &Bound<'_, PyAny>,
    num_layers: i64,
    thresholds: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    weights: &Bound<'_, PyAny>,
    decay: &Bound<'_, PyAny>,
    rule: &Bound<'_, PyAny>,
    protect_last: &Bound<'_, PyAny>,
    out_exits: &Bound<'_, PyAny>,
    out_skipped: &Bound<'_, PyAny>,
    out_unsafe: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let risk = buffer::<f32>(risk, "risk", "float32", 2)?;
    let safe = safe_labels(&safe)?;
    let layer_of = buffer::<i64>(layer_of, "layer_of", "int64", 1)?
        .to_vec(py)?
        .into_iter()
        .map(|l| to_usize(l, "layer"))
        .collect::<PyResult<Vec<_>>>()?;
    let num_layers = to_usize(num_layers, "num_layers")?;
    let thr = buffer::<f32>(thresholds, "thresholds", "float32", 2)?.to_vec(py)?;
    let tgt = buffer::<f32>(targets, "targets", "float32", 2)?.to_vec(py)?;
    let w = buffer::<f32>(weights, "weights", "float32", 2)?.to_vec(py)?;
    let decay = buffer::<f32>(decay, "decay", "float32", 1)?.to_vec(py)?;
    let rules = buffer::<u8>(rule, "rule", "uint8", 1)?.to_vec(py)?;
    let protect = buffer::<i64>(protect_last, "protect_last", "int64", 1)?.to_vec(py)?;
    let c = layer_of.len();
    let m = decay.len();
    if c == 0
        || [thr.len(), tgt.len(), w.len()].iter().any(|&l| l != m * c)
        || rules.len() != m
        || protect.len() != m
    {
        return Err(shape_error(
            "replay: config arrays differ in length".to_string(),
        ));
    }
    let mut configs = Vec::with_capacity(m);
    for i in 0..m {
        configs.push(ProbeConfig {
            params: ProbeParams {
                thresholds: &thr[i * c..(i + 1) * c],
                targets: &tgt[i * c..(i + 1) * c],
                weights: &w[i * c..(i + 1) * c],
                decay: decay[i],
                rule: self::rule(rules[i])?,
                adaptive: None,
            },
            protect_last: to_usize(protect[i], "protect_last")?,
        });
    }
    if risk.shape()[1] != c {
        return Err(shape_error(format!(
            "replay: risk has {} columns, {c} checkpoint layers given",
            risk.shape()[1]
        )));
    }
    let out = CountsOut::new(out_exits, out_skipped, out_unsafe, m)?;
    run_replay(py, &risk, &safe, &out, |risk, safe| {
        replay::replay_probe(risk, &layer_of, num_layers, safe, &configs)
    })
}

/// Adaptive probe thresholds held in atomics: `observe` and `thresholds`
/// may be called from several threads at once.
#[pyclass(frozen, module = "sedac_core._native")]
struct ThresholdState(decide::ThresholdState);

#[pymethods]
impl ThresholdState {
    #[new]
    fn new(
        thresholds: Vec<f32>,
        targets: Vec<f32>,
        alpha: f32,
        warmup_observations: u64,
        adaptive: bool,
    ) -> PyResult<Self> {
        decide::ThresholdState::new(&thresholds, &targets, alpha, warmup_observations, adaptive)
            .map(ThresholdState)
            .map_err(shape_error)
    }

    fn thresholds(&self) -> Vec<f32> {
        self.0.thresholds()
    }

    fn set_thresholds(&self, values: Vec<f32>) -> PyResult<()> {
        self.0.set_thresholds(&values).map_err(shape_error)
    }

    #[getter]
    fn observations(&self) -> u64 {
        self.0.observations()
    }

    fn set_observations(&self, observations: u64) {
        self.0.set_observations(observations)
    }

    fn observe(&self, py: Python<'_>, risk: &Bound<'_, PyAny>) -> PyResult<bool> {
        let risk = buffer::<f32>(risk, "risk", "float32", 2)?;
        let c = self.0.thresholds().len();
        if risk.shape()[1] != c {
            return Err(shape_error(format!(
                "observe: buffer of {} values does not split into {c} checkpoints",
                risk.item_count()
            )));
        }
        py.allow_threads(|| {
            // SAFETY: the buffer is held for the whole call.
            self.0.observe(unsafe { view(&risk) })
        })
        .map_err(shape_error)
    }
}

/// Threads in rayon's pool (set `RAYON_NUM_THREADS` before first use to change).
#[pyfunction]
fn num_threads() -> usize {
    rayon::current_num_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("MIN_THRESHOLD", decide::MIN_THRESHOLD)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(consecutive_exit, m)?)?;
    m.add_function(wrap_pyfunction!(gated_mlp, m)?)?;
    m.add_function(wrap_pyfunction!(quantiles, m)?)?;
    m.add_function(wrap_pyfunction!(replay_monitor, m)?)?;
    m.add_function(wrap_pyfunction!(replay_probe, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_parallel_for, m)?)?;
    m.add_function(wrap_pyfunction!(parallel_for, m)?)?;
    m.add_class::<ThresholdState>()?;
    Ok(())
}

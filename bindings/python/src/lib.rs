//! # simfreeze._native: the policy runtime as a Python extension
//!
//! The same plugin files, the same loader and the same freezing contract
//! as the `simfreeze` binary, for training loops written in Python. This
//! crate links `simfreeze-runtime` (no libtorch): a [`Policy`] is a
//! [`PolicyDriver`] around a loaded plugin, so every decision passes
//! through the contract check the trainer applies, and the step loop,
//! timeline and state handling are the trainer's own code.
//!
//! The Python side (`python/simfreeze/`) converts tensors and arrays into
//! the little-endian bytes taken here, and builds the freeze controller
//! and the Lightning and Hugging Face callbacks on top.
//!
//! Errors: a plugin that cannot be loaded or created raises
//! `PluginLoadError`; a decision that breaks the contract raises
//! `ContractViolation` (the state stays as it was); a policy that returns
//! an error raises `PolicyFailed`, one that panics `PolicyPanicked` (the
//! panic is caught at the plugin boundary: the interpreter lives). All
//! four derive from `PolicyError`. Inputs of the wrong shape raise
//! `ValueError` before the policy sees them.

mod blocks;

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use simfreeze_abi::ffi::{Needs, ObservationV2, ReferenceRequest};
use simfreeze_runtime::contract::FreezeState;
use simfreeze_runtime::driver::{DriverError, PolicyDriver, StepInput, Timeline};
use simfreeze_runtime::loader::{LoadError, Plugin, PolicyCallError, SearchPath};
use simfreeze_runtime::more::MoreData;
use simfreeze_runtime::simulate::{SimConfig, SyntheticWorld};

create_exception!(
    _native,
    PolicyError,
    PyRuntimeError,
    "A policy could not be loaded, failed, or broke the freezing contract."
);
create_exception!(
    _native,
    PluginLoadError,
    PolicyError,
    "The plugin was not found, is not a simfreeze plugin, was built for another ABI, or its constructor refused the options."
);
create_exception!(
    _native,
    ContractViolation,
    PolicyError,
    "The policy's decision broke the freezing contract; it was refused and the freeze state is unchanged."
);
create_exception!(
    _native,
    PolicyFailed,
    PolicyError,
    "The policy returned an error."
);
create_exception!(
    _native,
    PolicyPanicked,
    PolicyError,
    "The policy panicked (caught at the plugin boundary)."
);

fn load_error(e: LoadError) -> PyErr {
    PluginLoadError::new_err(e.to_string())
}

fn call_error(e: PolicyCallError) -> PyErr {
    match e {
        PolicyCallError::Panicked { .. } => PolicyPanicked::new_err(e.to_string()),
        PolicyCallError::Failed { .. } => PolicyFailed::new_err(e.to_string()),
    }
}

fn driver_error(e: DriverError) -> PyErr {
    match e {
        DriverError::Policy(e) => call_error(e),
        DriverError::Contract(v) => ContractViolation::new_err(v.to_string()),
    }
}

/// Little-endian `f32` values from `bytes`.
fn f32s(name: &str, bytes: &[u8]) -> PyResult<Vec<f32>> {
    if bytes.len() % 4 != 0 {
        return Err(PyValueError::new_err(format!(
            "{name}: {} bytes are not whole float32 values",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Little-endian `i64` values from `bytes`.
fn i64s(name: &str, bytes: &[u8]) -> PyResult<Vec<i64>> {
    if bytes.len() % 8 != 0 {
        return Err(PyValueError::new_err(format!(
            "{name}: {} bytes are not whole int64 values",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn reference_name(r: ReferenceRequest) -> &'static str {
    match r {
        ReferenceRequest::Keep => "keep",
        ReferenceRequest::TakeF32 => "take_f32",
        ReferenceRequest::TakeBf16 => "take_bf16",
        ReferenceRequest::TakeInt8 => "take_int8",
    }
}

/// A freezing policy loaded from a plugin, with the freeze state it
/// governs: `observe` hands it one finished step and returns the checked
/// decision for the next.
#[pyclass(module = "simfreeze._native", unsendable)]
struct Policy {
    driver: PolicyDriver,
    /// The plugin and options it was made from (a rehearsal makes another).
    plugin: Plugin,
    options: String,
    layers: u32,
    /// The step after which the last reference snapshot was taken (the
    /// policy's decision asked for it), if any.
    reference_step: Option<u64>,
}

/// The on-demand observations (contract 2) handed to `observe`: per-block
/// reductions of the batch, the fixed batch and both through the
/// reference, sampled weights and accumulated gradient norms.
struct More {
    blocks: Vec<(String, blocks::BlocksIn)>,
    reference_step: Option<u64>,
    sampled_weights: Option<Vec<f32>>,
    samples_per_block: usize,
    acc_grad_l1: Option<Vec<f64>>,
    acc_grad_l2: Option<Vec<f64>>,
    acc_grad_steps: u64,
}

impl Policy {
    fn more(&self, m: More) -> PyResult<MoreData> {
        let asked = self.driver.state().observe();
        let layers = self.layers as usize;
        let mut data = MoreData::default();
        let reference_step = m.reference_step.or(self.reference_step);
        let [batch, batch_reference, probe, probe_reference] = blocks::reductions(
            &self.name(),
            self.layers as usize,
            asked,
            m.blocks,
            reference_step,
        )?;
        let sets = [batch, batch_reference, probe, probe_reference];
        if sets.iter().any(Option::is_some) {
            data.provided = data.provided
                | asked.intersection(
                    Needs::BLOCK_TOKENS
                        | Needs::BLOCK_GRAMS
                        | Needs::FIXED_BATCH
                        | Needs::REFERENCE,
                );
        } else {
            // Asked without a reduction: nothing to hand over but the bits.
            data.provided =
                data.provided | asked.intersection(Needs::FIXED_BATCH | Needs::REFERENCE);
        }
        let [batch, batch_reference, probe, probe_reference] = sets;
        data.batch = batch.unwrap_or_default();
        data.batch_reference = batch_reference.unwrap_or_default();
        data.probe = probe.unwrap_or_default();
        data.probe_reference = probe_reference.unwrap_or_default();
        data.reference_step = reference_step;
        if let Some(w) = m.sampled_weights {
            if m.samples_per_block == 0 || w.len() != layers * m.samples_per_block {
                return Err(PyValueError::new_err(format!(
                    "sampled_weights: {} values for {layers} blocks of {} samples",
                    w.len(),
                    m.samples_per_block
                )));
            }
            data.provided = data.provided | Needs::SAMPLED_WEIGHTS;
            data.sampled_weights = w;
            data.samples_per_block = m.samples_per_block;
        }
        if let (Some(l1), Some(l2)) = (m.acc_grad_l1, m.acc_grad_l2) {
            if l1.len() != layers || l2.len() != layers {
                return Err(PyValueError::new_err(format!(
                    "acc_grad_l1/acc_grad_l2: {} and {} values for {layers} blocks",
                    l1.len(),
                    l2.len()
                )));
            }
            data.provided = data.provided | Needs::ACC_GRAD_NORMS;
            data.acc_grad_l1 = l1;
            data.acc_grad_l2 = l2;
            data.acc_grad_steps = m.acc_grad_steps;
        }
        let missing = asked.difference(data.provided);
        let computable = Needs::SAMPLED_WEIGHTS | Needs::ACC_GRAD_NORMS;
        if !missing.intersection(computable).is_empty() {
            let args: Vec<&str> = missing
                .intersection(computable)
                .names()
                .iter()
                .map(|n| match n.as_str() {
                    "SAMPLED_WEIGHTS" => "sampled_weights",
                    _ => "acc_grad_l1 and acc_grad_l2",
                })
                .collect();
            return Err(PyValueError::new_err(format!(
                "policy `{}` asked at the previous step to observe {} at this step; pass {} to \
                 observe() (simfreeze.torch.FreezeController computes them)",
                self.name(),
                missing.intersection(computable).names().join(", "),
                args.join(" and ")
            )));
        }
        Ok(data)
    }

    fn name(&self) -> String {
        self.driver
            .policy()
            .map_or_else(|| "none".into(), |p| p.meta.name.clone())
    }

    fn needs_bits(&self) -> Needs {
        self.driver.needs()
    }
}

#[pymethods]
impl Policy {
    /// Loads `plugin` (a name looked up on `search_path`, or a path to a
    /// `.so`) and creates its policy with `options` (RON) for a model of
    /// `layers` blocks.
    #[new]
    #[pyo3(signature = (plugin, options = "", layers = 12, search_path = Vec::new()))]
    fn new(plugin: &str, options: &str, layers: u32, search_path: Vec<PathBuf>) -> PyResult<Self> {
        if layers == 0 {
            return Err(PyValueError::new_err("a model has at least one block"));
        }
        let search = SearchPath { dirs: search_path };
        let loaded = search.load(plugin).map_err(load_error)?;
        let policy = loaded.new_policy(options).map_err(load_error)?;
        Ok(Policy {
            driver: PolicyDriver::new(Some(policy), layers),
            plugin: loaded,
            options: options.to_string(),
            layers,
            reference_step: None,
        })
    }

    /// Drives a fresh policy of the same plugin and options through the
    /// synthetic world of `simfreeze simulate` (`steps` steps of
    /// `steps_per_epoch`) and returns the first step whose decision set a
    /// learning-rate factor other than 1, or None: whether the run needs
    /// per-block optimizer groups, known before it starts (exactly for
    /// schedules such as FreezeOut's; for a policy that reacts to its
    /// observations, as far as the synthetic ones tell).
    fn rehearse_lr_factors(&self, steps: u64, steps_per_epoch: u64) -> PyResult<Option<u64>> {
        let policy = self.plugin.new_policy(&self.options).map_err(load_error)?;
        let cfg = SimConfig {
            layers: self.layers,
            steps: steps.max(1),
            steps_per_epoch: steps_per_epoch.max(1),
            ..SimConfig::default()
        };
        let mut driver = PolicyDriver::new(Some(policy), self.layers);
        let mut world = SyntheticWorld::new(&cfg);
        for step in 0..cfg.steps {
            world.drive(&mut driver, step).map_err(driver_error)?;
            if driver.state().lr_factors.iter().any(|f| *f != 1.0) {
                return Ok(Some(step));
            }
        }
        Ok(None)
    }

    /// The plugin's name.
    #[getter(name)]
    fn py_name(&self) -> String {
        self.name()
    }

    /// A dict of the plugin's description: name, version, description,
    /// path, contract, abi_version, options (name, default, doc).
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let Some(p) = self.driver.policy() {
            d.set_item("name", &p.meta.name)?;
            d.set_item("version", &p.meta.version)?;
            d.set_item("description", &p.meta.description)?;
            d.set_item("path", p.path.display().to_string())?;
            d.set_item("options_given", &p.options)?;
            d.set_item("contract", p.meta.contract)?;
            d.set_item("abi_version", &p.meta.abi_version)?;
            let options: Vec<(String, String, String)> = p
                .meta
                .options
                .iter()
                .map(|o| (o.name.clone(), o.default.clone(), o.doc.clone()))
                .collect();
            d.set_item("options", options)?;
        }
        Ok(d)
    }

    /// Number of blocks.
    #[getter]
    fn layers(&self) -> u32 {
        self.layers
    }

    /// What the policy declared it needs, by name (`CLS_FEATURES`,
    /// `LABELS`, `GRAD_NORMS`, and the on-demand bits of contract 2).
    #[getter]
    fn needs(&self) -> Vec<String> {
        self.needs_bits().names()
    }

    /// The on-demand observations the next step must carry (asked for by
    /// the last decision).
    #[getter]
    fn observe_next(&self) -> Vec<String> {
        self.driver.state().observe().names()
    }

    /// Blocks `[0, frontier)` are frozen for good.
    #[getter]
    fn frontier(&self) -> u32 {
        self.driver.state().frontier
    }

    /// The block frozen for the next step only, if any (the frontier block).
    #[getter]
    fn probe(&self) -> Option<u32> {
        self.driver.state().probe
    }

    /// Blocks frozen during the next step, the probe included.
    #[getter]
    fn frozen(&self) -> u32 {
        self.driver.state().frozen_prefix()
    }

    /// Learning-rate factor per block for the next step.
    #[getter]
    fn lr_factors(&self) -> Vec<f32> {
        self.driver.state().lr_factors.clone()
    }

    /// The freeze timeline so far, as JSON (steps, freeze step per block,
    /// probe steps, scalars, compute-model cost).
    fn timeline_json(&self) -> PyResult<String> {
        serde_json::to_string(self.driver.timeline())
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Hands the policy the step that just ran and applies its checked
    /// decision. Arrays come as little-endian bytes: `features` float32
    /// `batch × feature_dim`, `labels` int64 `batch`, `grad_norms`
    /// float32 one per block, `sampled_weights` float32 `layers ×
    /// samples_per_block`. Returns a dict: frontier, probe, frozen,
    /// lr_factors, observe (names for the next step), reference,
    /// committed (blocks frozen for good by this decision), scalars.
    #[pyo3(signature = (
        *, step, epoch, steps_per_epoch, total_steps, loss, batch,
        features = None, feature_dim = 0, labels = None, num_classes = 0,
        grad_norms = None, lr = None,
        sampled_weights = None, samples_per_block = 0,
        acc_grad_l1 = None, acc_grad_l2 = None, acc_grad_steps = 0,
        blocks = None, reference_step = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn observe<'py>(
        &mut self,
        py: Python<'py>,
        step: u64,
        epoch: u64,
        steps_per_epoch: u64,
        total_steps: u64,
        loss: f32,
        batch: usize,
        features: Option<Bound<'py, PyBytes>>,
        feature_dim: usize,
        labels: Option<Bound<'py, PyBytes>>,
        num_classes: usize,
        grad_norms: Option<Bound<'py, PyBytes>>,
        lr: Option<f64>,
        sampled_weights: Option<Bound<'py, PyBytes>>,
        samples_per_block: usize,
        acc_grad_l1: Option<Vec<f64>>,
        acc_grad_l2: Option<Vec<f64>>,
        acc_grad_steps: u64,
        blocks: Option<Bound<'py, PyDict>>,
        reference_step: Option<u64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let needs = self.needs_bits();
        let name = self.name();
        let missing = |what: &str, arg: &str| {
            PyValueError::new_err(format!(
                "policy `{name}` needs {what}: pass {arg} to observe()"
            ))
        };
        let features = match features {
            Some(b) => f32s("features", b.as_bytes())?,
            None if needs.contains(Needs::CLS_FEATURES) => {
                return Err(missing("CLS_FEATURES", "features"))
            }
            None => Vec::new(),
        };
        if !features.is_empty() && features.len() != batch * feature_dim {
            return Err(PyValueError::new_err(format!(
                "features: {} values for a batch of {batch} x feature_dim {feature_dim}",
                features.len()
            )));
        }
        let labels = match labels {
            Some(b) => i64s("labels", b.as_bytes())?,
            None if needs.contains(Needs::LABELS) => return Err(missing("LABELS", "labels")),
            None => Vec::new(),
        };
        if !labels.is_empty() && labels.len() != batch {
            return Err(PyValueError::new_err(format!(
                "labels: {} for a batch of {batch}",
                labels.len()
            )));
        }
        if needs.contains(Needs::LABELS) && num_classes == 0 {
            return Err(missing("LABELS", "num_classes"));
        }
        let grad_norms = match grad_norms {
            Some(b) => f32s("grad_norms", b.as_bytes())?,
            None if needs.contains(Needs::GRAD_NORMS) => {
                return Err(missing("GRAD_NORMS", "grad_norms"))
            }
            None => Vec::new(),
        };
        if !grad_norms.is_empty() && grad_norms.len() != self.layers as usize {
            return Err(PyValueError::new_err(format!(
                "grad_norms: {} values for {} blocks",
                grad_norms.len(),
                self.layers
            )));
        }
        let sampled_weights = sampled_weights
            .map(|b| f32s("sampled_weights", b.as_bytes()))
            .transpose()?;
        let blocks = match blocks {
            Some(d) => blocks::blocks_in(&d)?,
            None => Vec::new(),
        };
        let more = self.more(More {
            blocks,
            reference_step,
            sampled_weights,
            samples_per_block,
            acc_grad_l1,
            acc_grad_l2,
            acc_grad_steps,
        })?;
        let outcome = self
            .driver
            .after_step(&StepInput {
                step,
                epoch,
                steps_per_epoch,
                total_steps,
                loss,
                batch,
                features: &features,
                feature_dim,
                labels: &labels,
                num_classes,
                grad_norms: &grad_norms,
                lr,
                more: if more.provided.is_empty() {
                    ObservationV2::EMPTY
                } else {
                    more.view()
                },
            })
            .map_err(driver_error)?;
        if outcome.reference() != ReferenceRequest::Keep {
            self.reference_step = Some(step);
        }
        let state = self.driver.state();
        let d = PyDict::new(py);
        d.set_item("step", step)?;
        d.set_item("frontier", state.frontier)?;
        d.set_item("probe", state.probe)?;
        d.set_item("frozen", state.frozen_prefix())?;
        d.set_item("lr_factors", state.lr_factors.clone())?;
        d.set_item("observe", state.observe().names())?;
        d.set_item("reference", reference_name(outcome.reference()))?;
        d.set_item("committed", outcome.change.committed.collect::<Vec<u32>>())?;
        let scalars = PyDict::new(py);
        for (k, v) in &outcome.scalars {
            scalars.set_item(k, v)?;
        }
        d.set_item("scalars", scalars)?;
        Ok(d)
    }

    /// Everything needed to continue after `step` in a new process: the
    /// policy's own state (bytes), the freeze state and the timeline (JSON).
    fn state_dict<'py>(&self, py: Python<'py>, step: u64) -> PyResult<Bound<'py, PyDict>> {
        let policy_state = match self.driver.policy() {
            Some(p) => p.save_state(step).map_err(call_error)?,
            None => Vec::new(),
        };
        let json = |e: serde_json::Error| PyRuntimeError::new_err(e.to_string());
        let d = PyDict::new(py);
        d.set_item("plugin", self.name())?;
        d.set_item("layers", self.layers)?;
        d.set_item("step", step)?;
        d.set_item("policy_state", PyBytes::new(py, &policy_state))?;
        d.set_item("reference_step", self.reference_step)?;
        d.set_item(
            "freeze_state",
            serde_json::to_string(self.driver.state()).map_err(json)?,
        )?;
        d.set_item(
            "timeline",
            serde_json::to_string(self.driver.timeline()).map_err(json)?,
        )?;
        Ok(d)
    }

    /// Restores what `state_dict` returned (same plugin, same number of
    /// blocks).
    fn load_state_dict(&mut self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        fn item<'py>(state: &Bound<'py, PyDict>, key: &str) -> PyResult<Bound<'py, PyAny>> {
            state
                .get_item(key)?
                .ok_or_else(|| PyValueError::new_err(format!("state dict without `{key}`")))
        }
        let get = |key: &str| item(state, key);
        let plugin: String = get("plugin")?.extract()?;
        let layers: u32 = get("layers")?.extract()?;
        if plugin != self.name() || layers != self.layers {
            return Err(PyValueError::new_err(format!(
                "state of policy `{plugin}` on {layers} blocks, but this is `{}` on {} blocks",
                self.name(),
                self.layers
            )));
        }
        let step: u64 = get("step")?.extract()?;
        let policy_state = get("policy_state")?;
        let policy_state = policy_state
            .cast::<PyBytes>()
            .map_err(|_| PyValueError::new_err("state dict: `policy_state` is not bytes"))?
            .as_bytes()
            .to_vec();
        let bad = |what: &str, e: serde_json::Error| {
            PyValueError::new_err(format!("state dict: unreadable {what}: {e}"))
        };
        let freeze: FreezeState = serde_json::from_str(&get("freeze_state")?.extract::<String>()?)
            .map_err(|e| bad("freeze_state", e))?;
        let timeline: Timeline = serde_json::from_str(&get("timeline")?.extract::<String>()?)
            .map_err(|e| bad("timeline", e))?;
        if freeze.layers != self.layers || freeze.lr_factors.len() != self.layers as usize {
            return Err(PyValueError::new_err(
                "state dict: its freeze state does not match the number of blocks",
            ));
        }
        if let Some(p) = self.driver.policy_mut() {
            p.load_state(step, &policy_state).map_err(call_error)?;
        }
        self.driver.restore_state(freeze);
        self.driver.restore_timeline(timeline);
        // State dicts written before the reference was tracked have none.
        self.reference_step = match state.get_item("reference_step")? {
            Some(v) => v.extract()?,
            None => None,
        };
        Ok(())
    }

    fn __repr__(&self) -> String {
        let state = self.driver.state();
        format!(
            "Policy({:?}, layers={}, frontier={}, probe={:?})",
            self.name(),
            self.layers,
            state.frontier,
            state.probe
        )
    }
}

/// Every plugin on `search_path`, as dicts (name, kind, version,
/// description, path, contract), and the load errors of the files that
/// are plugins but could not be loaded, as strings.
#[pyfunction]
fn discover(
    py: Python<'_>,
    search_path: Vec<PathBuf>,
) -> PyResult<(Vec<Bound<'_, PyDict>>, Vec<String>)> {
    let (plugins, errors) = SearchPath { dirs: search_path }.discover();
    let mut out = Vec::new();
    for p in plugins {
        let d = PyDict::new(py);
        d.set_item("name", &p.meta.name)?;
        d.set_item("kind", p.meta.kind)?;
        d.set_item("version", &p.meta.version)?;
        d.set_item("description", &p.meta.description)?;
        d.set_item("path", p.path.display().to_string())?;
        d.set_item("contract", p.meta.contract)?;
        out.push(d);
    }
    Ok((out, errors.into_iter().map(|e| e.to_string()).collect()))
}

/// The observation names a policy may declare, in bit order.
#[pyfunction]
fn observation_names() -> Vec<String> {
    Needs::ALL.names()
}

/// Block `block`'s `n` sampled-weight positions (sorted) among its
/// `total` weights, drawn from the run's `seed`: the trainer's own
/// (`SAMPLED_WEIGHTS`).
#[pyfunction]
fn sample_positions(total: usize, seed: u64, block: usize, n: usize) -> Vec<usize> {
    simfreeze_runtime::more::sample_positions(total, seed, block, n)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Policy>()?;
    m.add_function(wrap_pyfunction!(discover, m)?)?;
    m.add_function(wrap_pyfunction!(observation_names, m)?)?;
    m.add_function(wrap_pyfunction!(sample_positions, m)?)?;
    m.add("PolicyError", py.get_type::<PolicyError>())?;
    m.add("PluginLoadError", py.get_type::<PluginLoadError>())?;
    m.add("ContractViolation", py.get_type::<ContractViolation>())?;
    m.add("PolicyFailed", py.get_type::<PolicyFailed>())?;
    m.add("PolicyPanicked", py.get_type::<PolicyPanicked>())?;
    m.add("ABI_VERSION", simfreeze_abi::ABI_VERSION)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! The on-demand observations of contract 2, computed on the device only
//! at the steps a policy asked for them (`FreezeState::observe`): per-block
//! tokens and row-normalised Gram matrices of the step's batch and of a
//! fixed probe batch, through the model and through a reference snapshot;
//! sampled weights; and the norms of the gradients summed since the last
//! read (the one observation that costs every step once declared: an add
//! per trainable parameter).
//!
//! Invariant: a policy that declares none of the on-demand bits gets no
//! [`Observer`] at all, so its run does exactly what it did before contract
//! 2. Everything the observer keeps (the reference, the gradient sums in
//! the optimizer) is saved with the checkpoint, so a resumed run observes
//! what the uninterrupted one did.

use anyhow::{bail, Result};
use simfreeze_abi::ffi::{Needs, ReferenceRequest};
use simfreeze_runtime::more::{BlocksData, MoreData};
use simfreeze_runtime::rng::Rng;
use tch::{nn, Device, Kind, Tensor};

use crate::engine::Engine;
use crate::model::precision::Precision;
use crate::model::{Group, PrefixModel, Vit, VitConfig};

/// Weights sampled per block.
pub const SAMPLES_PER_BLOCK: usize = 64;

/// Checkpoint names of the reference's tensors: `observer.reference/<name>`.
pub const REFERENCE_PREFIX: &str = "observer.reference/";

/// What the checkpoint's JSON keeps of the observer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ObserverMeta {
    /// The step after which the reference was taken, and how it is kept.
    pub reference: Option<(u64, String)>,
}

/// The reference snapshot: a second model of the same shape.
struct Reference {
    vs: nn::VarStore,
    model: Vit,
    kind: ReferenceRequest,
    step: u64,
}

/// Computes the on-demand observations a policy asks for.
pub struct Observer {
    declared: Needs,
    cfg: VitConfig,
    device: Device,
    /// The probe batch's images, on the device.
    probe: Option<Tensor>,
    /// Per block, `(parameter, flat indices)` of the sampled weights.
    samples: Vec<Vec<(String, Tensor)>>,
    reference: Option<Reference>,
}

impl Observer {
    /// An observer for a policy that declared `declared`, or `None` when it
    /// declared no on-demand bit. `probe` are the probe batch's images
    /// (host memory); `vars` the model's parameters by name.
    pub fn new(
        declared: Needs,
        cfg: &VitConfig,
        model: &dyn PrefixModel,
        vars: &[(String, Tensor)],
        device: Device,
        probe: Option<Tensor>,
        seed: u64,
    ) -> Option<Observer> {
        if declared.intersection(Needs::ON_DEMAND).is_empty() {
            return None;
        }
        let samples = sample_indices(model, vars, seed);
        Some(Observer {
            declared,
            cfg: cfg.clone(),
            device,
            probe: probe.map(|p| p.to_device(device)),
            samples,
            reference: None,
        })
    }

    /// Whether the step's gradients must be summed.
    pub fn accumulates(&self) -> bool {
        self.declared.contains(Needs::ACC_GRAD_NORMS)
    }

    /// Whether `asked` needs the step's own images (so the activation cache
    /// is bypassed for that step).
    pub fn needs_images(asked: Needs) -> bool {
        !asked
            .intersection(Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS)
            .is_empty()
    }

    /// The observations `asked` for that exist before the step's update:
    /// the reductions of `batch` (the step's images, `None` when it came
    /// from the activation cache) and of the probe batch, through the model
    /// and the reference, and the sampled weights.
    pub fn before_step(
        &self,
        engine: &dyn Engine,
        batch: Option<&Tensor>,
        asked: Needs,
    ) -> Result<MoreData> {
        let asked = asked.intersection(self.declared);
        let mut more = MoreData {
            provided: asked,
            reference_step: self.reference.as_ref().map(|r| r.step),
            ..MoreData::default()
        };
        let what = asked.intersection(Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS);
        if !what.is_empty() {
            let Some(x) = batch else {
                bail!("the batch's block observations need the step's images")
            };
            // Every rank observes the global batch.
            let x = engine.gather_rows(x)?.to_device(self.device);
            more.batch = reduce(engine.model(), &x, what);
            let reference = self
                .reference
                .as_ref()
                .filter(|_| asked.contains(Needs::REFERENCE));
            if let Some(r) = reference {
                more.batch_reference = reduce(&r.model, &r.input(&x), what);
            }
            if let (Some(p), true) = (&self.probe, asked.contains(Needs::PROBE_BATCH)) {
                more.probe = reduce(engine.model(), p, what);
                if let Some(r) = reference {
                    more.probe_reference = reduce(&r.model, &r.input(p), what);
                }
            }
        }
        if asked.contains(Needs::SAMPLED_WEIGHTS) {
            more.sampled_weights = self.sampled_weights(engine)?;
            more.samples_per_block = SAMPLES_PER_BLOCK;
        }
        Ok(more)
    }

    /// Completes `more` after the step: the accumulated gradient norms
    /// (this step's gradients included), blocks `[0, frontier)` reading 0.
    pub fn after_step(&self, engine: &mut dyn Engine, more: &mut MoreData, frontier: usize) {
        if more.provided.contains(Needs::ACC_GRAD_NORMS) {
            let (l1, l2, steps) = engine.read_grad_sums(frontier);
            (more.acc_grad_l1, more.acc_grad_l2, more.acc_grad_steps) = (l1, l2, steps);
        }
    }

    /// Takes (or replaces) the reference from the engine's weights after
    /// `step`, kept as `kind` asks.
    pub fn take_reference(
        &mut self,
        engine: &dyn Engine,
        kind: ReferenceRequest,
        step: u64,
    ) -> Result<()> {
        if kind == ReferenceRequest::Keep {
            return Ok(());
        }
        let vars: Vec<(String, Tensor)> = engine
            .state_tensors()
            .into_iter()
            .filter(|(n, _)| !n.contains('/'))
            .collect();
        let r = Reference::new(&self.cfg, self.device, kind, step);
        tch::no_grad(|| {
            let mut dst = r.vs.variables();
            for (name, t) in &vars {
                if let Some(d) = dst.get_mut(name) {
                    d.copy_(&quantize(t, kind));
                }
            }
        });
        self.reference = Some(r);
        Ok(())
    }

    /// The checkpoint's part: JSON and tensors.
    pub fn state(&self) -> (ObserverMeta, Vec<(String, Tensor)>) {
        let Some(r) = &self.reference else {
            return (ObserverMeta { reference: None }, Vec::new());
        };
        let tensors =
            r.vs.variables()
                .into_iter()
                .map(|(n, t)| (format!("{REFERENCE_PREFIX}{n}"), t))
                .collect();
        let kind = format!("{:?}", r.kind);
        let meta = ObserverMeta {
            reference: Some((r.step, kind)),
        };
        (meta, tensors)
    }

    /// Restores [`Observer::state`].
    pub fn restore(&mut self, meta: &ObserverMeta, tensors: Vec<(String, Tensor)>) -> Result<()> {
        let Some((step, kind)) = &meta.reference else {
            self.reference = None;
            return Ok(());
        };
        let kind = match kind.as_str() {
            "TakeF32" => ReferenceRequest::TakeF32,
            "TakeBf16" => ReferenceRequest::TakeBf16,
            "TakeInt8" => ReferenceRequest::TakeInt8,
            other => bail!("unknown reference kind {other} in the checkpoint"),
        };
        let r = Reference::new(&self.cfg, self.device, kind, *step);
        let mut dst = r.vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in tensors {
                let Some(n) = name.strip_prefix(REFERENCE_PREFIX) else {
                    continue;
                };
                match dst.remove(n) {
                    Some(mut d) => {
                        d.copy_(&t);
                    }
                    None => bail!("the checkpoint's reference has an unknown tensor {n}"),
                }
            }
            Ok(())
        })?;
        if let Some(missing) = dst.keys().next() {
            bail!("the checkpoint's reference lacks {missing}");
        }
        self.reference = Some(r);
        Ok(())
    }

    fn sampled_weights(&self, engine: &dyn Engine) -> Result<Vec<f32>> {
        let vars: std::collections::HashMap<String, Tensor> =
            engine.state_tensors().into_iter().collect();
        let mut parts = Vec::new();
        for block in &self.samples {
            for (name, idx) in block {
                let Some(v) = vars.get(name) else {
                    bail!("no parameter {name} to sample")
                };
                let idx = idx.to_device(v.device());
                parts.push(v.detach().flatten(0, -1).index_select(0, &idx));
            }
        }
        if parts.is_empty() {
            return Ok(Vec::new());
        }
        let all = Tensor::cat(&parts, 0)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        Ok(Vec::try_from(all)?)
    }
}

impl Reference {
    fn new(cfg: &VitConfig, device: Device, kind: ReferenceRequest, step: u64) -> Self {
        let mut vs = nn::VarStore::new(device);
        let model = Vit::build(&vs, cfg, Precision::F32);
        if kind != ReferenceRequest::TakeF32 {
            vs.bfloat16();
        }
        vs.freeze();
        Reference {
            vs,
            model,
            kind,
            step,
        }
    }

    /// The images in the reference's dtype.
    fn input(&self, x: &Tensor) -> Tensor {
        match self.kind {
            ReferenceRequest::TakeF32 | ReferenceRequest::Keep => x.shallow_clone(),
            _ => x.to_kind(Kind::BFloat16),
        }
    }
}

/// `t` as the reference keeps it: int8 per output row (symmetric, scale
/// `max |row| / 127`) for weight matrices under `TakeInt8`, else itself
/// (the bf16 store rounds it).
fn quantize(t: &Tensor, kind: ReferenceRequest) -> Tensor {
    if kind != ReferenceRequest::TakeInt8 || t.dim() < 2 {
        return t.shallow_clone();
    }
    let rows = t.size()[0];
    let flat = t.to_kind(Kind::Float).reshape([rows, -1]);
    let scale = flat.abs().amax([1].as_slice(), true).clamp_min(1e-12) / 127.0;
    let q = (&flat / &scale)
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    (q.to_kind(Kind::Float) * scale).reshape(t.size().as_slice())
}

/// Per-block reductions of images `x` through `model`, in host memory.
pub fn reduce(model: &dyn PrefixModel, x: &Tensor, what: Needs) -> BlocksData {
    let (mut tokens, mut grams) = (Vec::new(), Vec::new());
    let rows = x.size()[0];
    model.walk_blocks(x, &mut |_, h| {
        let h = h.to_kind(Kind::Float);
        if what.contains(Needs::BLOCK_TOKENS) {
            tokens.push(model.block_token(&h));
        }
        if what.contains(Needs::BLOCK_GRAMS) {
            grams.push(row_normalised_gram(&h));
        }
    });
    let host = |v: Vec<Tensor>| -> Vec<f32> {
        if v.is_empty() {
            return Vec::new();
        }
        let all = Tensor::stack(&v, 0).to_device(Device::Cpu).flatten(0, -1);
        Vec::try_from(all).unwrap_or_default()
    };
    BlocksData {
        first: 0,
        blocks: model.depth(),
        rows: rows as usize,
        dim: model.feature_dim() as usize,
        tokens: host(tokens),
        grams: host(grams),
    }
}

/// `G = A Aᵀ` of the flattened block output `A` (`[B, T·D]`), each row
/// divided by its L2 norm (a zero row stays zero): Tung & Mori's similarity
/// matrix.
pub fn row_normalised_gram(h: &Tensor) -> Tensor {
    let a = h.flatten(1, -1);
    let g = a.matmul(&a.tr());
    let norm = g
        .square()
        .sum_dim_intlist([1].as_slice(), true, Kind::Float)
        .sqrt();
    let safe = norm.where_scalarother(&norm.gt(0.0), 1.0);
    g / safe
}

/// Per block, `SAMPLES_PER_BLOCK` positions among its parameters (sorted
/// by name), drawn once from `seed`: the same every time in a run.
fn sample_indices(
    model: &dyn PrefixModel,
    vars: &[(String, Tensor)],
    seed: u64,
) -> Vec<Vec<(String, Tensor)>> {
    let mut sorted: Vec<&(String, Tensor)> =
        vars.iter().filter(|(n, _)| !n.contains('/')).collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    (0..model.depth())
        .map(|block| {
            let params: Vec<(&String, i64)> = sorted
                .iter()
                .filter(|(n, _)| model.group_of(n) == Group::Block(block))
                .map(|(n, t)| (n, t.numel() as i64))
                .collect();
            let total: i64 = params.iter().map(|p| p.1).sum();
            let mut rng = Rng::new(seed ^ (0x5a3d_u64 << 16) ^ block as u64);
            let mut picks: Vec<i64> = (0..SAMPLES_PER_BLOCK)
                .map(|_| rng.below(total.max(1) as usize) as i64)
                .collect();
            picks.sort_unstable();
            let mut out: Vec<(String, Tensor)> = Vec::new();
            let mut start = 0;
            for (name, n) in params {
                let mine: Vec<i64> = picks
                    .iter()
                    .filter(|&&p| p >= start && p < start + n)
                    .map(|p| p - start)
                    .collect();
                if !mine.is_empty() {
                    out.push((name.clone(), Tensor::from_slice(&mine)));
                }
                start += n;
            }
            out
        })
        .collect()
}

//! The on-demand observations of contract 2, computed on the device only
//! at the steps a policy asked for them (`FreezeState::observe`): per-block
//! tokens and row-normalised Gram matrices of the step's batch and of a
//! fixed batch, through the model and through a reference snapshot;
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
use simfreeze_runtime::more::{sample_positions, BlocksData, MoreData};
use tch::{Device, Kind, Tensor};

use super::reference::Reference;
use crate::engine::{Batch, Engine};
use crate::model::{Group, PrefixModel, VitConfig};

/// Weights sampled per block.
pub const SAMPLES_PER_BLOCK: usize = 64;

/// Checkpoint names of everything the observer keeps start with this.
pub const CHECKPOINT_PREFIX: &str = "observer.";
/// The reference's tensors: `observer.reference/<name>`.
const KEPT_PREFIX: &str = "observer.reference/";
/// An int8 reference's row scales: `observer.scale/<name>`.
const SCALE_PREFIX: &str = "observer.scale/";

/// What the checkpoint's JSON keeps of the observer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ObserverMeta {
    /// The step after which the reference was taken, and how it is kept.
    pub reference: Option<(u64, String)>,
}

/// The compute model's price of what the observer computes, in the
/// model's units: one unit is one block's forward of the step's (global)
/// training batch, as [`simfreeze_runtime::driver::Timeline`] counts a
/// step (3 units a block: forward 1, backward 2). FLOPs are counted as
/// multiply-adds × 2 of the block's matrix products (QKV, attention,
/// projection, MLP); a forward of `r` rows through the `L` blocks is
/// `L · r / B` units.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservationCost {
    /// FLOPs of one block's forward of one image.
    block_flops: f64,
    /// Tokens per image T and their width D.
    tokens: f64,
    dim: f64,
    /// Blocks L.
    depth: f64,
    /// Parameters per block (the embedding counted with block 0).
    block_params: Vec<f64>,
}

impl ObservationCost {
    /// The prices for `cfg`, with its blocks' parameter counts.
    pub fn new(cfg: &VitConfig, block_params: Vec<f64>) -> ObservationCost {
        let (t, d) = (cfg.tokens() as f64, cfg.dim as f64);
        // QKV 6TD², projection 2TD², QKᵀ and AV 4T²D, MLP 4rTD².
        let block_flops = (8.0 + 4.0 * cfg.mlp_ratio) * t * d * d + 4.0 * t * t * d;
        ObservationCost {
            block_flops,
            tokens: t,
            dim: d,
            depth: cfg.depth as f64,
            block_params,
        }
    }

    /// FLOPs of one unit for a training batch of `batch` images.
    fn unit(&self, batch: f64) -> f64 {
        (self.block_flops * batch).max(1.0)
    }

    /// The units of the reductions `what` of `rows` images through every
    /// block (the forward, the pooled tokens, the Gram matrices).
    pub fn reductions(&self, what: Needs, rows: f64, batch: f64) -> f64 {
        if what
            .intersection(Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS)
            .is_empty()
        {
            return 0.0;
        }
        let (t, d) = (self.tokens, self.dim);
        let mut per_block = self.block_flops * rows;
        if what.contains(Needs::BLOCK_TOKENS) {
            per_block += rows * t * d;
        }
        if what.contains(Needs::BLOCK_GRAMS) {
            // A Aᵀ of [rows, T·D], then the rows' norms.
            per_block += 2.0 * rows * rows * t * d + 3.0 * rows * rows;
        }
        self.depth * per_block / self.unit(batch)
    }

    /// The units of one step's observation `asked` (within what was
    /// declared), for a training batch of `batch` images, `probe_rows`
    /// images in the fixed batch, with a reference (`reference`) or not;
    /// the gradient sums' adds over the trainable blocks `[frozen, L)` when
    /// `accumulating`.
    pub fn step(
        &self,
        asked: Needs,
        (batch, probe_rows): (f64, f64),
        reference: bool,
        accumulating: Option<usize>,
    ) -> f64 {
        let what = asked.intersection(Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS);
        let mut units = self.reductions(what, batch, batch);
        let probe = asked.contains(Needs::FIXED_BATCH);
        if probe {
            units += self.reductions(what, probe_rows, batch);
        }
        if reference && asked.contains(Needs::REFERENCE) {
            units += self.reductions(what, batch, batch);
            if probe {
                units += self.reductions(what, probe_rows, batch);
            }
        }
        if asked.contains(Needs::SAMPLED_WEIGHTS) {
            units += SAMPLES_PER_BLOCK as f64 * self.depth / self.unit(batch);
        }
        if let Some(frozen) = accumulating {
            let trainable: f64 = self.block_params.iter().skip(frozen).sum();
            // One add per trainable parameter every step; the two norms
            // (3 FLOPs a parameter) only when read.
            let read = if asked.contains(Needs::ACC_GRAD_NORMS) {
                3.0
            } else {
                0.0
            };
            units += (1.0 + read) * trainable / self.unit(batch);
        }
        units
    }

    /// The units of taking a reference snapshot of every parameter (a copy
    /// each; the int8 form quantizes the matrices: about 4 FLOPs each).
    pub fn snapshot(&self, kind: ReferenceRequest, batch: f64) -> f64 {
        let params: f64 = self.block_params.iter().sum();
        let per = match kind {
            ReferenceRequest::Keep => return 0.0,
            ReferenceRequest::TakeF32 | ReferenceRequest::TakeBf16 => 1.0,
            ReferenceRequest::TakeInt8 => 4.0,
        };
        per * params / self.unit(batch)
    }
}

/// Computes the on-demand observations a policy asks for.
pub struct Observer {
    declared: Needs,
    /// What each observation costs in the compute model.
    pub cost: ObservationCost,
    /// Images in the fixed batch (0 without one).
    probe_rows: f64,
    cfg: VitConfig,
    device: Device,
    /// The fixed batch's images, on the device.
    probe: Option<Tensor>,
    /// Per block, `(parameter, flat indices)` of the sampled weights.
    samples: Vec<Vec<(String, Tensor)>>,
    reference: Option<Reference>,
}

impl Observer {
    /// An observer for a policy that declared `declared`, or `None` (and
    /// nothing computed) when it declared no on-demand bit. `probe` are the
    /// fixed batch's images (host memory); `vars` gives the model's
    /// parameters by name.
    pub fn new(
        declared: Needs,
        cfg: &VitConfig,
        model: &dyn PrefixModel,
        vars: impl FnOnce() -> Vec<(String, Tensor)>,
        device: Device,
        probe: Option<Tensor>,
        seed: u64,
    ) -> Option<Observer> {
        if declared.intersection(Needs::ON_DEMAND).is_empty() {
            return None;
        }
        let vars = vars();
        let samples = sample_indices(model, &vars, seed);
        let mut block_params = vec![0.0; model.depth()];
        for (name, t) in vars.iter().filter(|(n, _)| !n.contains('/')) {
            if let Group::Block(b) = model.group_of(name) {
                block_params[b] += t.numel() as f64;
            }
        }
        let probe_rows = probe.as_ref().map_or(0.0, |p| p.size()[0] as f64);
        Some(Observer {
            declared,
            cost: ObservationCost::new(cfg, block_params),
            probe_rows,
            cfg: cfg.clone(),
            device,
            probe: probe.map(|p| p.to_device(device)),
            samples,
            reference: None,
        })
    }

    /// The compute-model units of the observation `asked` at a step of a
    /// `batch`-image (global) training batch with `frozen` blocks frozen:
    /// what [`Observer::before_step`] and [`Observer::after_step`] compute
    /// for it, and the gradient sums' adds.
    pub fn step_cost(&self, asked: Needs, batch: f64, frozen: usize) -> f64 {
        let asked = asked.intersection(self.declared);
        self.cost.step(
            asked,
            (batch, self.probe_rows),
            self.reference.is_some(),
            self.accumulates().then_some(frozen),
        )
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
    /// the reductions of the step's `batch` (its images; the loop bypasses
    /// the activation cache for such a step) and of the fixed batch,
    /// through the model and the reference, and the sampled weights. Every
    /// step's observation says whether there is a reference, asked for or
    /// not; a step that asks for nothing costs nothing more.
    pub fn before_step(
        &self,
        engine: &dyn Engine,
        batch: &Batch,
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
            let Batch::Images(x) = batch else {
                bail!("the batch's block observations need the step's images")
            };
            // Every rank observes the global batch.
            let x = engine.gather_rows(x)?.to_device(self.device);
            more.batch = reduce(engine.model(), &x, what)?;
            let reference = self
                .reference
                .as_ref()
                .filter(|_| asked.contains(Needs::REFERENCE));
            let probe = self
                .probe
                .as_ref()
                .filter(|_| asked.contains(Needs::FIXED_BATCH));
            if let Some(p) = probe {
                more.probe = reduce(engine.model(), p, what)?;
            }
            if let Some(r) = reference {
                r.run(&self.cfg, self.device, |model, dtype| -> Result<()> {
                    more.batch_reference = reduce(model, &x.to_kind(dtype), what)?;
                    if let Some(p) = probe {
                        more.probe_reference = reduce(model, &p.to_kind(dtype), what)?;
                    }
                    Ok(())
                })?;
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
        self.reference = Some(Reference::take(&self.cfg, self.device, kind, step, &vars));
        Ok(())
    }

    /// The checkpoint's part: JSON and tensors.
    pub fn state(&self) -> (ObserverMeta, Vec<(String, Tensor)>) {
        let Some(r) = &self.reference else {
            return (ObserverMeta { reference: None }, Vec::new());
        };
        let named = |prefix: &str, v: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
            v.iter()
                .map(|(n, t)| (format!("{prefix}{n}"), t.shallow_clone()))
                .collect()
        };
        let mut tensors = named(KEPT_PREFIX, &r.kept);
        tensors.extend(named(SCALE_PREFIX, &r.scales));
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
        let (mut kept, mut scales) = (Vec::new(), Vec::new());
        for (name, t) in tensors {
            if let Some(n) = name.strip_prefix(KEPT_PREFIX) {
                kept.push((n.to_string(), t.to_device(self.device)));
            } else if let Some(n) = name.strip_prefix(SCALE_PREFIX) {
                scales.push((n.to_string(), t.to_device(self.device)));
            } else {
                bail!("the checkpoint has an unknown observer tensor {name}");
            }
        }
        let r = Reference::restore(&self.cfg, self.device, kind, *step, kept, scales)?;
        self.reference = Some(r);
        Ok(())
    }

    /// Bytes the reference keeps (0 without one).
    pub fn reference_bytes(&self) -> u64 {
        self.reference.as_ref().map_or(0, |r| {
            r.kept
                .iter()
                .chain(&r.scales)
                .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                .sum()
        })
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

/// Per-block reductions of images `x` through `model`, in host memory.
pub fn reduce(model: &dyn PrefixModel, x: &Tensor, what: Needs) -> Result<BlocksData> {
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
    let host = |v: Vec<Tensor>| -> Result<Vec<f32>> {
        if v.is_empty() {
            return Ok(Vec::new());
        }
        let all = Tensor::stack(&v, 0).to_device(Device::Cpu).flatten(0, -1);
        Ok(Vec::try_from(all)?)
    };
    Ok(BlocksData {
        first: 0,
        blocks: model.depth(),
        rows: rows as usize,
        dim: model.feature_dim() as usize,
        tokens: host(tokens)?,
        grams: host(grams)?,
    })
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
            let picks: Vec<i64> =
                sample_positions(total.max(0) as usize, seed, block, SAMPLES_PER_BLOCK)
                    .into_iter()
                    .map(|p| p as i64)
                    .collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Vit;
    use tch::nn;

    fn tiny() -> (nn::VarStore, Vit, VitConfig) {
        tch::manual_seed(5);
        let cfg = crate::model::test_config(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Vit::new(&vs.root(), &cfg);
        (vs, model, cfg)
    }

    #[test]
    fn an_int8_reference_keeps_int8_matrices_and_their_values_within_half_a_step() {
        let (vs, _, cfg) = tiny();
        let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        let r = Reference::take(&cfg, Device::Cpu, ReferenceRequest::TakeInt8, 3, &vars);
        assert!(r.model.is_none());
        let kept: std::collections::HashMap<&String, &Tensor> =
            r.kept.iter().map(|(n, t)| (n, t)).collect();
        for (name, t) in &vars {
            let want = if t.dim() >= 2 && name.ends_with(".weight") {
                Kind::Int8
            } else {
                Kind::BFloat16
            };
            assert_eq!(kept[name].kind(), want, "{name}");
        }
        let f32_bytes: i64 = vars.iter().map(|(_, t)| t.numel() as i64 * 4).sum();
        let bytes: u64 = r
            .kept
            .iter()
            .chain(&r.scales)
            .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        // (At this tiny shape the row scales and vectors weigh; ViT-B keeps about a quarter.)
        assert!(bytes * 2 < f32_bytes as u64, "{bytes} of {f32_bytes}");
        let (mvs, _) = r.materialize(&cfg, Device::Cpu).unwrap();
        let scales: std::collections::HashMap<&String, &Tensor> =
            r.scales.iter().map(|(n, t)| (n, t)).collect();
        for (name, m) in mvs.variables() {
            let orig = vars
                .iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
                .shallow_clone();
            let diff = (m.to_kind(Kind::Float) - &orig)
                .abs()
                .max()
                .double_value(&[]);
            let bound = match scales.get(&name) {
                // Half a quantization step, plus bf16 rounding of the result.
                Some(s) => {
                    s.max().double_value(&[]) * 0.5 + orig.abs().max().double_value(&[]) / 128.0
                }
                None => orig.abs().max().double_value(&[]) / 128.0,
            };
            assert!(diff <= bound, "{name}: {diff} > {bound}");
        }
    }

    #[test]
    fn a_reference_survives_its_checkpoint_tensors_bit_for_bit() {
        let (vs, model, cfg) = tiny();
        let x = Tensor::randn([3, 1, 8, 8], (Kind::Float, Device::Cpu));
        let vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        for kind in [
            ReferenceRequest::TakeF32,
            ReferenceRequest::TakeBf16,
            ReferenceRequest::TakeInt8,
        ] {
            let observer = || {
                Observer::new(
                    Needs::ALL,
                    &cfg,
                    &model,
                    || vs.variables().into_iter().collect(),
                    Device::Cpu,
                    None,
                    1,
                )
                .unwrap()
            };
            let mut a = observer();
            a.reference = Some(Reference::take(&cfg, Device::Cpu, kind, 7, &vars));
            let (meta, tensors) = a.state();
            assert!(tensors
                .iter()
                .all(|(n, _)| n.starts_with(CHECKPOINT_PREFIX)));
            let mut b = observer();
            b.restore(&meta, tensors).unwrap();
            assert_eq!(b.reference.as_ref().unwrap().step, 7);
            let what = Needs::BLOCK_TOKENS | Needs::BLOCK_GRAMS;
            let mut outs = Vec::new();
            for o in [&a, &b] {
                o.reference
                    .as_ref()
                    .unwrap()
                    .run(&cfg, Device::Cpu, |m, dtype| {
                        outs.push(reduce(m, &x.to_kind(dtype), what).unwrap());
                    });
            }
            assert_eq!(outs[0], outs[1], "{kind:?}");
        }
    }
}

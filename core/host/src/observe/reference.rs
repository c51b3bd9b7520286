//! The reference snapshot of contract 2 (`Needs::REFERENCE`): the weights
//! after the step a policy named, kept in float32, bfloat16, or int8 per
//! output row (layer weights) with the rest in bfloat16, and the model that
//! forwards through them. The [`super::observer::Observer`] takes, saves
//! and restores it.

use anyhow::{bail, Result};
use simfreeze_abi::ffi::ReferenceRequest;
use tch::{nn, Device, Kind, Tensor};

use crate::model::precision::Precision;
use crate::model::{Vit, VitConfig};

/// The reference snapshot.
pub(super) struct Reference {
    pub(super) kind: ReferenceRequest,
    pub(super) step: u64,
    /// What is kept, by parameter name: float32 or bfloat16 weights, or
    /// under `TakeInt8` the weight matrices as int8 (with `scales`) and the
    /// rest as bfloat16.
    pub(super) kept: Vec<(String, Tensor)>,
    /// `TakeInt8`: per weight matrix, its rows' scales (`[rows, 1]`).
    pub(super) scales: Vec<(String, Tensor)>,
    /// `TakeF32`/`TakeBf16`: the model whose variables are `kept`. An int8
    /// reference has none; a bf16 model is made from it for each step that
    /// observes it.
    pub(super) model: Option<(nn::VarStore, Vit)>,
}

impl Reference {
    /// The reference of the weights `vars`, kept as `kind` asks.
    pub(super) fn take(
        cfg: &VitConfig,
        device: Device,
        kind: ReferenceRequest,
        step: u64,
        vars: &[(String, Tensor)],
    ) -> Self {
        tch::no_grad(|| {
            if kind != ReferenceRequest::TakeInt8 {
                let kept = vars.iter().map(|(n, t)| (n.clone(), t.detach())).collect();
                // `restore` copies (and rounds to bf16) into a new model.
                return Self::restore(cfg, device, kind, step, kept, Vec::new())
                    .expect("a model's own variables fit a model of its shape");
            }
            let (mut kept, mut scales) = (Vec::new(), Vec::new());
            for (name, t) in vars {
                match quantize_rows(name, t) {
                    Some((q, scale)) => {
                        kept.push((name.clone(), q));
                        scales.push((name.clone(), scale));
                    }
                    None => kept.push((name.clone(), t.to_kind(Kind::BFloat16))),
                }
            }
            Reference {
                kind,
                step,
                kept,
                scales,
                model: None,
            }
        })
    }

    /// A reference from what [`Reference::take`] kept (a checkpoint's).
    pub(super) fn restore(
        cfg: &VitConfig,
        device: Device,
        kind: ReferenceRequest,
        step: u64,
        kept: Vec<(String, Tensor)>,
        scales: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let mut r = Reference {
            kind,
            step,
            kept,
            scales,
            model: None,
        };
        let names: std::collections::BTreeSet<&String> = r.kept.iter().map(|(n, _)| n).collect();
        let (vs, model) = r.materialize(cfg, device)?;
        if let Some(missing) = vs.variables().keys().find(|n| !names.contains(n)) {
            bail!("the checkpoint's reference lacks {missing}");
        }
        if kind != ReferenceRequest::TakeInt8 {
            r.kept = vs.variables().into_iter().collect();
            r.kept.sort_by(|a, b| a.0.cmp(&b.0));
            r.model = Some((vs, model));
        }
        Ok(r)
    }

    /// A model holding the reference's weights (dequantized for int8), in
    /// float32 for `TakeF32`, else bfloat16.
    pub(super) fn materialize(
        &self,
        cfg: &VitConfig,
        device: Device,
    ) -> Result<(nn::VarStore, Vit)> {
        let mut vs = nn::VarStore::new(device);
        let model = Vit::build(&vs, cfg, Precision::F32);
        if self.kind != ReferenceRequest::TakeF32 {
            vs.bfloat16();
        }
        vs.freeze();
        let scales: std::collections::HashMap<&String, &Tensor> =
            self.scales.iter().map(|(n, s)| (n, s)).collect();
        let mut dst = vs.variables();
        tch::no_grad(|| -> Result<()> {
            for (name, t) in &self.kept {
                let Some(d) = dst.get_mut(name) else {
                    bail!("the reference has an unknown tensor {name}");
                };
                let value = match scales.get(name) {
                    Some(s) => dequantize_rows(t, s, &d.size()),
                    None => t.shallow_clone(),
                };
                d.copy_(&value);
            }
            Ok(())
        })?;
        Ok((vs, model))
    }

    /// Runs `f` with the reference model and the dtype its input takes.
    pub(super) fn run<R>(
        &self,
        cfg: &VitConfig,
        device: Device,
        f: impl FnOnce(&Vit, Kind) -> R,
    ) -> R {
        let dtype = match self.kind {
            ReferenceRequest::TakeF32 | ReferenceRequest::Keep => Kind::Float,
            _ => Kind::BFloat16,
        };
        match &self.model {
            Some((_, model)) => f(model, dtype),
            None => {
                let (_vs, model) = self
                    .materialize(cfg, device)
                    .expect("the reference was checked when it was kept");
                f(&model, dtype)
            }
        }
    }
}

/// A layer's weight (a Linear or convolution `.weight` of 2 or more
/// dimensions) as int8 per output row, symmetric: `q = round(w / s)` with
/// `s = max |row| / 127`; `None` for everything else (norms, biases, the
/// position embedding and the tokens stay bfloat16).
fn quantize_rows(name: &str, t: &Tensor) -> Option<(Tensor, Tensor)> {
    if t.dim() < 2 || !name.ends_with(".weight") {
        return None;
    }
    let rows = t.size()[0];
    let flat = t.detach().to_kind(Kind::Float).reshape([rows, -1]);
    let scale = flat.abs().amax([1].as_slice(), true).clamp_min(1e-12) / 127.0;
    let q = (&flat / &scale)
        .round()
        .clamp(-127.0, 127.0)
        .to_kind(Kind::Int8);
    Some((q, scale))
}

/// The float32 values of [`quantize_rows`]'s output, in `shape`.
fn dequantize_rows(q: &Tensor, scale: &Tensor, shape: &[i64]) -> Tensor {
    (q.to_kind(Kind::Float) * scale).reshape(shape)
}

//! What the optimizer runs: SGD or AdamW and their settings, the
//! learning-rate schedule (cosine with linear warm-up), clipping and
//! layer-wise decay (`Recipe`), checked before anything trains.

use serde::{Deserialize, Serialize};

/// Which update rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimizerKind {
    /// `train.sgd` (the paper's recipe).
    #[default]
    Sgd,
    /// `train.adamw` (the BEiT / MAE / DINOv2 fine-tuning recipe).
    AdamW,
}

/// SGD settings (the paper's recipe by default: momentum 0.9, lr 0.003,
/// cosine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Momentum.
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient (of every parameter, as
    /// `torch.optim.SGD(model.parameters())`).
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: u64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 0.003,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            warmup_steps: 0,
        }
    }
}

/// AdamW settings (defaults: timm's fine-tuning values, lr 1e-4, betas
/// 0.9 / 0.999, eps 1e-8, weight decay 0.05).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay, skipped (as timm does) on one-dimensional
    /// parameters (norms, biases, LayerScale), the position embedding and
    /// the class and register tokens.
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    pub warmup_steps: u64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.05,
            warmup_steps: 0,
        }
    }
}

/// Everything that decides an update: the rule, its settings, the
/// layer-wise decay, clipping and label smoothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recipe {
    /// The rule.
    pub kind: OptimizerKind,
    /// Its settings when SGD.
    pub sgd: SgdConfig,
    /// Its settings when AdamW.
    pub adamw: AdamWConfig,
    /// Layer-wise learning-rate decay (1: none): a parameter of timm's layer
    /// `id` gets `layer_decay^(depth + 1 - id)` (block `i`: `^(depth - i)`,
    /// the embedding `^(depth + 1)`, the head 1).
    pub layer_decay: f64,
    /// Gradient-norm clipping over all trainable parameters (0: none).
    pub clip_grad_norm: f64,
    /// Label smoothing of the training loss (0: none).
    pub label_smoothing: f64,
}

impl Recipe {
    /// Plain SGD with these settings, nothing else.
    pub fn sgd(sgd: SgdConfig) -> Self {
        Recipe {
            sgd,
            layer_decay: 1.0,
            ..Default::default()
        }
    }

    /// Plain AdamW with these settings, nothing else.
    pub fn adamw(adamw: AdamWConfig) -> Self {
        Recipe {
            kind: OptimizerKind::AdamW,
            adamw,
            layer_decay: 1.0,
            ..Default::default()
        }
    }

    /// Checks the values; `at` names the section in messages (`train`).
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let non_negative = |key: &str, v: f64, what: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{at}.{key} is {v}: {what} must be finite and >= 0"))
            }
        };
        match self.kind {
            OptimizerKind::Sgd => {
                let s = &self.sgd;
                non_negative("sgd.lr", s.lr, "the learning rate")?;
                if !(0.0..1.0).contains(&s.momentum) {
                    return Err(format!(
                        "{at}.sgd.momentum is {}: momentum must be in [0, 1)",
                        s.momentum
                    ));
                }
                non_negative("sgd.weight_decay", s.weight_decay, "weight decay")?;
            }
            OptimizerKind::AdamW => {
                let a = &self.adamw;
                non_negative("adamw.lr", a.lr, "the learning rate")?;
                for (key, b) in [("beta1", a.beta1), ("beta2", a.beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return Err(format!("{at}.adamw.{key} is {b}: it must be in [0, 1)"));
                    }
                }
                if !(a.eps.is_finite() && a.eps > 0.0) {
                    return Err(format!("{at}.adamw.eps is {}: it must be > 0", a.eps));
                }
                non_negative("adamw.weight_decay", a.weight_decay, "weight decay")?;
            }
        }
        if !(self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            return Err(format!(
                "{at}.layer_decay is {}: it must be in (0, 1] (1: no decay; timm's fine-tuning \
                 recipes use 0.65 to 0.75)",
                self.layer_decay
            ));
        }
        non_negative("clip_grad_norm", self.clip_grad_norm, "the clipping norm")?;
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(format!(
                "{at}.label_smoothing is {}: it must be in [0, 1)",
                self.label_smoothing
            ));
        }
        Ok(())
    }

    /// Peak learning rate and warm-up of the chosen rule.
    fn schedule(&self) -> (f64, u64) {
        match self.kind {
            OptimizerKind::Sgd => (self.sgd.lr, self.sgd.warmup_steps),
            OptimizerKind::AdamW => (self.adamw.lr, self.adamw.warmup_steps),
        }
    }

    /// Learning rate at `step` of `total`: linear warm-up, then cosine to 0.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let (lr, warmup) = self.schedule();
        cosine_lr(lr, warmup, step, total)
    }
}

/// `peak` after a linear warm-up of `warmup` steps, then cosine to 0 at
/// `total`.
pub fn cosine_lr(peak: f64, warmup: u64, step: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = (step - warmup) as f64 / span;
    0.5 * peak * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

//! The optimizer's state in a checkpoint: momentum buffers, Adam moments
//! and step counts by parameter name, and their restore (refusing the
//! other optimizer's state, naming both).

use super::*;

impl Optimizer {
    /// The optimizer state that exists, as `<kind>/<parameter>` tensors
    /// (checkpoints).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            match &p.state {
                None => {}
                Some(State::Momentum(m)) => {
                    out.push((format!("{MOMENTUM}/{}", p.name), m.shallow_clone()))
                }
                Some(State::Adam {
                    exp_avg,
                    exp_avg_sq,
                    step,
                }) => {
                    for (kind, t) in [(EXP_AVG, exp_avg), (EXP_AVG_SQ, exp_avg_sq), (STEP, step)] {
                        out.push((format!("{kind}/{}", p.name), t.shallow_clone()));
                    }
                }
            }
        }
        out
    }

    /// Restores state saved by [`Self::state`]; parameters not named keep
    /// none. State of the other optimizer is an error that says so.
    pub fn load_state(&mut self, mut state: Vec<(String, Tensor)>) -> Result<(), String> {
        self.load_grad_sums(&mut state)?;
        let mut by_name: std::collections::HashMap<String, Tensor> = state.into_iter().collect();
        let sgd = self.recipe.kind == OptimizerKind::Sgd;
        if let Some(other) = by_name.keys().find(|k| {
            let momentum = k.starts_with(&format!("{MOMENTUM}/"));
            if sgd {
                !momentum
            } else {
                momentum
            }
        }) {
            return Err(format!(
                "the checkpoint holds {} state ({other}), the run trains with {:?}: resume with \
                 the optimizer it was started with",
                if sgd { "AdamW" } else { "SGD" },
                self.recipe.kind
            ));
        }
        for p in &mut self.params {
            let mut take = |kind: &str| -> Result<Option<Tensor>, String> {
                let Some(t) = by_name.remove(&format!("{kind}/{}", p.name)) else {
                    return Ok(None);
                };
                let want = if kind == STEP {
                    Vec::new()
                } else {
                    p.value.size()
                };
                if t.size() != want {
                    return Err(format!(
                        "{kind} of {} has shape {:?}, expected {want:?}",
                        p.name,
                        t.size()
                    ));
                }
                Ok(Some(t.to_device(p.value.device())))
            };
            p.state = if sgd {
                take(MOMENTUM)?.map(State::Momentum)
            } else {
                match (take(EXP_AVG)?, take(EXP_AVG_SQ)?, take(STEP)?) {
                    (Some(exp_avg), Some(exp_avg_sq), Some(step)) => Some(State::Adam {
                        exp_avg,
                        exp_avg_sq,
                        step,
                    }),
                    (None, None, None) => None,
                    _ => return Err(format!("incomplete AdamW state for {}", p.name)),
                }
            };
        }
        match by_name.keys().next() {
            Some(extra) => Err(format!("optimizer state for unknown parameter {extra}")),
            None => Ok(()),
        }
    }
}

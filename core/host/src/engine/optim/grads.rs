//! The gradient sums a policy reads (contract 2's accumulated gradient
//! norms): summed every step once declared, read and reset on request,
//! kept in the checkpoint.

use super::*;

impl Optimizer {
    /// Adds this step's gradients (before clipping) to the sums a policy
    /// reads with [`Self::read_grad_sums`].
    pub fn accumulate(&mut self, grads: &Grads) {
        tch::no_grad(|| {
            for (&i, g) in grads.index.iter().zip(&grads.grads) {
                match &mut self.grad_sum[i] {
                    Some(sum) => {
                        let _ = sum.g_add_(g);
                    }
                    slot => *slot = Some(g.detach().copy()),
                }
            }
        });
        self.sum_steps += 1;
    }

    /// Per block (of `layers`), the L1 and L2 norms of the summed
    /// gradients and the steps summed; the sums start again from zero.
    /// Blocks `[0, frozen)` read 0 (a frozen block has no gradient to
    /// sum; what it summed before it froze is dropped).
    pub fn read_grad_sums(&mut self, layers: usize, frozen: usize) -> (Vec<f64>, Vec<f64>, u64) {
        let (mut l1, mut l2) = (vec![0f64; layers], vec![0f64; layers]);
        let mut parts: Vec<(usize, Tensor, Tensor)> = Vec::new();
        for (p, sum) in self.params.iter().zip(&mut self.grad_sum) {
            let Some(sum) = sum.take() else { continue };
            if let Group::Block(b) = p.group {
                if b < layers && b >= frozen {
                    // Norms accumulated in float64, without a float64 copy.
                    let l1 = sum.norm_scalaropt_dtype(1.0, Kind::Double);
                    let l2 = sum.norm_scalaropt_dtype(2.0, Kind::Double);
                    parts.push((b, l1, l2.square()));
                }
            }
        }
        // One copy to host memory per read, not two per parameter.
        if !parts.is_empty() {
            let sums: Vec<Tensor> = parts
                .iter()
                .flat_map(|p| [p.1.shallow_clone(), p.2.shallow_clone()])
                .collect();
            let host = Vec::<f64>::try_from(Tensor::stack(&sums, 0).to_device(tch::Device::Cpu))
                .unwrap_or_default();
            for ((b, _, _), v) in parts.iter().zip(host.chunks(2)) {
                l1[*b] += v[0];
                l2[*b] += v[1];
            }
        }
        let steps = std::mem::take(&mut self.sum_steps);
        (l1, l2.into_iter().map(f64::sqrt).collect(), steps)
    }

    /// The gradient sums as checkpoint tensors.
    pub fn grad_sum_state(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .zip(&self.grad_sum)
            .filter_map(|(p, s)| {
                let s = s.as_ref()?;
                Some((format!("{GRAD_SUM}/{}", p.name), s.shallow_clone()))
            })
            .collect();
        if self.sum_steps > 0 || !out.is_empty() {
            let steps = Tensor::from_slice(&[self.sum_steps as i64]);
            out.push((GRAD_SUM_STEPS.to_string(), steps));
        }
        out
    }

    /// Splits the gradient sums off checkpoint state and restores them.
    pub(super) fn load_grad_sums(
        &mut self,
        state: &mut Vec<(String, Tensor)>,
    ) -> Result<(), String> {
        let prefix = format!("{GRAD_SUM}/");
        for (name, t) in std::mem::take(state) {
            if name == GRAD_SUM_STEPS {
                self.sum_steps = t.int64_value(&[0]) as u64;
            } else if let Some(param) = name.strip_prefix(&prefix) {
                let i = self
                    .params
                    .iter()
                    .position(|p| p.name == param)
                    .ok_or_else(|| format!("gradient sum of unknown parameter {param}"))?;
                self.grad_sum[i] = Some(t.to_device(self.params[i].value.device()));
            } else {
                state.push((name, t));
            }
        }
        Ok(())
    }
}

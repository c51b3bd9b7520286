//! The C++ shims' bindings: libtorch's fused SGD and AdamW steps and the
//! one-kernel `_foreach_` norms and scaling (`csrc/sgd.cpp`,
//! `csrc/adamw.cpp`, `csrc/foreach.cpp`), and the update that calls them.

use super::*;
use crate::error::ShimError;

extern "C" {
    // csrc/sgd.cpp
    fn simfreeze_fused_sgd(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        bufs: *const *const C_tensor,
        n: usize,
        weight_decay: f64,
        momentum: f64,
        lr: f64,
        nesterov: c_int,
        first_step: c_int,
        found_inf: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;

    // csrc/foreach.cpp
    fn simfreeze_foreach_norms(
        ts: *const *const C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn simfreeze_foreach_scale(
        ts: *const *const C_tensor,
        n: usize,
        scale: *const C_tensor,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;

    // csrc/adamw.cpp
    fn simfreeze_fused_adamw(
        params: *const *const C_tensor,
        grads: *const *const C_tensor,
        exp_avgs: *const *const C_tensor,
        exp_avg_sqs: *const *const C_tensor,
        steps: *const *const C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        found_inf: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

impl Optimizer {
    /// One fused kernel call over `members` (positions in `grads`).
    pub(super) fn fused(
        &self,
        grads: &Grads,
        members: &[usize],
        lr: f64,
        decay: f64,
        first: bool,
        found_inf: Option<&Tensor>,
    ) -> Result<(), String> {
        let n = members.len();
        let (mut params, mut grad_ptrs) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut s1, mut s2, mut s3) = (Vec::new(), Vec::new(), Vec::new());
        for &k in members {
            let p = &self.params[grads.index[k]];
            params.push(p.value.as_ptr());
            grad_ptrs.push(grads.grads[k].as_ptr());
            match &p.state {
                Some(State::Momentum(m)) => s1.push(m.as_ptr()),
                Some(State::Adam {
                    exp_avg,
                    exp_avg_sq,
                    step,
                }) => {
                    s1.push(exp_avg.as_ptr());
                    s2.push(exp_avg_sq.as_ptr());
                    s3.push(step.as_ptr());
                }
                // SGD without momentum: the buffers are ignored.
                None => s1.push(p.value.as_ptr()),
            }
        }
        let skip = found_inf.map_or(std::ptr::null(), Tensor::as_ptr);
        let mut err = ShimError::default();
        let (what, rc) = match self.recipe.kind {
            OptimizerKind::Sgd => {
                let s = &self.recipe.sgd;
                // SAFETY: every pointer is a live tensor handle owned by
                // `self` or `grads` for the duration of the call; the shim
                // catches C++ exceptions and writes a NUL-terminated message
                // into `err`.
                let rc = unsafe {
                    simfreeze_fused_sgd(
                        params.as_ptr(),
                        grad_ptrs.as_ptr(),
                        s1.as_ptr(),
                        n,
                        decay,
                        s.momentum,
                        lr,
                        c_int::from(s.nesterov),
                        c_int::from(first),
                        skip,
                        err.ptr(),
                        err.len(),
                    )
                };
                ("SGD", rc)
            }
            OptimizerKind::AdamW => {
                let a = &self.recipe.adamw;
                // SAFETY: as above; every parameter has its Adam state.
                let rc = unsafe {
                    simfreeze_fused_adamw(
                        params.as_ptr(),
                        grad_ptrs.as_ptr(),
                        s1.as_ptr(),
                        s2.as_ptr(),
                        s3.as_ptr(),
                        n,
                        lr,
                        a.beta1,
                        a.beta2,
                        decay,
                        a.eps,
                        skip,
                        err.ptr(),
                        err.len(),
                    )
                };
                ("AdamW", rc)
            }
        };
        if rc == 0 {
            return Ok(());
        }
        Err(format!("fused {what} step: {}", err.message()))
    }
}

/// The L2 norm of each tensor, `[n]` float32 on their device, in one
/// `_foreach_norm` (`csrc/foreach.cpp`).
pub(super) fn foreach_norms(ts: &[Tensor]) -> Tensor {
    let ptrs: Vec<*const C_tensor> = ts.iter().map(Tensor::as_ptr).collect();
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = ShimError::default();
    // SAFETY: the handles are live for the call; on success the shim
    // writes a new tensor handle that the returned Tensor owns.
    let rc = unsafe {
        simfreeze_foreach_norms(ptrs.as_ptr(), ptrs.len(), &mut out, err.ptr(), err.len())
    };
    shim_result(rc, &err, "gradient norms");
    // SAFETY: rc == 0, so `out` is a fresh handle from the shim.
    unsafe { Tensor::from_ptr(out) }.to_kind(Kind::Float)
}

/// `ts[i] * scale` for every tensor, out of place, in one `_foreach_mul`
/// (`csrc/foreach.cpp`).
pub(super) fn foreach_scale(ts: &[Tensor], scale: &Tensor) -> Vec<Tensor> {
    let ptrs: Vec<*const C_tensor> = ts.iter().map(Tensor::as_ptr).collect();
    let mut out: Vec<*mut C_tensor> = vec![std::ptr::null_mut(); ts.len()];
    let mut err = ShimError::default();
    // SAFETY: as in `foreach_norms`; `out` has room for one handle per
    // tensor.
    let rc = unsafe {
        simfreeze_foreach_scale(
            ptrs.as_ptr(),
            ptrs.len(),
            scale.as_ptr(),
            out.as_mut_ptr(),
            err.ptr(),
            err.len(),
        )
    };
    shim_result(rc, &err, "gradient clipping");
    // SAFETY: rc == 0, so every slot holds a fresh handle from the shim.
    out.into_iter()
        .map(|p| unsafe { Tensor::from_ptr(p) })
        .collect()
}

/// A failed shim call raised like tch's own errors, so the run's guard
/// reports it.
pub(super) fn shim_result(rc: c_int, err: &ShimError, what: &str) {
    if rc != 0 {
        std::panic::panic_any(TorchPanic(format!("{what}: {}", err.message())));
    }
}

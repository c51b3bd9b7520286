//! Mixed precision: bfloat16 autocast around the model's forward passes
//! (`train.precision: Bf16`), through a small C++ shim (`csrc/autocast.cpp`)
//! because tch's C API only switches float16 autocast. Parameters, optimizer
//! state and the loss stay float32; no loss scaling is needed for bf16.
//! Works on CUDA and on CPU (where it is slower unless the CPU has bf16
//! instructions; the CPU path exists so tests exercise the plumbing).

use std::os::raw::{c_char, c_int};

use serde::{Deserialize, Serialize};
use tch::Device;

/// Numeric precision of the forward passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// Everything in float32.
    #[default]
    F32,
    /// Matrix multiplications and attention in bfloat16 under autocast.
    Bf16,
}

extern "C" {
    fn simfreeze_autocast_bf16_enter(cuda: c_int, enabled: *mut c_int, dtype: *mut c_int);
    fn simfreeze_autocast_exit(cuda: c_int, enabled: c_int, dtype: c_int);
    // csrc/foreach.cpp
    fn simfreeze_cuda_matmul_tf32(tf32: c_int);
    fn simfreeze_cuda_matmul_is_tf32() -> c_int;
    fn simfreeze_cuda_set_device(index: c_int, err: *mut c_char, err_len: usize) -> c_int;
}

/// Makes CUDA device `index` the process's current device before any CUDA
/// work (a data-parallel rank's `cuda:LOCAL_RANK`, so that it never opens
/// a context on GPU 0); an error when this libtorch has no CUDA or no such
/// device.
pub fn cuda_set_device(index: usize) -> Result<(), String> {
    // SAFETY: the shim catches C++ exceptions and NUL-terminates `err`.
    crate::error::shim_call(|err, len| unsafe {
        simfreeze_cuda_set_device(index as c_int, err, len)
    })
}

/// CUDA float32 matrix products in TF32 (`true`: PyTorch's
/// `set_float32_matmul_precision("high")`, tensor cores with a 10-bit
/// mantissa on the inputs and float32 accumulation) or in full float32.
/// Every engine on a CUDA device turns it on (docs/gpu.md says why); CPU
/// matrix products are not affected.
pub fn cuda_matmul_tf32(on: bool) {
    // SAFETY: a plain setter of libtorch's global context.
    unsafe { simfreeze_cuda_matmul_tf32(c_int::from(on)) }
}

/// Whether CUDA float32 matrix products run in TF32.
pub fn cuda_matmul_is_tf32() -> bool {
    // SAFETY: a plain getter of libtorch's global context.
    unsafe { simfreeze_cuda_matmul_is_tf32() != 0 }
}

/// Restores the previous autocast state (on/off and dtype) when dropped,
/// also on panic.
struct Guard {
    cuda: c_int,
    enabled: c_int,
    dtype: c_int,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: plain calls into libtorch's autocast state.
        unsafe { simfreeze_autocast_exit(self.cuda, self.enabled, self.dtype) }
    }
}

/// Runs `f` with bf16 autocast on `device` when `precision` is `Bf16`.
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    if precision == Precision::F32 {
        return f();
    }
    let mut guard = Guard {
        cuda: c_int::from(device.is_cuda()),
        enabled: 0,
        dtype: 0,
    };
    // SAFETY: the pointers are to live fields of `guard`.
    unsafe { simfreeze_autocast_bf16_enter(guard.cuda, &mut guard.enabled, &mut guard.dtype) };
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn the_cuda_tf32_setting_reaches_libtorch_and_leaves_cpu_matmuls_exact() {
        let a = Tensor::randn([16, 32], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([32, 8], (Kind::Float, Device::Cpu));
        let before = a.matmul(&b);
        cuda_matmul_tf32(true);
        assert!(cuda_matmul_is_tf32());
        assert!(a.matmul(&b).equal(&before), "a CPU matmul changed");
        cuda_matmul_tf32(false);
        assert!(!cuda_matmul_is_tf32());
    }

    #[test]
    fn bf16_autocast_switches_matmul_precision_and_restores() {
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
        let inside = autocast(Precision::Bf16, Device::Cpu, || a.matmul(&b));
        assert_eq!(inside.kind(), Kind::BFloat16);
        assert_eq!(a.matmul(&b).kind(), Kind::Float, "autocast left on");
        let plain = autocast(Precision::F32, Device::Cpu, || a.matmul(&b));
        assert_eq!(plain.kind(), Kind::Float);
        let close = (inside.to_kind(Kind::Float) - plain)
            .abs()
            .max()
            .double_value(&[]);
        assert!(close < 0.1, "{close}");
    }
}

// One-kernel operations over lists of tensors (libtorch's `_foreach_`
// family, which tch's C API does not expose) and the float32 matmul
// precision of CUDA. On a GPU each call is one or a few kernel launches for
// all the model's gradients instead of one or two per tensor; on the CPU
// libtorch runs the same per-tensor kernels as before, so the numbers do
// not change there.
//
// Tensors cross as tch's handles (`at::Tensor*`; a returned handle is
// allocated with `new`, as tch's own C API does, and tch frees it); a C++
// exception is caught here and its message returned, never thrown into
// Rust.
#include <ATen/Context.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/stack.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "shim.h"

using simfreeze::gather;

extern "C" {

// The L2 norm of each of the n tensors, as one float tensor [n] on their
// device, written to *out (torch._foreach_norm, then one stack). Returns 0,
// or 1 with the error message in err.
int simfreeze_foreach_norms(at::Tensor* const* ts, size_t n, at::Tensor** out, char* err,
                            size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        c10::AutoGradMode no_grad(false);
        const auto list = gather(ts, n, false);
        *out = new at::Tensor(at::stack(at::_foreach_norm(list, 2), 0));
        return 0;
    });
}

// out[i] = ts[i] * scale, out of place (gradients may share memory, which an
// in-place product would scale twice), scale a one-element tensor on the
// tensors' device (torch._foreach_mul with a tensor). Returns 0, or 1 with
// the error message in err.
int simfreeze_foreach_scale(at::Tensor* const* ts, size_t n, const at::Tensor* scale,
                            at::Tensor** out, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        c10::AutoGradMode no_grad(false);
        const auto list = gather(ts, n, false);
        auto scaled = at::_foreach_mul(list, *scale);
        for (size_t i = 0; i < n; ++i) {
            out[i] = new at::Tensor(std::move(scaled[i]));
        }
        return 0;
    });
}

// CUDA float32 matrix products in TF32 (tf32 != 0; PyTorch's
// set_float32_matmul_precision("high")) or in full float32 (IEEE).
// CPU matmuls are not affected.
void simfreeze_cuda_matmul_tf32(int tf32) {
    at::globalContext().setFloat32Precision(
        at::Float32Backend::CUDA, at::Float32Op::MATMUL,
        tf32 ? at::Float32Precision::TF32 : at::Float32Precision::IEEE);
}

// Makes CUDA device `index` this process's current device (cudaSetDevice,
// through the device guard libtorch_cuda registers), before any CUDA work:
// a data-parallel rank must not open its context on GPU 0. Returns 0, or 1
// with the error message in err (no CUDA in this libtorch, no such device).
int simfreeze_cuda_set_device(int index, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)
            ->setDevice(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index)));
        return 0;
    });
}

// 1 when CUDA float32 matrix products run in TF32.
int simfreeze_cuda_matmul_is_tf32() {
    return at::globalContext().float32Precision(at::Float32Backend::CUDA,
                                                at::Float32Op::MATMUL) ==
                   at::Float32Precision::TF32
               ? 1
               : 0;
}
}

// One fused SGD update over many parameters (libtorch's `_fused_sgd_`, the
// kernel behind `torch.optim.SGD(fused=True)`), which tch's C API does not
// expose. Per parameter, the step otherwise costs five to eight small
// tensor operations, and on the tiny CPU model that per-op overhead is a
// visible share of a training step.
//
// Tensors cross as tch's handles (`at::Tensor*`); a C++ exception is caught
// here and its message returned, never thrown into Rust.
#include <ATen/ops/_fused_sgd.h>
#include <c10/core/GradMode.h>

#include <optional>

#include "shim.h"

using simfreeze::gather;

extern "C" {

// params[i] -= lr * d_i with PyTorch's SGD rule (dampening 0): d = g + wd p;
// with momentum, buf = first ? d : momentum buf + d and d = nesterov ?
// d + momentum buf : buf. `bufs` is ignored when momentum is 0. When
// `found_inf` is not null and holds 1, the kernel updates nothing (this lets
// a GPU queue the step before the loss is known to be finite). Returns 0,
// or 1 with the error message in err (truncated to err_len - 1 bytes).
int simfreeze_fused_sgd(at::Tensor* const* params, at::Tensor* const* grads,
                        at::Tensor* const* bufs, size_t n, double weight_decay,
                        double momentum, double lr, int nesterov, int first_step,
                        const at::Tensor* found_inf, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        c10::AutoGradMode no_grad(false);
        const auto p = gather(params, n, false);
        const auto g = gather(grads, n, true);
        const auto b = momentum != 0.0 ? gather(bufs, n, false) : std::vector<at::Tensor>{};
        const std::optional<at::Tensor> skip =
            found_inf ? std::optional<at::Tensor>(*found_inf) : std::nullopt;
        at::_fused_sgd_(p, g, b, weight_decay, momentum, lr, 0.0, nesterov != 0,
                        false, first_step != 0, std::nullopt, skip);
        return 0;
    });
}
}

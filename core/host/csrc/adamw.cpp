// One fused AdamW update over many parameters (libtorch's `_fused_adamw_`,
// the kernel behind `torch.optim.AdamW(fused=True)`), which tch's C API
// does not expose; the same step counting as PyTorch's `_fused_adamw`.
//
// Tensors cross as tch's handles (`at::Tensor*`); a C++ exception is caught
// here and its message returned, never thrown into Rust.
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_foreach_sub.h>
#include <ATen/ops/_fused_adamw.h>
#include <c10/core/GradMode.h>

#include <optional>
#include <vector>

#include "shim.h"

using simfreeze::gather;

extern "C" {

// Decoupled weight decay and bias-corrected Adam moments, as
// torch.optim.AdamW (amsgrad off): each step count (a float scalar tensor
// per parameter) is incremented first, then p *= 1 - lr wd,
// m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). When
// `found_inf` is not null and holds 1, the kernel updates nothing and the
// step counts are put back. Returns 0, or 1 with the error message in err.
int simfreeze_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                          at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                          at::Tensor* const* steps, size_t n, double lr, double beta1,
                          double beta2, double weight_decay, double eps,
                          const at::Tensor* found_inf, char* err, size_t err_len) {
    return simfreeze::guarded(err, err_len, 1, [&] {
        c10::AutoGradMode no_grad(false);
        const auto p = gather(params, n, false);
        const auto g = gather(grads, n, true);
        const auto m = gather(exp_avgs, n, false);
        const auto v = gather(exp_avg_sqs, n, false);
        const auto s = gather(steps, n, false);
        at::_foreach_add_(s, 1);
        const std::optional<at::Tensor> skip =
            found_inf ? std::optional<at::Tensor>(*found_inf) : std::nullopt;
        at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps, false, false,
                          std::nullopt, skip);
        if (found_inf) {
            // One kernel for every step count, as torch.optim's fused AdamW.
            at::_foreach_sub_(s, std::vector<at::Tensor>(n, *found_inf));
        }
        return 0;
    });
}
}

// bf16 autocast for libtorch, which tch's C API does not expose (it only
// switches CUDA autocast on and off, in float16). Enums only cross this
// boundary, so it is insensitive to the C++ ABI.
#include <ATen/autocast_mode.h>

extern "C" {

// Switches autocast for CUDA (cuda != 0) or CPU to bfloat16 on or off and
// returns whether it was on.
int simfreeze_autocast_bf16(int cuda, int enabled) {
    const auto dev = cuda ? at::kCUDA : at::kCPU;
    const bool was = at::autocast::is_autocast_enabled(dev);
    at::autocast::set_autocast_dtype(dev, at::kBFloat16);
    at::autocast::set_autocast_enabled(dev, enabled != 0);
    return was ? 1 : 0;
}

void simfreeze_autocast_enter() { at::autocast::increment_nesting(); }

void simfreeze_autocast_exit() {
    if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
    }
}
}

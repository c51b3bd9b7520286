// bf16 autocast for libtorch, which tch's C API does not expose (it only
// switches CUDA autocast on and off, in float16). Enums only cross this
// boundary, so it is insensitive to the C++ ABI.
#include <ATen/autocast_mode.h>

extern "C" {

// Saves CUDA's (cuda != 0) or the CPU's autocast state into *enabled and
// *dtype, then switches bfloat16 autocast on and enters a nesting level.
void simfreeze_autocast_bf16_enter(int cuda, int* enabled, int* dtype) {
    const auto dev = cuda ? at::kCUDA : at::kCPU;
    *enabled = at::autocast::is_autocast_enabled(dev) ? 1 : 0;
    *dtype = static_cast<int>(at::autocast::get_autocast_dtype(dev));
    at::autocast::set_autocast_dtype(dev, at::kBFloat16);
    at::autocast::set_autocast_enabled(dev, true);
    at::autocast::increment_nesting();
}

// Leaves the nesting level (clearing the cast cache at the outermost one)
// and restores the state saved by the matching enter.
void simfreeze_autocast_exit(int cuda, int enabled, int dtype) {
    const auto dev = cuda ? at::kCUDA : at::kCPU;
    if (at::autocast::decrement_nesting() == 0) {
        at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dev, enabled != 0);
    at::autocast::set_autocast_dtype(dev, static_cast<at::ScalarType>(dtype));
}
}

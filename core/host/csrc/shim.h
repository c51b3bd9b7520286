// What the C++ shims share: tensor lists from tch's handles, and the one way
// a C++ exception crosses into Rust (never thrown: its message is copied
// into the caller's buffer and a fallback value returned).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstring>
#include <exception>
#include <vector>

namespace simfreeze {

// The n tensors behind tch's handles, made contiguous when asked.
inline std::vector<at::Tensor> gather(at::Tensor* const* ts, size_t n, bool contiguous) {
    std::vector<at::Tensor> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        out.push_back(contiguous ? ts[i]->contiguous() : *ts[i]);
    }
    return out;
}

// Runs f(); on a C++ exception writes its message into err (truncated to
// err_len - 1 bytes, NUL-terminated) and returns `failed`.
template <typename T, typename F>
T guarded(char* err, size_t err_len, T failed, F f) {
    const auto report = [&](const char* what) {
        if (err_len > 0) {
            std::strncpy(err, what, err_len - 1);
            err[err_len - 1] = '\0';
        }
    };
    try {
        return f();
    } catch (const std::exception& e) {
        report(e.what());
    } catch (...) {
        report("unknown C++ exception");
    }
    return failed;
}

}  // namespace simfreeze

// Declaration stub: see README.md.
#pragma once

#include <chrono>

namespace gloo {

class Context {
 public:
  // Defined in libtorch_cpu.so (gloo/context.cc).
  void setTimeout(std::chrono::milliseconds timeout);
};

}  // namespace gloo

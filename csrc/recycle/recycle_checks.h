// Argument checks of recycle shared by the CPU and CUDA kernels (same messages on every
// device). Data-dependent checks (positions and slots in range) stay with each kernel: the
// CPU raises, CUDA cannot without a host sync.
#pragma once

#include <optional>
#include <string>

#include "../common/cpu_utils.h"

namespace tokenreduce {

// x [B, N, D] float; target [B, T], source [B, S] int64; weight [B, N] float; assign [B, S]
// int64; without assign: T > 0 unless S == 0, features [B, N, Df] float; all on x's device.
inline void check_recycle_args(const at::Tensor& x, const at::Tensor& target, const at::Tensor& source,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& assign,
                               const std::optional<at::Tensor>& features, c10::string_view metric) {
  constexpr const char* op = "recycle";
  check_dim(op, "x", x, 3, "[B, N, D]");
  check_float(op, "x", x);
  TR_CHECK_VALUE("recycle", metric == "cosine", "metric must be \"cosine\", got \"", std::string(metric), "\"");
  const int64_t B = x.size(0), N = x.size(1);
  check_long(op, "target", target);
  check_long(op, "source", source);
  check_device(op, "target", target, x);
  check_device(op, "source", source, x);
  TR_CHECK_VALUE("recycle", target.dim() == 2 && target.size(0) == B,
                 "target must have shape [B, T] with B=", B, ", got ", target.sizes());
  TR_CHECK_VALUE("recycle", source.dim() == 2 && source.size(0) == B,
                 "source must have shape [B, S] with B=", B, ", got ", source.sizes());
  const int64_t T = target.size(1), S = source.size(1);
  if (weight.has_value()) {
    check_float(op, "weight", *weight);
    check_device(op, "weight", *weight, x);
    TR_CHECK_VALUE("recycle", weight->dim() == 2 && weight->size(0) == B && weight->size(1) == N,
                   "weight must have shape [B, N] = [", B, ", ", N, "], got ", weight->sizes());
  }
  if (features.has_value()) {  // checked even when assign makes them unused, as the fake kernel does
    check_float(op, "features", *features);
    check_device(op, "features", *features, x);
    TR_CHECK_VALUE("recycle", features->dim() == 3 && features->size(0) == B && features->size(1) == N,
                   "features must have shape [B, N, Df] = [", B, ", ", N, ", Df], got ", features->sizes());
  }
  if (assign.has_value()) {
    check_long(op, "assign", *assign);
    check_device(op, "assign", *assign, x);
    TR_CHECK_VALUE("recycle", assign->dim() == 2 && assign->size(0) == B && assign->size(1) == S,
                   "assign must have shape [B, S] = [", B, ", ", S, "], got ", assign->sizes());
    return;
  }
  TR_CHECK_VALUE("recycle", T > 0 || S == 0, "sources need at least one target to join (T=0, S=", S,
                 "); pass assign to drop them");
}

}  // namespace tokenreduce

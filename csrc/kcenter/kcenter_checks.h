// Argument checks of kcenter shared by the CPU and CUDA kernels (same messages on every
// device). Data-dependent checks (a first pick masked out, k above the eligible count) stay
// with each kernel: the CPU raises, CUDA cannot without a host sync.
#pragma once

#include <optional>
#include <string>

#include "../common/cpu_utils.h"

namespace tokenreduce {

// x [B, N, D] float; metric "cosine" | "l2"; 0 <= k <= N; first_index int64 [B]; mask bool [B, N];
// all on x's device.
inline void check_kcenter_args(const at::Tensor& x, int64_t k, c10::string_view metric,
                               const std::optional<at::Tensor>& first_index,
                               const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "kcenter";
  check_dim(op, "x", x, 3, "[B, N, D]");
  check_float(op, "x", x);
  TR_CHECK_VALUE("kcenter", metric == "cosine" || metric == "l2",
                 "metric must be \"cosine\" or \"l2\", got \"", std::string(metric), "\"");
  const int64_t B = x.size(0), N = x.size(1);
  TR_CHECK_VALUE("kcenter", k >= 0 && k <= N, "k=", k, " must lie in [0, N=", N, "]");
  if (first_index.has_value()) {
    check_long(op, "first", *first_index);
    check_device(op, "first", *first_index, x);
    TR_CHECK_VALUE("kcenter", first_index->dim() == 1 && first_index->size(0) == B,
                   "first must be an int or an int64 tensor of shape [B] = [", B, "], got shape ",
                   first_index->sizes());
  }
  if (mask.has_value()) {
    TR_CHECK_TYPE("kcenter", mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ",
                  mask->scalar_type());
    check_device(op, "mask", *mask, x);
    TR_CHECK_VALUE("kcenter", mask->dim() == 2 && mask->size(0) == B && mask->size(1) == N,
                   "mask must have shape [B, N] = [", B, ", ", N, "], got ", mask->sizes());
  }
}

}  // namespace tokenreduce

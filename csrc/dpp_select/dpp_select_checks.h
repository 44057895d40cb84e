// Argument checks of dpp_select shared by the CPU and CUDA kernels (same messages on every
// device). Data-dependent checks (NaN/Inf in features or relevance) stay with each kernel:
// the CPU raises, CUDA cannot without a host sync.
#pragma once

#include <optional>

#include "../common/cpu_utils.h"

namespace tokenreduce {

// features [B, N, D] float; 0 <= k <= N; relevance float [B, N]; mask bool [B, N]; all on
// the features' device.
inline void check_dpp_select_args(const at::Tensor& features, int64_t k,
                                  const std::optional<at::Tensor>& relevance,
                                  const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "dpp_select";
  check_dim(op, "features", features, 3, "[B, N, D]");
  check_float(op, "features", features);
  const int64_t B = features.size(0), N = features.size(1);
  TR_CHECK_VALUE("dpp_select", k >= 0 && k <= N, "k=", k, " must lie in [0, N=", N, "]");
  if (relevance.has_value()) {
    check_float(op, "relevance", *relevance);
    check_device(op, "relevance", *relevance, features);
    TR_CHECK_VALUE("dpp_select", relevance->dim() == 2 && relevance->size(0) == B && relevance->size(1) == N,
                   "relevance must have shape [B, N] = [", B, ", ", N, "], got ", relevance->sizes());
  }
  if (mask.has_value()) {
    TR_CHECK_TYPE("dpp_select", mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ",
                  mask->scalar_type());
    check_device(op, "mask", *mask, features);
    TR_CHECK_VALUE("dpp_select", mask->dim() == 2 && mask->size(0) == B && mask->size(1) == N,
                   "mask must have shape [B, N] = [", B, ", ", N, "], got ", mask->sizes());
  }
}

}  // namespace tokenreduce

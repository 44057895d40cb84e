// Argument checks of bipartite_merge shared by the CPU and CUDA kernels (same messages on
// every device).
#pragma once

#include <optional>
#include <string>

#include "../common/cpu_utils.h"

namespace tokenreduce {

// x [B, N, D] float; order "tome" | "spatial"; 0 <= protect <= N; 0 <= r <= (N - protect) // 2;
// metric [B, N, Dm] float on x's device; size [B, N] float on x's device.
inline void check_bipartite_merge_args(const at::Tensor& x, int64_t r, const std::optional<at::Tensor>& metric,
                                       const std::optional<at::Tensor>& size, int64_t protect,
                                       c10::string_view order) {
  constexpr const char* op = "bipartite_merge";
  check_dim(op, "x", x, 3, "[B, N, D]");
  check_float(op, "x", x);
  TR_CHECK_VALUE("bipartite_merge", order == "tome" || order == "spatial",
                 "order must be \"tome\" or \"spatial\", got \"", std::string(order), "\"");
  const int64_t B = x.size(0), N = x.size(1);
  TR_CHECK_VALUE("bipartite_merge", protect >= 0 && protect <= N, "protect=", protect,
                 " must lie in [0, N=", N, "]");
  TR_CHECK_VALUE("bipartite_merge", r >= 0 && r <= (N - protect) / 2, "r=", r,
                 " must lie in [0, (N - protect) // 2 = ", (N - protect) / 2, "] (N=", N,
                 ", protect=", protect, ")");
  if (metric.has_value()) {
    check_float(op, "metric", *metric);
    check_device(op, "metric", *metric, x);
    TR_CHECK_VALUE("bipartite_merge", metric->dim() == 3 && metric->size(0) == B && metric->size(1) == N,
                   "metric must have shape [B, N, Dm] = [", B, ", ", N, ", Dm], got ", metric->sizes());
  }
  if (size.has_value()) {
    check_float(op, "size", *size);
    check_device(op, "size", *size, x);
    TR_CHECK_VALUE("bipartite_merge", size->dim() == 2 && size->size(0) == B && size->size(1) == N,
                   "size must have shape [B, N] = [", B, ", ", N, "], got ", size->sizes());
  }
}

}  // namespace tokenreduce

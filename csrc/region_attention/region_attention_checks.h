// Argument checks of region_attention shared by the CPU and CUDA kernels (same messages on
// every device; tokenreduce/ops/fake.py raises the same ones in Python).
#pragma once

#include "../common/cpu_utils.h"

namespace tokenreduce {

// q [B, M, C] with M = grid_h * grid_w; k [B, L, N, C] and v [B, L, N, Cv] with L >= 1 and
// N = (region * grid_h) * (region * grid_w); one floating dtype, one device; region >= 1,
// heads >= 1 dividing C and Cv.
inline void check_region_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        int64_t grid_h, int64_t grid_w, int64_t region, int64_t heads) {
  constexpr const char* op = "region_attention";
  check_dim(op, "q", q, 3, "[B, M, C]");
  check_dim(op, "k", k, 4, "[B, L, N, C]");
  check_dim(op, "v", v, 4, "[B, L, N, Cv]");
  check_float(op, "q", q);
  TR_CHECK_TYPE("region_attention", k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                v.scalar_type());
  check_device(op, "k", k, q);
  check_device(op, "v", v, q);
  TR_CHECK_VALUE("region_attention", grid_h >= 0 && grid_w >= 0, "grid_h and grid_w must be >= 0, got ", grid_h,
                 " and ", grid_w);
  TR_CHECK_VALUE("region_attention", region >= 1, "region must be >= 1, got ", region);
  TR_CHECK_VALUE("region_attention", heads >= 1, "heads must be >= 1, got ", heads);
  const int64_t B = q.size(0), M = q.size(1), C = q.size(2);
  TR_CHECK_VALUE("region_attention", M == grid_h * grid_w, "q has M=", M, " queries but the query grid is ",
                 grid_h, " x ", grid_w, " = ", grid_h * grid_w);
  const int64_t N = (region * grid_h) * (region * grid_w);
  TR_CHECK_VALUE("region_attention", k.size(0) == B && k.size(1) >= 1 && k.size(2) == N && k.size(3) == C,
                 "k must have shape [B, L, N, C] = [", B, ", L >= 1, ", N, ", ", C, "] (N = (region grid_h) x "
                 "(region grid_w) = ", region * grid_h, " x ", region * grid_w, "), got ", k.sizes());
  TR_CHECK_VALUE("region_attention", v.size(0) == B && v.size(1) == k.size(1) && v.size(2) == N,
                 "v must have shape [B, L, N, Cv] = [", B, ", ", k.size(1), ", ", N, ", Cv], got ", v.sizes());
  TR_CHECK_VALUE("region_attention", C % heads == 0 && v.size(3) % heads == 0, "heads=", heads,
                 " must divide q's channels C=", C, " and v's channels Cv=", v.size(3));
}

}  // namespace tokenreduce

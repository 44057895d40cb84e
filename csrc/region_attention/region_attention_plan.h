// Launch plan of region_attention on CUDA (torch-free, CUDA-free): the grid, block and
// dynamic shared memory of ra_forward (region_attention_kernels.cuh). region_attention_launch.cu
// launches from it, the glue checks its shared memory, and tokenreduce._C.plans.region_attention
// exposes it (tests, an NVRTC launch).
#pragma once

#include "../common/launch_plan.h"

namespace tokenreduce {
namespace cuda {

constexpr int kRaThreads = 256;                   // __launch_bounds__ of ra_forward
constexpr int kRaWarps = kRaThreads / 32;         // one warp per (batch row, query, head)

// Dynamic shared memory of ra_forward: the R = L * region^2 logits of each warp, in acc.
inline long long region_attention_smem_bytes(long long L, long long region, int acc_size) {
  return kRaWarps * L * region * region * acc_size;
}

struct RegionAttentionPlan {
  long long keys = 0;     // R = L * region^2, the keys each query attends to
  KernelLaunch forward;   // ra_forward (B * M * heads > 0): grid (ceil(B * M * heads / 8)), dynamic smem
};

inline RegionAttentionPlan make_region_attention_plan(long long B, long long M, long long heads, long long L,
                                                      long long region, int acc_size) {
  RegionAttentionPlan p;
  p.keys = L * region * region;
  const long long tasks = B * M * heads;
  if (tasks > 0)
    p.forward = kernel_launch(blocks_for(tasks, kRaWarps), 1, 1, kRaThreads,
                              region_attention_smem_bytes(L, region, acc_size));
  return p;
}

}  // namespace cuda
}  // namespace tokenreduce

// Launch plan of recycle on CUDA (torch-free, CUDA-free): which kernels of
// recycle_kernels.cuh run, with their grids, blocks and shared memory. recycle_launch.cu
// launches from it, the glue checks its shared memory, and the NVRTC fallback
// (tokenreduce/nvrtc/recycle.py) reads it through tokenreduce._C.plans.recycle.
#pragma once

#include "../common/launch_plan.h"

namespace tokenreduce {
namespace cuda {

constexpr int kRcPlanThreads = 512;       // __launch_bounds__ of rc_plan
constexpr int kRcAggregateThreads = 128;  // __launch_bounds__ of rc_aggregate

// Dynamic shared memory of rc_plan: cnt [T + 1] int.
inline long long recycle_plan_smem_bytes(long long T) { return (T + 1) * 4; }

struct RecyclePlan {
  long long members = 0;   // rows of the member workspace, max(S, 1)
  KernelLaunch inv_norm;   // rc_inv_norm (similarity assignment, N > 0): grid (ceil(N / 8), B)
  KernelLaunch assign;     // rc_assign (similarity assignment, N > 0, S > 0): grid (ceil(S / 64), B)
  KernelLaunch plan;       // rc_plan: grid (B), dynamic shared memory
  KernelLaunch aggregate;  // rc_aggregate (T > 0): grid (T, B)
};

// similarity: the slots come from cosine similarity (no `assign` given).
inline RecyclePlan make_recycle_plan(long long B, long long N, long long T, long long S, bool similarity) {
  RecyclePlan p;
  p.members = S > 1 ? S : 1;
  if (similarity && N > 0) {
    p.inv_norm = kernel_launch(blocks_for(N, kRowsPerBlock), B, 1, kRowThreads);
    if (S > 0) p.assign = kernel_launch(blocks_for(S, kTileRows), B, 1, kTileBlock);
  }
  p.plan = kernel_launch(B, 1, 1, kRcPlanThreads, recycle_plan_smem_bytes(T));
  if (T > 0) p.aggregate = kernel_launch(T, B, 1, kRcAggregateThreads);
  return p;
}

}  // namespace cuda
}  // namespace tokenreduce

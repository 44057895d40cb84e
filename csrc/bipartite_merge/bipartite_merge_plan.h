// Launch plan of bipartite_merge on CUDA (torch-free, CUDA-free): grids, blocks, shared
// memory and workspace sizes of the kernels of bipartite_merge_kernels.cuh.
// bipartite_merge_launch.cu launches from it, the glue checks its shared memory, and the
// NVRTC fallback (tokenreduce/nvrtc/bipartite_merge.py) reads it through
// tokenreduce._C.plans.bipartite_merge.
#pragma once

#include "../common/launch_plan.h"

namespace tokenreduce {
namespace cuda {

constexpr int kBmPlanThreads = 512;   // __launch_bounds__ of bm_plan
constexpr int kBmMergeThreads = 128;  // __launch_bounds__ of bm_merge

// Dynamic shared memory of bm_plan: val [Na] acc, rank [Na] int, pre [Na] int, cnt [Nb + 1] int.
inline long long bipartite_merge_plan_smem_bytes(long long N, int acc_size) {
  const long long Na = (N + 1) / 2, Nb = N / 2;
  return Na * acc_size + 2 * Na * 4 + (Nb + 1) * 4 + 16;
}

struct BipartiteMergePlan {
  long long na = 0, nb = 0;  // set A (even positions) ceil(N / 2), set B floor(N / 2)
  long long no = 0;          // output tokens N - r
  long long members = 0;     // rows of the member workspace, max(r, 1)
  KernelLaunch inv_norm;     // bm_inv_norm: grid (ceil(N / 8), B)
  KernelLaunch match;        // bm_match: grid (ceil(Na / 64), B)
  KernelLaunch plan;         // bm_plan: grid (B), dynamic shared memory
  KernelLaunch merge;        // bm_merge: grid (N - r, B)
};

// metric_acc_size: 4, or 8 for a float64 metric. Valid for r >= 1 (r == 0 copies).
inline BipartiteMergePlan make_bipartite_merge_plan(long long B, long long N, long long r, int metric_acc_size) {
  BipartiteMergePlan p;
  p.na = (N + 1) / 2;
  p.nb = N / 2;
  p.no = N - r;
  p.members = r > 1 ? r : 1;
  p.inv_norm = kernel_launch(blocks_for(N, kRowsPerBlock), B, 1, kRowThreads);
  p.match = kernel_launch(blocks_for(p.na, kTileRows), B, 1, kTileBlock);
  p.plan = kernel_launch(B, 1, 1, kBmPlanThreads, bipartite_merge_plan_smem_bytes(N, metric_acc_size));
  p.merge = kernel_launch(p.no, B, 1, kBmMergeThreads);
  return p;
}

}  // namespace cuda
}  // namespace tokenreduce

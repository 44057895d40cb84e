// Launch plan of dpp_select on CUDA (torch-free, CUDA-free): the grids, blocks and shared
// memory of the kernels of dpp_select_kernels.cuh. dpp_select_launch.cu launches from it,
// dpp_select_cuda.cpp checks its shared memory, and the NVRTC fallback
// (tokenreduce/nvrtc/dpp_select.py) reads it through tokenreduce._C.plans.dpp_select.
#pragma once

#include "../common/launch_plan.h"

namespace tokenreduce {
namespace cuda {

constexpr int kDppGreedyThreads = 512;  // __launch_bounds__ of dpp_greedy (16 warps)

// Dynamic shared memory of dpp_greedy: d2, diag and relevance [N] acc, the pick's unit row
// [D] acc, its Cholesky column [k] acc, flags [N] bytes.
inline long long dpp_greedy_smem_bytes(long long N, long long D, long long k, int acc_size) {
  return (3 * N + D + k) * (long long)acc_size + N;
}

struct DppSelectPlan {
  KernelLaunch norms;   // dpp_norms: one warp per token, grid (ceil(N / 8), B)
  KernelLaunch greedy;  // dpp_greedy: one block per batch row, grid (B), dynamic shared memory
};

// acc_size: 4 (float accumulation) or 8 (float64 features).
inline DppSelectPlan make_dpp_select_plan(long long B, long long N, long long D, long long k, int acc_size) {
  DppSelectPlan p;
  p.norms = kernel_launch(blocks_for(N, kRowsPerBlock), B, 1, kRowThreads);
  p.greedy = kernel_launch(B, 1, 1, kDppGreedyThreads, dpp_greedy_smem_bytes(N, D, k, acc_size));
  return p;
}

}  // namespace cuda
}  // namespace tokenreduce

// Launch plan of kcenter on CUDA (torch-free, CUDA-free): the mode, grids, blocks and
// shared memory of every kernel of kcenter_kernels.cuh. kcenter_launch.cu launches from it,
// kcenter_cuda.cpp checks its shared memory, and the NVRTC fallback
// (tokenreduce/nvrtc/kcenter.py) reads it through tokenreduce._C.plans.kcenter.
#pragma once

#include "../common/launch_plan.h"

namespace tokenreduce {
namespace cuda {

// Distance matrices up to this many bytes (B * N * N * sizeof(acc)) are materialised
// (Gram mode: one tiled GEMM, then every pick reads one row); larger problems recompute
// each pick's distances from x (stream mode).
constexpr long long kKcenterGramBudget = 1LL << 30;
constexpr int kKcenterSelectMaxThreads = 1024;  // __launch_bounds__ of kcenter_select

// Dynamic shared memory of kcenter_select: md [N] acc, (stream) pick row [D] acc, flags [N].
inline long long kcenter_select_smem_bytes(long long N, long long D, int acc_size, bool stream) {
  return (long long)N * acc_size + (stream ? (long long)D * acc_size : 0) + N;
}

// Stream mode reads whole rows per pick: all 1024 threads. Gram mode: one thread per token
// (rounded to warps), at least 2 warps.
inline int kcenter_select_threads(long long N, bool stream) {
  if (stream) return 1024;
  const long long t = ((N + 31) / 32) * 32;
  return t < 64 ? 64 : (t > kKcenterSelectMaxThreads ? kKcenterSelectMaxThreads : (int)t);
}

struct KcenterPlan {
  bool gram = false;   // distance matrix [B, N, N] materialised (else stream mode)
  KernelLaunch sqnorm; // kcenter_sqnorm: grid (ceil(N / 8), B)
  KernelLaunch tiles;  // kcenter_gram (Gram mode only): grid (ceil(N / 64), ceil(N / 64), B)
  KernelLaunch nn;     // first="isolated" only: kcenter_nn_gram or kcenter_nn_stream, like sqnorm
  KernelLaunch select; // kcenter_select<., stream>: grid (B), dynamic shared memory
};

// acc_size: 4 (float accumulation) or 8 (float64 inputs).
// gram_budget: the Gram matrix bytes above which the re-streaming kernels run (tests pass 0 to
// force them)
inline KcenterPlan make_kcenter_plan(long long B, long long N, long long D, int acc_size, bool isolated,
                                     long long gram_budget = kKcenterGramBudget) {
  KcenterPlan p;
  p.gram = B * N * N * acc_size <= gram_budget;
  const bool stream = !p.gram;
  p.sqnorm = kernel_launch(blocks_for(N, kRowsPerBlock), B, 1, kRowThreads);
  if (p.gram) p.tiles = kernel_launch(blocks_for(N, kTileRows), blocks_for(N, kTileRows), B, kTileBlock);
  if (isolated) p.nn = p.sqnorm;
  p.select = kernel_launch(B, 1, 1, kcenter_select_threads(N, stream),
                           kcenter_select_smem_bytes(N, D, acc_size, stream));
  return p;
}

}  // namespace cuda
}  // namespace tokenreduce

// Torch-free host launcher of the kcenter CUDA kernels (implemented in kcenter_launch.cu).
#pragma once

#include "../common/cuda_launch.h"

namespace tokenreduce {
namespace cuda {

// Distance matrices up to this many bytes (B * N * N * sizeof(acc)) are materialised
// (Gram mode: one tiled GEMM, then every pick reads one row); larger problems recompute
// each pick's distances from x (stream mode). tokenreduce/nvrtc/kcenter.py uses the same.
constexpr long long kKcenterGramBudget = 1LL << 30;

struct KcenterArgs {
  const void* x;                  // [B, N, D], unit stride on D
  long long sb, sn;               // batch and token strides of x (elements)
  int B, N, D;
  int cosine;                     // 1: 1 - cos, 0: Euclidean
  int k;                          // picks, 1 <= k <= N
  long long first_int;            // first pick when first_index is null (negative from the end)
  const long long* first_index;   // int64 [B] or nullptr
  int isolated;                   // DivPrune's start (first_int / first_index ignored)
  const bool* mask;               // bool [B, N] contiguous or nullptr
  void* sq;                       // workspace acc [B, N]
  void* dist;                     // workspace acc [B, N, N] (Gram mode) or nullptr (stream mode)
  long long* index;               // out int64 [B, k]
  void* mindist;                  // out acc [B, N]
};

// Dynamic shared memory the selection kernel needs (the glue compares it with the device's
// opt-in limit and raises before launching).
long long kcenter_select_smem(int N, int D, DType dtype, bool stream);

cudaError_t kcenter_launch(DType dtype, const KcenterArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tokenreduce

// Torch-free host launcher of the kcenter CUDA kernels (implemented in kcenter_launch.cu).
#pragma once

#include "../common/cuda_launch.h"
#include "kcenter_plan.h"

namespace tokenreduce {
namespace cuda {

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
  void* dist;                     // workspace acc [B, N, N] (Gram mode of make_kcenter_plan) or nullptr
  long long* index;               // out int64 [B, k]
  void* mindist;                  // out acc [B, N]
};

// Launches the kernels as make_kcenter_plan (kcenter_plan.h) says; args.dist must be set
// exactly when the plan is in Gram mode.
cudaError_t kcenter_launch(DType dtype, const KcenterArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tokenreduce

// Torch-free host launcher of the dpp_select CUDA kernels (implemented in dpp_select_launch.cu).
#pragma once

#include "../common/cuda_launch.h"
#include "dpp_select_plan.h"

namespace tokenreduce {
namespace cuda {

struct DppSelectArgs {
  const void* features;   // [B, N, D], unit stride on D
  long long sb, sn;       // batch and token strides of features (elements)
  int B, N, D;
  int k;                  // picks, 1 <= k <= N
  const void* relevance;  // acc [B, N] contiguous or nullptr
  const bool* mask;       // bool [B, N] contiguous or nullptr
  void* inv;              // workspace acc [B, N]
  void* diag;             // workspace acc [B, N]
  void* chol;             // workspace acc [B, k, N]
  long long* index;       // out int64 [B, k]
  void* gains;            // out acc [B, k]
};

// Launches the kernels as make_dpp_select_plan (dpp_select_plan.h) says.
cudaError_t dpp_select_launch(DType dtype, const DppSelectArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tokenreduce

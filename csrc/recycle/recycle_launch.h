// Torch-free host launcher of the recycle CUDA kernels (recycle_launch.cu).
#pragma once

#include "../common/cuda_launch.h"
#include "recycle_plan.h"

namespace tokenreduce {
namespace cuda {

struct RecycleArgs {
  const void* x;                // [B, N, D], unit stride on D
  long long xsb, xsn;
  const void* feats;            // [B, N, Df] unit stride on Df, or nullptr when assign is given
  long long fsb, fsn;
  int B, N, D, Df, T, S;
  int include_target;
  const long long* target;      // int64 [B, T] contiguous
  const long long* source;      // int64 [B, S] contiguous
  const void* weight;           // acc(x) [B, N] contiguous or nullptr
  long long* slot;              // int64 [B, S]: in/out (holds a copy of assign when given)
  // workspaces
  void* inv;                    // acc(feats) [B, N] (only when feats)
  int* off;                     // [B, T + 1]
  int* mem;                     // [B, max(S, 1)]
  int* bad;                     // [B]
  // outputs
  void* out;                    // x dtype [B, T, D] contiguous
  long long* count;             // int64 [B, T]
  void* wsum;                   // acc(x) [B, T]
};

long long recycle_plan_smem(int T);

cudaError_t recycle_launch(DType x_dtype, DType feats_dtype, const RecycleArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tokenreduce

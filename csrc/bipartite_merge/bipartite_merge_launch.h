// Torch-free host launcher of the bipartite_merge CUDA kernels (bipartite_merge_launch.cu).
#pragma once

#include "../common/cuda_launch.h"
#include "bipartite_merge_plan.h"

namespace tokenreduce {
namespace cuda {

struct BipartiteMergeArgs {
  const void* x;            // [B, N, D], unit stride on D
  long long xsb, xsn;
  const void* metric;       // [B, N, Dm], unit stride on Dm
  long long msb, msn;
  int B, N, D, Dm, r, protect;
  int tome;                 // 1: ToMe order, 0: spatial
  const void* size;         // acc(x) [B, N] contiguous
  // workspaces (see bipartite_merge_workspace_bytes)
  void* inv;                // acc(metric) [B, N]
  void* node_max;           // acc(metric) [B, Na]
  int* node_idx;            // [B, Na]
  int* owner;               // [B, N - r]
  int* off;                 // [B, N / 2 + 1]
  int* mem;                 // [B, max(r, 1)]
  int* bad;                 // [B]
  // outputs
  void* merged;             // x dtype [B, N - r, D] contiguous
  void* size_out;           // acc(x) [B, N - r]
  long long* source;        // int64 [B, N]
};

// Dynamic shared memory of the per-row planning kernel (the glue checks it against the
// device limit and raises before launching).
long long bipartite_merge_plan_smem(int N, DType metric_dtype);

// r >= 1 (the glue handles r == 0 with copies).
cudaError_t bipartite_merge_launch(DType x_dtype, DType metric_dtype, const BipartiteMergeArgs& args,
                                   cudaStream_t stream);

}  // namespace cuda
}  // namespace tokenreduce

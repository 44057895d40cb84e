// Torch-free host launcher of the region_attention CUDA kernel (region_attention_launch.cu).
#pragma once

#include "../common/cuda_launch.h"
#include "region_attention_plan.h"

namespace tokenreduce {
namespace cuda {

struct RegionAttentionArgs {
  const void* q;                  // [B, M, C], unit stride on C
  long long qsb, qsm;
  const void* k;                  // [B, L, N, C], unit stride on C
  long long ksb, ksl, ksn;
  const void* v;                  // [B, L, N, Cv], unit stride on Cv
  long long vsb, vsl, vsn;
  int B, M, grid_w, region, L, heads, Dh, Dv;
  double scale;
  void* out;                      // q dtype [B, M, Cv] contiguous
  void* lse;                      // acc(q) [B, M, heads] contiguous
};

long long region_attention_plan_smem(int L, int region, DType dtype);

cudaError_t region_attention_launch(DType dtype, const RegionAttentionArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace tokenreduce

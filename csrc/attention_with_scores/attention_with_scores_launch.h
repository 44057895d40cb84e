// Host interface of the attention_with_scores CUDA kernels (torch-free).
//
// The torch glue (attention_with_scores_cuda.cpp) asks for a Plan, allocates the buffers
// the plan names, then calls launch(). The NVRTC fallback launches from the same plan
// (tokenreduce._C.plans.attention_with_scores).
#pragma once

#include <cuda_runtime_api.h>

#include "attention_with_scores_plan.h"

namespace tokenreduce {
namespace attn {

// Pointers are device pointers of the dtype (acc = float, or double for kFloat64).
// q/k/v strides in elements (last dim contiguous); bias [B, Nk] acc contiguous or null;
// rows [R] int64 or null; out [B, H, Nq, Dv] contiguous; scores [B, Nk] acc.
// Workspaces as the plan says (null when not needed). Enqueues on `stream`, no sync.
cudaError_t launch(int dtype, const Plan& plan, const void* q, const void* k, const void* v,
                   const long long* qs, const long long* ks, const long long* vs, const void* bias,
                   const long long* rows, long long R, int B, int H, int Hkv, int Nq, int Nk, int Dh,
                   int Dv, double scale, bool causal, void* out, void* scores, void* partial, void* lse,
                   void* oacc, cudaStream_t stream);

}  // namespace attn
}  // namespace tokenreduce

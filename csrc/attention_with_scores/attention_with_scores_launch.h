// Host interface of the attention_with_scores CUDA kernels (torch-free).
//
// The torch glue (attention_with_scores_cuda.cpp) asks for a Plan, allocates the buffers
// the plan names, then calls launch(). tokenreduce/nvrtc/attention_with_scores.py mirrors
// make_plan() for the NVRTC fallback: change both together.
#pragma once

#include <cuda_runtime_api.h>

namespace tokenreduce {
namespace attn {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Limits of the kernels (the glue raises ValueError beyond them).
constexpr int kMaxHeadDim = 256;     // Dh and Dv
constexpr int kRowPathMaxRows = 8;   // score_rows with at most this many entries: scores from LSE
constexpr int kMaxGridYZ = 65535;    // H and B go to grid.y / grid.z

struct Plan {
  int kc = 0;                  // keys whose logits stay in shared memory per chunk (multiple of 64)
  int nqb = 0;                 // query blocks of 64 rows (forward grid.x)
  int nkt = 0;                 // key tiles of 64 (column-score grid.x)
  bool multi_chunk = false;    // Nk > kc: O kept in a workspace between chunks
  bool scores_in_fwd = false;  // column sums in the forward kernel (one chunk, many rows)
  bool colscore = false;       // column sums by the key-block-major pass from the LSE
  long long fwd_smem = 0;      // dynamic shared memory (bytes)
  long long colscore_smem = 0;
  long long partial_rows = 0;  // P of the partial column sums [B, P, Nk] (acc type)
  bool need_lse = false;       // LSE workspace [B, H, Nq] (acc type)
  bool need_oacc = false;      // O workspace [B, H, Nq, Dv] (acc type)
  bool ok = false;             // false: the shapes exceed the shared memory (see make_plan)
};

// R: number of score_rows entries, or -1 when every row is scored.
// smem_optin: the device's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
Plan make_plan(int dtype, int H, int Nq, int Nk, int Dh, int Dv, long long R, long long smem_optin);

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

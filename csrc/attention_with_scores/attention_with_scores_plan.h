// Launch planning of attention_with_scores on CUDA (host only, torch-free, no CUDA headers).
//
// The one place that picks the path and sizes shared memory: the CUDA launcher
// (attention_with_scores_launch.cu) launches from it and the NVRTC fallback
// (tokenreduce/nvrtc/attention_with_scores.py) reads the same plan from the compiled
// library (tokenreduce._C.plans.attention_with_scores); tests/test_attention_cuda_host.py
// compiles this header with g++ to check the binding returns what the header computes.
#pragma once

#if !defined(__CUDACC__) && !defined(TR_ATTN_LAYOUT_ONLY)
#define TR_ATTN_LAYOUT_ONLY
#endif
#include "attention_with_scores_kernels.cuh"

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
  int threads = kThreads;      // block of all three kernels
  long long reduce_blocks = 0; // reduction grid.x: ceil(Nk / threads)
};

inline bool is_mma(int dtype) { return dtype == kFloat16 || dtype == kBFloat16; }
inline int smem_elem_size(int dtype) { return is_mma(dtype) ? 2 : (dtype == kFloat64 ? 8 : 4); }
inline int acc_size(int dtype) { return dtype == kFloat64 ? 8 : 4; }

// largest multiple of 64 keys whose forward tiles fit in `budget` bytes (0 if none)
inline int max_chunk(int dtype, int Dh, long long budget) {
  const bool mma = is_mma(dtype);
  const long long fixed = fwd_smem_bytes(mma, Dh, smem_elem_size(dtype), acc_size(dtype), 0) -
                          s_bytes(0, acc_size(dtype));
  const long long per_row = (long long)kBQ * acc_size(dtype);  // bytes per key column of S
  long long kc = (budget - fixed - 16) / per_row - 4;           // s_ld(kc) = kc + 4
  if (kc < kBK) return 0;
  kc = kc / kBK * kBK;
  while (kc >= kBK && fwd_smem_bytes(mma, Dh, smem_elem_size(dtype), acc_size(dtype), (int)kc) > budget)
    kc -= kBK;
  return kc >= kBK ? (int)kc : 0;
}

// R: number of score_rows entries, or -1 when every row is scored.
// smem_optin: the device's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
inline Plan make_plan(int dtype, int H, int Nq, int Nk, int Dh, int Dv, long long R, long long smem_optin) {
  Plan p;
  const bool mma = is_mma(dtype);
  const int es = smem_elem_size(dtype), as = acc_size(dtype);
  p.nqb = (Nq + kBQ - 1) / kBQ;
  p.nkt = (Nk + kBK - 1) / kBK;
  p.reduce_blocks = ((long long)Nk + kThreads - 1) / kThreads;
  const int kc_max = max_chunk(dtype, Dh, smem_optin);
  if (kc_max == 0 || Dh > kMaxHeadDim || Dv > kMaxHeadDim) return p;  // ok = false
  const int kc_full = round_up(Nk, kBK);
  if (kc_full <= kc_max) {
    p.kc = kc_full;
  } else {
    // several chunks: prefer two CTAs per SM when the chunk stays >= 256 keys
    const int kc_half = max_chunk(dtype, Dh, smem_optin / 2 - 1024);
    p.kc = kc_half >= 256 ? kc_half : kc_max;
    p.multi_chunk = true;
  }
  const bool row_path = R >= 0 && R <= kRowPathMaxRows;
  p.scores_in_fwd = !p.multi_chunk && !row_path;
  p.colscore = !p.scores_in_fwd;
  p.need_lse = p.colscore;
  p.need_oacc = p.multi_chunk;
  p.partial_rows = p.scores_in_fwd ? (long long)H * p.nqb : (long long)H;
  p.fwd_smem = fwd_smem_bytes(mma, Dh, es, as, p.kc);
  p.colscore_smem = colscore_smem_bytes(mma, Dh, es, as);
  p.ok = p.colscore_smem <= smem_optin;
  return p;
}

}  // namespace attn
}  // namespace tokenreduce

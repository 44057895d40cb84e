// Host launchers of the attention_with_scores kernels (torch-free: raw pointers, strides,
// cudaStream_t). The path, grids and shared memory come from make_plan
// (attention_with_scores_plan.h), which the NVRTC fallback reads too.
//
// Paths:
//  * short keys (round_up(Nk, 64) logits of a 64-row block fit in shared memory), many
//    scored rows: one forward kernel writes out and per-block column sums, then the
//    deterministic reduction (2 launches);
//  * few scored rows (R <= kRowPathMaxRows, e.g. [CLS] or the last token): the forward
//    kernel writes out and the LSE only, the key-block-major pass scores the R rows from the
//    LSE (a GEMV-sized pass), then the reduction (3 launches);
//  * long keys: the forward walks key chunks with an online softmax (O in a workspace), writes
//    the LSE, then the key-block-major pass and the reduction (3 launches).
#include <atomic>

#include "attention_with_scores_kernels.cuh"
#include "attention_with_scores_launch.h"

namespace tokenreduce {
namespace attn {
namespace {

// 16-byte loads are safe: pointer aligned and every stride / width a multiple of the vector
bool vec_ok(const void* p, const long long* strides, int D, int esize) {
  const int vw = 16 / esize;
  if (reinterpret_cast<unsigned long long>(p) % 16 != 0 || D % vw != 0) return false;
  for (int e = 0; e < 3; ++e)
    if (strides[e] % vw != 0) return false;
  return true;
}

// Dynamic shared memory above 48 KiB needs an opt-in per kernel and device; remember the
// largest size granted so the common launch costs one cudaGetDevice.
constexpr int kMaxDevices = 64;
template <typename K>
cudaError_t set_smem(K kernel, long long bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::atomic<long long> granted[kMaxDevices];  // one table per kernel (K is its type)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kMaxDevices && granted[dev].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (err == cudaSuccess && dev >= 0 && dev < kMaxDevices) {
    long long cur = granted[dev].load(std::memory_order_relaxed);
    while (cur < bytes && !granted[dev].compare_exchange_weak(cur, bytes)) {
    }
  }
  return err;
}

template <typename T>
cudaError_t launch_typed(const Plan& plan, const T* q, const T* k, const T* v, const long long* qs,
                         const long long* ks, const long long* vs, const typename Traits<T>::acc* bias,
                         const long long* rows, long long R, int B, int H, int Hkv, int Nq, int Nk, int Dh,
                         int Dv, double scale, bool causal, T* out, typename Traits<T>::acc* scores,
                         typename Traits<T>::acc* partial, typename Traits<T>::acc* lse,
                         typename Traits<T>::acc* oacc, cudaStream_t stream) {
  typedef typename Traits<T>::acc acc;
  const int es = (int)sizeof(T);
  const int vqk = vec_ok(q, qs, Dh, es) && vec_ok(k, ks, Dh, es);
  const int vv = vec_ok(v, vs, Dv, es);
  const acc scale_log2 = (acc)(scale * 1.4426950408889634074);
  const int Rk = rows ? (int)R : 0;
  cudaError_t err = set_smem(attn_fwd_kernel<T>, plan.fwd_smem);
  if (err != cudaSuccess) return err;
  attn_fwd_kernel<T><<<dim3(plan.nqb, H, B), plan.threads, plan.fwd_smem, stream>>>(
      q, k, v, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], bias, rows, Rk, out,
      plan.need_lse ? lse : nullptr, plan.need_oacc ? oacc : nullptr, plan.scores_in_fwd ? partial : nullptr,
      H, Hkv, Nq, Nk, Dh, Dv, scale_log2, causal ? 1 : 0, plan.kc, vqk, vv);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (plan.colscore) {
    err = set_smem(attn_colscore_kernel<T>, plan.colscore_smem);
    if (err != cudaSuccess) return err;
    attn_colscore_kernel<T><<<dim3(plan.nkt, H, B), plan.threads, plan.colscore_smem, stream>>>(
        q, k, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], bias, rows, Rk, lse, partial, H, Hkv, Nq, Nk, Dh,
        scale_log2, causal ? 1 : 0, vqk);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const long long Reff = rows ? R : Nq;
  const acc inv_denom = (acc)(1.0 / ((double)H * (double)Reff));
  attn_reduce_scores_kernel<acc><<<dim3((unsigned)plan.reduce_blocks, B), plan.threads, 0, stream>>>(
      partial, (int)plan.partial_rows, Nk, inv_denom, scores);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch(int dtype, const Plan& plan, const void* q, const void* k, const void* v,
                   const long long* qs, const long long* ks, const long long* vs, const void* bias,
                   const long long* rows, long long R, int B, int H, int Hkv, int Nq, int Nk, int Dh,
                   int Dv, double scale, bool causal, void* out, void* scores, void* partial, void* lse,
                   void* oacc, cudaStream_t stream) {
  if (!plan.ok) return cudaErrorInvalidValue;
#define TR_ATTN_LAUNCH(T)                                                                                \
  launch_typed<T>(plan, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), qs, ks, \
                  vs, static_cast<const Traits<T>::acc*>(bias), rows, R, B, H, Hkv, Nq, Nk, Dh, Dv, scale,   \
                  causal, static_cast<T*>(out), static_cast<Traits<T>::acc*>(scores),                        \
                  static_cast<Traits<T>::acc*>(partial), static_cast<Traits<T>::acc*>(lse),                  \
                  static_cast<Traits<T>::acc*>(oacc), stream)
  switch (dtype) {
    case kFloat32: return TR_ATTN_LAUNCH(float);
    case kFloat16: return TR_ATTN_LAUNCH(__half);
    case kBFloat16: return TR_ATTN_LAUNCH(__nv_bfloat16);
    case kFloat64: return TR_ATTN_LAUNCH(double);
    default: return cudaErrorInvalidValue;
  }
#undef TR_ATTN_LAUNCH
}

}  // namespace attn
}  // namespace tokenreduce

// dpp_select on CUDA: device code (torch-free; compiled by nvcc and by NVRTC).
//
// Pipeline per call (one stream, no host sync):
//   1. dpp_norms   inverse norm and L_ii = r^2 S_ii of every token (warp per token)
//   2. dpp_greedy  ONE persistent block per batch row runs all k picks: d2, L_ii, r and the
//                  flags live in shared memory; per pick the block arg-max (packed keys,
//                  ties to the smallest index) gives j, the pick's unit row is staged in
//                  shared memory, each warp computes S_ji of its tokens (lanes over D), and
//                  each thread forms e_i = (r_j r_i S_ji - <c_j, c_i>) / sqrt(d2_j) from the
//                  Cholesky rows chol [B, k, N] (global workspace) and lowers d2_i.
// The gain-0 rule is the CPU kernel's (dpp_select_cpu.cpp): once the best d2 is not above
// eps * max eligible L_ii, every later pick is the unpicked token of the largest
// (eligible, L_ii), ties to the smallest index, gain 0. NaN/Inf cannot raise without a host
// sync: a NaN d2 never wins (such a row ends in fallback picks).
#pragma once

#include "../common/cuda_common.cuh"

namespace tokenreduce {
namespace cuda {
namespace dpp {

template <typename acc> __device__ __forceinline__ acc degenerate_eps();
template <> __device__ __forceinline__ float degenerate_eps<float>() { return 1e-5f; }
template <> __device__ __forceinline__ double degenerate_eps<double>() { return 1e-10; }

constexpr unsigned char kEligible = 1, kPicked = 2;

// 1. inv[b, n] = 1 / max(||x||, 1e-12); diag[b, n] = r^2 S_nn (S_nn = 1, ||x||^2 / 1e-24 below
// the norm floor). rel: acc [B, N] contiguous or nullptr. grid (ceil(N / 8), B), block 256.
template <typename scalar_t>
__global__ void __launch_bounds__(256) dpp_norms(const scalar_t* __restrict__ x, long long sb, long long sn,
                                                 int N, int D, const acc_t<scalar_t>* __restrict__ rel,
                                                 acc_t<scalar_t>* __restrict__ inv,
                                                 acc_t<scalar_t>* __restrict__ diag) {
  typedef acc_t<scalar_t> acc;
  const int b = blockIdx.y;
  const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (n >= N) return;
  const acc s = warp_row_sqnorm(x + b * sb + n * sn, D);
  if ((threadIdx.x & 31) == 0) {
    const long long o = (long long)b * N + n;
    const acc iv = inv_norm_from_sq(s);
    const acc snn = !(s < acc(1e-24)) ? acc(1) : s * iv * iv;
    const acc r = rel != nullptr ? rel[o] : acc(1);
    inv[o] = iv;
    diag[o] = r * r * snn;
  }
}

// The block arg-max of `vals` over the tokens whose flags, masked by `mask_bits`, equal
// `want`; every thread gets it.
template <typename acc>
__device__ __forceinline__ Best<acc> block_best(int N, const unsigned char* flags, unsigned char mask_bits,
                                                unsigned char want, const acc* vals, Best<acc>* red) {
  Best<acc> best;
  best.reset();
  for (int i = threadIdx.x; i < N; i += blockDim.x)
    if ((flags[i] & mask_bits) == want) best.push(vals[i], i);
  return block_argmax(best, red);
}

// 2. The greedy of batch row blockIdx.x. grid (B), block kDppGreedyThreads (a multiple of 32),
// dynamic shared memory dpp_greedy_smem_bytes (dpp_select_plan.h). mask: bool [B, N]
// contiguous or nullptr; chol: acc workspace [B, k, N]; index int64 [B, k]; gains acc [B, k].
template <typename scalar_t>
__global__ void __launch_bounds__(512) dpp_greedy(const scalar_t* __restrict__ x, long long sb, long long sn,
                                                  int N, int D, int k, const acc_t<scalar_t>* __restrict__ rel,
                                                  const bool* __restrict__ mask,
                                                  const acc_t<scalar_t>* __restrict__ inv,
                                                  const acc_t<scalar_t>* __restrict__ diag_in,
                                                  acc_t<scalar_t>* __restrict__ chol, long long* __restrict__ index,
                                                  acc_t<scalar_t>* __restrict__ gains) {
  typedef acc_t<scalar_t> acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* d2 = reinterpret_cast<acc*>(smem_raw);
  acc* diag = d2 + N;
  acc* r = diag + N;
  acc* uj = r + N;
  acc* cj = uj + D;
  unsigned char* flags = reinterpret_cast<unsigned char*>(cj + k);
  __shared__ Best<acc> red[33];
  const int b = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  const long long o = (long long)b * N;
  const scalar_t* xb = x + b * sb;
  acc* cb = chol + (long long)b * k * N;
  for (int i = tid; i < N; i += blockDim.x) {
    diag[i] = diag_in[o + i];
    d2[i] = diag[i];
    r[i] = rel != nullptr ? rel[o + i] : acc(1);
    flags[i] = (mask == nullptr || mask[o + i]) ? kEligible : 0;
  }
  __syncthreads();
  acc tau;
  {
    const Best<acc> top = block_best<acc>(N, flags, kEligible, kEligible, diag, red);
    tau = degenerate_eps<acc>() * (top.valid() && top.value() > acc(0) ? top.value() : acc(0));
  }
  bool degenerate = false;  // block-uniform: decided from block-wide results
  for (int t = 0; t < k; ++t) {
    int j = -1;
    acc g = acc(0);
    if (!degenerate) {
      const Best<acc> best = block_best<acc>(N, flags, kEligible | kPicked, kEligible, d2, red);
      if (!best.valid() || !(best.value() > tau)) {
        degenerate = true;
      } else {
        j = best.index();
        g = best.value();
      }
    }
    if (degenerate) {  // the fallback: largest (eligible, L_ii) among the unpicked, gain 0
      Best<acc> f = block_best<acc>(N, flags, kEligible | kPicked, kEligible, diag, red);
      if (!f.valid()) f = block_best<acc>(N, flags, kPicked, 0, diag, red);
      j = f.index();
      if (j < 0) {  // NaN L_ii everywhere left: the first unpicked
        for (int i = 0; i < N; ++i)
          if ((flags[i] & kPicked) == 0) { j = i; break; }
      }
      g = acc(0);
    }
    __syncthreads();
    if (tid == 0) {
      index[(long long)b * k + t] = j;
      gains[(long long)b * k + t] = g;
      flags[j] |= kPicked;
    }
    __syncthreads();
    if (degenerate || t + 1 == k) continue;
    const acc ivj = inv[o + j];
    for (int d = tid; d < D; d += blockDim.x) uj[d] = to_acc(xb[(long long)j * sn + d]) * ivj;
    for (int u = tid; u < t; u += blockDim.x) cj[u] = cb[(long long)u * N + j];
    __syncthreads();
    acc* e = cb + (long long)t * N;
    const acc rj = r[j];
    for (int i = warp; i < N; i += nwarps) {  // S_ji = <u_j, x_i> / ||x_i||, lanes over D
      const scalar_t* xi = xb + (long long)i * sn;
      acc s = acc(0);
      for (int d = lane; d < D; d += 32) s += uj[d] * to_acc(xi[d]);
      s = warp_sum(s);
      if (lane == 0) e[i] = rj * r[i] * (s * inv[o + i]);
    }
    __syncthreads();
    const acc scale = acc(1) / sqrt(g);
    for (int i = tid; i < N; i += blockDim.x) {
      acc v = e[i];
      for (int u = 0; u < t; ++u) v -= cj[u] * cb[(long long)u * N + i];
      v *= scale;
      e[i] = v;
      d2[i] -= v * v;
    }
    __syncthreads();
  }
}

}  // namespace dpp
}  // namespace cuda
}  // namespace tokenreduce

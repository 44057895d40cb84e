// region_attention on CUDA: device code (torch-free; compiled by nvcc and by NVRTC).
//
// One warp per (batch row, query, head), 8 warps per block (region_attention_plan.h):
//   1. the R = L * region^2 logits of the query's own window, one warp-reduced dot product
//      per key (lanes stride over the head dim, coalesced), kept in the warp's slice of the
//      dynamic shared memory;
//   2. a stable softmax over them (max, exp, sum; lse = max + log sum for the backward);
//   3. out[d] = sum_r p_r v_r[d], lanes striding over the value head dim (coalesced).
// No host sync, no atomics; every output element is written by exactly one lane.
#pragma once

#include "../common/cuda_common.cuh"

namespace tokenreduce {
namespace cuda {
namespace region_attention {

__device__ __forceinline__ float ra_exp(float x) { return expf(x); }
__device__ __forceinline__ double ra_exp(double x) { return exp(x); }
__device__ __forceinline__ float ra_log(float x) { return logf(x); }
__device__ __forceinline__ double ra_log(double x) { return log(x); }

// q [B, M, heads * Dh] (strides qsb, qsm; unit on channels), k [B, L, N, heads * Dh] and
// v [B, L, N, heads * Dv] (strides sb, sl, sn; unit on channels), N = (region grid_h)
// (region grid_w), M = grid_h grid_w. out [B, M, heads * Dv] contiguous, lse [B, M, heads].
// grid (ceil(B * M * heads / 8)), block 256, dynamic smem 8 * L * region^2 * sizeof(acc).
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    ra_forward(const scalar_t* __restrict__ q, long long qsb, long long qsm, const scalar_t* __restrict__ k,
               long long ksb, long long ksl, long long ksn, const scalar_t* __restrict__ v, long long vsb,
               long long vsl, long long vsn, int B, int M, int grid_w, int region, int L, int heads, int Dh,
               int Dv, acc_t<scalar_t> scale, scalar_t* __restrict__ out, acc_t<scalar_t>* __restrict__ lse) {
  typedef acc_t<scalar_t> acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int ss = region * region, R = L * ss, W = region * grid_w;
  acc* w = reinterpret_cast<acc*>(smem_raw) + (long long)warp * R;
  const long long task = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
  if (task >= (long long)B * M * heads) return;
  const int h = static_cast<int>(task % heads);
  const long long bm = task / heads;
  const int b = static_cast<int>(bm / M), m = static_cast<int>(bm % M);
  const int i = m / grid_w, j = m % grid_w;
  const scalar_t* qrow = q + b * qsb + m * qsm + (long long)h * Dh;
  for (int r = 0; r < R; ++r) {
    const int l = r / ss, rr = r % ss;
    const long long n = (long long)(i * region + rr / region) * W + j * region + rr % region;
    const scalar_t* krow = k + b * ksb + l * ksl + n * ksn + (long long)h * Dh;
    acc part = acc(0);
    for (int d = lane; d < Dh; d += 32) part += to_acc(qrow[d]) * to_acc(krow[d]);
    part = warp_sum(part);
    if (lane == 0) w[r] = part * scale;
  }
  __syncwarp();
  acc mx = -pos_inf<acc>();
  for (int r = 0; r < R; ++r) mx = w[r] > mx ? w[r] : mx;
  acc sum = acc(0);
  for (int r = 0; r < R; ++r) sum += ra_exp(w[r] - mx);
  __syncwarp();
  const acc inv = acc(1) / sum;
  for (int r = lane; r < R; r += 32) w[r] = ra_exp(w[r] - mx) * inv;
  __syncwarp();
  if (lane == 0) lse[bm * heads + h] = mx + ra_log(sum);
  scalar_t* orow = out + bm * ((long long)heads * Dv) + (long long)h * Dv;
  for (int d = lane; d < Dv; d += 32) {
    acc o = acc(0);
    for (int r = 0; r < R; ++r) {
      const int l = r / ss, rr = r % ss;
      const long long n = (long long)(i * region + rr / region) * W + j * region + rr % region;
      o += w[r] * to_acc(v[b * vsb + l * vsl + n * vsn + (long long)h * Dv + d]);
    }
    store_acc(orow + d, o);
  }
}

}  // namespace region_attention
}  // namespace cuda
}  // namespace tokenreduce

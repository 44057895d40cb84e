// recycle on CUDA: device code (torch-free; compiled by nvcc and by NVRTC).
//
// Pipeline per call (one stream, no host sync, no atomics on data, deterministic):
//   1. rc_inv_norm   (no `assign`) 1 / ||feature row|| per token; NaN marks a non-finite row.
//   2. rc_assign     (no `assign`) for 64 sources per block, a tile GEMM of the gathered
//                    source feature rows against the gathered target rows with a fused
//                    row arg-max (ties to the smaller target slot): slot [B, S].
//   3. rc_plan       one block per batch row: validates positions / slots, counts the
//                    members of every slot and groups the sources by slot in ascending
//                    source order (counting sort; warp match_any for the stable placement).
//   4. rc_aggregate  one block per (slot, batch row): the weighted mean of the target (when
//                    include_target) and its sources, in the CPU kernel's order.
//
// Data-dependent errors (the CPU raises: a position outside [0, N), an assign slot outside
// [-1, T), non-finite compared features) would need a host sync on CUDA. The batch row is
// poisoned instead: out[b] and weight_sum[b] are NaN, count[b] is 0 and slot[b] is -1.
// Out-of-range positions are never dereferenced.
#pragma once

#include "../common/cuda_common.cuh"

namespace tokenreduce {
namespace cuda {
namespace recycle {

// 1. inv[b, n] = 1 / max(||f[b, n]||, 1e-12), NaN if not finite. grid (ceil(N / 8), B), block 256.
template <typename fscalar_t>
__global__ void __launch_bounds__(256) rc_inv_norm(const fscalar_t* __restrict__ f, long long sb,
                                                   long long sn, int N, int D,
                                                   acc_t<fscalar_t>* __restrict__ inv) {
  typedef acc_t<fscalar_t> acc;
  const int b = blockIdx.y;
  const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (n >= N) return;
  const acc s = warp_row_sqnorm(f + b * sb + n * sn, D);
  if ((threadIdx.x & 31) == 0) inv[(long long)b * N + n] = isfinite(s) ? inv_norm_from_sq(s) : quiet_nan<acc>();
}

template <typename fscalar_t> struct TargetCols {  // column t = token target[b, t]
  const fscalar_t* base;
  long long sn;
  const acc_t<fscalar_t>* inv;
  const long long* target;
  int N;
  __device__ __forceinline__ void operator()(int t, const fscalar_t*& p, acc_t<fscalar_t>& s) const {
    const long long pos = target[t];
    if (pos >= 0 && pos < N) {
      p = base + pos * sn;
      s = inv[pos];
    } else {  // invalid: the plan poisons the row; never dereferenced
      p = nullptr;
      s = quiet_nan<acc_t<fscalar_t>>();
    }
  }
};

// 2. slot[b, e] = argmax_t cos(f[source[b, e]], f[target[b, t]]). grid (ceil(S / 64), B),
// block kTileThreads. T >= 1.
template <typename fscalar_t>
__global__ void __launch_bounds__(kTileThreads)
    rc_assign(const fscalar_t* __restrict__ f, long long sb, long long sn, int N, int D,
              const acc_t<fscalar_t>* __restrict__ inv, const long long* __restrict__ target, int T,
              const long long* __restrict__ source, int S, long long* __restrict__ slot) {
  typedef acc_t<fscalar_t> acc;
  __shared__ TileSmem<fscalar_t> sm;
  __shared__ const fscalar_t* rows_a[kTileM];
  __shared__ const fscalar_t* rows_b[kTileM];
  __shared__ acc scale_b[kTileM];
  const int b = blockIdx.y, e0 = blockIdx.x * kTileM, tid = threadIdx.x;
  const fscalar_t* base = f + b * sb;
  const long long* srcb = source + (long long)b * S;
  if (tid < kTileM) {
    const int e = e0 + tid;
    const long long pos = e < S ? srcb[e] : -1;
    rows_a[tid] = (pos >= 0 && pos < N) ? base + pos * sn : nullptr;
  }
  __syncthreads();
  TargetCols<fscalar_t> cols;
  cols.base = base;
  cols.sn = sn;
  cols.inv = inv + (long long)b * N;
  cols.target = target + (long long)b * T;
  cols.N = N;
  Best<acc> best[4];
  tile_rows_argmax<fscalar_t, acc>(rows_a, rows_b, scale_b, cols, 0, T, D, sm, best);
  if ((tid & 15) == 0) {
    const int ty = tid >> 4;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = e0 + ty + 16 * r;
      if (e < S) slot[(long long)b * S + e] = best[r].index();  // -1 only for a poisoned row
    }
  }
}

// (Grids, blocks and the dynamic shared memory of these kernels: recycle_plan.h.)

// 3. grid (B), block 512. inv: the feature inverse norms when the slots were computed
// (checked at the gathered positions), nullptr when `assign` was given (slots checked).
// Outputs: count [B, T] int64, off [B, T + 1] int, mem [B, max(S, 1)] int (source
// positions), bad [B] int; slot[b] is set to -1 on a poisoned row.
__global__ void __launch_bounds__(512)
    rc_plan(const long long* __restrict__ target, const long long* __restrict__ source,
            long long* __restrict__ slot, const float* __restrict__ inv_f, const double* __restrict__ inv_d,
            int N, int T, int S, int include_target, long long* __restrict__ count, int* __restrict__ off,
            int* __restrict__ mem, int* __restrict__ bad) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int* cnt = reinterpret_cast<int*>(smem_raw);
  __shared__ int sm[33];
  const int b = blockIdx.x, tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
  const long long* tb = target + (long long)b * T;
  const long long* sbp = source + (long long)b * S;
  long long* sl = slot + (long long)b * S;
  const int Sm = S > 0 ? S : 1;
  int invalid = 0;
  for (int t = tid; t <= T; t += nt) cnt[t] = 0;
  for (int t = tid; t < T; t += nt) {
    const long long p = tb[t];
    if (p < 0 || p >= N) invalid = 1;
    else if (inv_f && inv_f[(long long)b * N + p] != inv_f[(long long)b * N + p]) invalid = 1;
    else if (inv_d && inv_d[(long long)b * N + p] != inv_d[(long long)b * N + p]) invalid = 1;
  }
  for (int e = tid; e < S; e += nt) {
    const long long p = sbp[e];
    const long long s = sl[e];
    if (p < 0 || p >= N || s < -1 || s >= T) invalid = 1;
    else if (inv_f && (s < 0 || inv_f[(long long)b * N + p] != inv_f[(long long)b * N + p])) invalid = 1;
    else if (inv_d && (s < 0 || inv_d[(long long)b * N + p] != inv_d[(long long)b * N + p])) invalid = 1;
  }
  invalid = __syncthreads_or(invalid);
  if (invalid) {
    if (tid == 0) bad[b] = 1;
    for (int t = tid; t < T; t += nt) count[(long long)b * T + t] = 0;
    for (int e = tid; e < S; e += nt) sl[e] = -1;
    return;
  }
  if (tid == 0) bad[b] = 0;
  for (int e = tid; e < S; e += nt) {
    const long long s = sl[e];
    if (s >= 0) atomicAdd(&cnt[s], 1);  // counts only: the order comes from the warp pass
  }
  __syncthreads();
  for (int t = tid; t < T; t += nt)
    count[(long long)b * T + t] = cnt[t] + (include_target ? 1 : 0);
  __syncthreads();
  const int total = block_exclusive_scan(cnt, T, sm);
  int* offb = off + (long long)b * (T + 1);
  for (int t = tid; t < T; t += nt) offb[t] = cnt[t];
  if (tid == 0) offb[T] = total;
  __syncthreads();
  if (tid < 32) {  // stable placement in ascending source order
    int* memb = mem + (long long)b * Sm;
    for (int e0 = 0; e0 < S; e0 += 32) {
      const int e = e0 + lane;
      const int s = e < S ? static_cast<int>(sl[e]) : -1;
      const unsigned group = __match_any_sync(kFullMask, s);
      if (s >= 0) memb[cnt[s] + __popc(group & ((1u << lane) - 1u))] = static_cast<int>(sbp[e]);
      __syncwarp();
      if (s >= 0 && lane == 31 - __clz(group)) cnt[s] += __popc(group);
      __syncwarp();
    }
  }
}

// 4. out[b, t] = (w_target x_target + sum_sources w_i x_i) / (sum of those w); a slot with
// no member or zero total weight is 0. grid (T, B), block 128. weight: acc [B, N] or nullptr.
// V > 1: V elements per 16-byte access (the launcher checks alignment and D % V == 0).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(128)
    rc_aggregate(const scalar_t* __restrict__ x, long long sb, long long sn, int N, int D, int T, int S,
                 const long long* __restrict__ target, const acc_t<scalar_t>* __restrict__ weight,
                 const int* __restrict__ off, const int* __restrict__ mem, const int* __restrict__ bad,
                 int include_target, scalar_t* __restrict__ out, acc_t<scalar_t>* __restrict__ wsum) {
  typedef acc_t<scalar_t> acc;
  const int t = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  scalar_t* orow = out + ((long long)b * T + t) * D;
  if (bad[b]) {
    for (int d = tid; d < D; d += blockDim.x) store_acc(orow + d, quiet_nan<acc>());
    if (tid == 0) wsum[(long long)b * T + t] = quiet_nan<acc>();
    return;
  }
  const scalar_t* xb = x + b * sb;
  const acc* wb = weight ? weight + (long long)b * N : nullptr;
  const int* offb = off + (long long)b * (T + 1);
  const int lo = offb[t], hi = offb[t + 1];
  const int* memb = mem + (long long)b * (S > 0 ? S : 1);
  const long long tp = target[(long long)b * T + t];
  const int dlim = D > 0 ? D : 1;  // one pass even when D == 0: wsum is still due
  for (int d0 = tid * V; d0 < dlim; d0 += blockDim.x * V) {
    const bool in = d0 < D;
    acc row[V];
#pragma unroll
    for (int q = 0; q < V; ++q) row[q] = acc(0);
    acc total = acc(0);
    if (include_target) {
      const acc w = wb ? wb[tp] : acc(1);
      if (in) axpy_vec<scalar_t, V>(xb + tp * sn + d0, w, row);
      total += w;
    }
    for (int e = lo; e < hi; ++e) {
      const int i = memb[e];
      const acc w = wb ? wb[i] : acc(1);
      if (in) axpy_vec<scalar_t, V>(xb + i * sn + d0, w, row);
      total += w;
    }
    if (in) {
      const acc inv = total != acc(0) ? acc(1) / total : acc(0);
#pragma unroll
      for (int q = 0; q < V; ++q) row[q] *= inv;
      store_vec<scalar_t, V>(orow + d0, row);
    }
    if (d0 == 0) wsum[(long long)b * T + t] = total;
  }
}

}  // namespace recycle
}  // namespace cuda
}  // namespace tokenreduce

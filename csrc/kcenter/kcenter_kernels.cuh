// kcenter on CUDA: device code (torch-free; compiled by nvcc and by NVRTC).
//
// Pipeline per call (all on one stream, no host sync):
//   1. kcenter_sqnorm      squared norm of every token (warp per token) -> sq [B, N]
//   2a. Gram mode (B * N * N distances fit the budget):
//       kcenter_gram       64 x 64 tiles of the pairwise distance matrix dist [B, N, N]
//                          (upper tiles only, mirrored; tensor cores for 16-bit inputs)
//       kcenter_nn_gram    (first="isolated") each token's nearest-other distance
//   2b. Stream mode (too large for a distance matrix):
//       kcenter_nn_stream  (first="isolated") nearest-other distance by warp dot products
//   3. kcenter_select      ONE persistent block per batch row runs all k picks: the
//                          running min-distances and the eligibility flags live in shared
//                          memory; per pick each thread lowers the min-distance of its
//                          tokens with the new pick's distance row (read from dist, or
//                          computed from x in stream mode) and the block arg-max
//                          (packed keys, ties to the smallest index) gives the next pick.
//
// Data-dependent errors (the CPU kernel raises: NaN/Inf in x, k above the eligible count,
// a tensor `first` out of range or masked out) cannot raise on CUDA without a host sync.
// Instead the batch row is poisoned: index[b, :] = -1 and mindist[b, :] = NaN.
// (The glue still raises for everything decidable on the host: shapes, dtypes, an int
// `first` out of range.)
#pragma once

#include "../common/cuda_common.cuh"

namespace tokenreduce {
namespace cuda {
namespace kcenter {

// 1. sq[b, n] = ||x[b, n]||^2 (accumulator type). grid (ceil(N / 8), B), block 256.
template <typename scalar_t>
__global__ void __launch_bounds__(256) kcenter_sqnorm(const scalar_t* __restrict__ x, long long sb,
                                                      long long sn, int N, int D,
                                                      acc_t<scalar_t>* __restrict__ sq) {
  const int b = blockIdx.y;
  const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (n >= N) return;
  const acc_t<scalar_t> s = warp_row_sqnorm(x + b * sb + n * sn, D);
  if ((threadIdx.x & 31) == 0) sq[(long long)b * N + n] = s;
}

template <typename acc>
__device__ __forceinline__ acc cosine_or_l2(acc dot, acc sqi, acc sqj, bool cosine) {
  if (cosine) return acc(1) - dot * inv_norm_from_sq(sqi) * inv_norm_from_sq(sqj);
  const acc s = sqi + sqj - acc(2) * dot;
  return sqrt(s > acc(0) ? s : acc(0));
}

// 2a. dist[b, i, j] for a 64 x 64 tile and (off the diagonal) its mirror dist[b, j, i]: the
// matrix is symmetric, so only tiles with j-tile >= i-tile compute (half the GEMM); the
// mirrored tile is transposed through shared memory so both stores are coalesced.
// grid (ceil(N/64), ceil(N/64), B), block 256; blocks below the diagonal exit at once.
template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads)
    kcenter_gram(const scalar_t* __restrict__ x, long long sb, long long sn, int N, int D,
                 const acc_t<scalar_t>* __restrict__ sq, int cosine, acc_t<scalar_t>* __restrict__ dist) {
  typedef acc_t<scalar_t> acc;
  __shared__ TileSmem<scalar_t> sm;
  __shared__ const scalar_t* rows_a[kTileM];
  __shared__ const scalar_t* rows_b[kTileM];
  static_assert(sizeof(TileSmem<scalar_t>) >= sizeof(acc) * kTileM * (kTileM + 1), "mirror scratch");
  if (blockIdx.x < blockIdx.y) return;  // block-uniform: the mirror of another tile
  const int b = blockIdx.z, i0 = blockIdx.y * kTileM, j0 = blockIdx.x * kTileM;
  const int tid = threadIdx.x;
  const scalar_t* xb = x + b * sb;
  if (tid < kTileM) {
    rows_a[tid] = i0 + tid < N ? xb + (i0 + tid) * sn : nullptr;
    rows_b[tid] = j0 + tid < N ? xb + (j0 + tid) * sn : nullptr;
  }
  __syncthreads();
  acc c[4][4];
  tile_gemm(rows_a, rows_b, D, sm, c);  // ends with __syncthreads() whenever sm was used
  const int tx = tid & 15, ty = tid >> 4;
  const acc* sqb = sq + (long long)b * N;
  const bool mirror = blockIdx.x != blockIdx.y;
  acc(*scratch)[kTileM + 1] = reinterpret_cast<acc(*)[kTileM + 1]>(&sm);
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int il = ty + 16 * a, i = i0 + il;
    const acc sqi = i < N ? sqb[i] : acc(0);
    acc* drow = dist + ((long long)b * N + i) * N;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int jl = tx + 16 * e, j = j0 + jl;
      const acc d = (i < N && j < N) ? cosine_or_l2(c[a][e], sqi, sqb[j], cosine != 0) : acc(0);
      if (i < N && j < N) drow[j] = d;
      if (mirror) scratch[il][jl] = d;
    }
  }
  if (!mirror) return;  // block-uniform
  __syncthreads();
  for (int idx = tid; idx < kTileM * kTileM; idx += kTileThreads) {
    const int jl = idx / kTileM, il = idx % kTileM;  // consecutive threads: consecutive columns i
    const int i = i0 + il, j = j0 + jl;
    if (i < N && j < N) dist[((long long)b * N + j) * N + i] = scratch[il][jl];
  }
}

// nearest-other distance from the distance matrix (warp per token); N == 1 -> 0.
// grid (ceil(N / 8), B), block 256.
template <typename acc>
__global__ void __launch_bounds__(256) kcenter_nn_gram(const acc* __restrict__ dist, int N,
                                                       acc* __restrict__ nn) {
  const int b = blockIdx.y, lane = threadIdx.x & 31;
  const int i = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (i >= N) return;
  const acc* row = dist + ((long long)b * N + i) * N;
  acc m = pos_inf<acc>();
  for (int j = lane; j < N; j += 32) {
    const acc d = row[j];
    if (j != i) m = d < m ? d : m;
  }
  m = warp_min(m);
  if (lane == 0) nn[(long long)b * N + i] = N > 1 ? m : acc(0);
}

// distance between rows i and j of batch row xb by one warp (exact l2 as on the CPU).
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> warp_distance(const scalar_t* ri, const scalar_t* rj, int D,
                                                         acc_t<scalar_t> sqi, acc_t<scalar_t> sqj,
                                                         bool cosine) {
  typedef acc_t<scalar_t> acc;
  acc s = acc(0);
  if (cosine) {
    for (int d = threadIdx.x & 31; d < D; d += 32) s += to_acc(ri[d]) * to_acc(rj[d]);
    s = warp_sum(s);
    return acc(1) - s * inv_norm_from_sq(sqi) * inv_norm_from_sq(sqj);
  }
  for (int d = threadIdx.x & 31; d < D; d += 32) {
    const acc t = to_acc(ri[d]) - to_acc(rj[d]);
    s += t * t;
  }
  return sqrt(warp_sum(s));
}

// 2b. nearest-other distance without a distance matrix (warp per token, O(N^2 D)).
// grid (ceil(N / 8), B), block 256.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    kcenter_nn_stream(const scalar_t* __restrict__ x, long long sb, long long sn, int N, int D,
                      const acc_t<scalar_t>* __restrict__ sq, int cosine, acc_t<scalar_t>* __restrict__ nn) {
  typedef acc_t<scalar_t> acc;
  const int b = blockIdx.y, lane = threadIdx.x & 31;
  const int i = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (i >= N) return;
  const scalar_t* xb = x + b * sb;
  const acc* sqb = sq + (long long)b * N;
  acc m = pos_inf<acc>();
  for (int j = 0; j < N; ++j) {
    if (j == i) continue;
    const acc d = warp_distance(xb + i * sn, xb + j * sn, D, sqb[i], sqb[j], cosine != 0);
    m = d < m ? d : m;
  }
  if (lane == 0) nn[(long long)b * N + i] = N > 1 ? m : acc(0);
}

// (Grids, blocks and the dynamic shared memory of these kernels: kcenter_plan.h.)

// 3. the k picks of one batch row per block. grid (B), block <= 1024 (a multiple of 32).
//    dist: [B, N, N] (Gram mode) or unused (STREAM). nn: nearest-other distances when
//    isolated (it may alias mindist: it is read before mindist is written).
//    first_index: int64 [B] or nullptr (then first_int). mask: bool [B, N] or nullptr.
template <typename scalar_t, bool STREAM>
__global__ void __launch_bounds__(1024)
    kcenter_select(const scalar_t* __restrict__ x, long long sb, long long sn, int N, int D,
                   const acc_t<scalar_t>* __restrict__ sq, int cosine, const acc_t<scalar_t>* __restrict__ dist,
                   int k, long long first_int, const long long* __restrict__ first_index, int isolated,
                   const acc_t<scalar_t>* nn, const bool* __restrict__ mask,
                   long long* __restrict__ index, acc_t<scalar_t>* mindist) {
  typedef acc_t<scalar_t> acc;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc* md = reinterpret_cast<acc*>(smem_raw);
  acc* prow = md + N;  // STREAM only
  unsigned char* flag = reinterpret_cast<unsigned char*>(prow + (STREAM ? D : 0));  // 0 no, 1 eligible, 2 picked
  __shared__ Best<acc> red[33];
  __shared__ int isum[33];

  const int b = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
  const acc* sqb = sq + (long long)b * N;
  const scalar_t* xb = x + b * sb;
  long long* ib = index + (long long)b * k;
  acc* mdb = mindist + (long long)b * N;

  int nonfinite = 0, nelig = 0;
  for (int j = tid; j < N; j += nt) {
    if (!isfinite(sqb[j])) nonfinite = 1;
    const unsigned char e = mask ? (mask[(long long)b * N + j] ? 1 : 0) : 1;
    flag[j] = e;
    nelig += e;
    md[j] = pos_inf<acc>();
  }
  nonfinite = __syncthreads_or(nonfinite);
  nelig = block_sum_int(nelig, isum);  // also makes flag[] visible to the block

  int pick = -1;
  if (isolated) {  // DivPrune's start: the eligible token farthest from its nearest neighbour
    Best<acc> bb;
    bb.reset();
    for (int j = tid; j < N; j += nt)
      if (flag[j]) bb.push(nn[(long long)b * N + j], j);
    bb = block_argmax(bb, red);
    pick = bb.index();
  } else {
    long long f = first_index ? first_index[b] : first_int;
    if (f >= -(long long)N && f < (long long)N) {
      if (f < 0) f += N;
      pick = flag[f] ? static_cast<int>(f) : -1;
    }
  }
  if (nonfinite || k > nelig || pick < 0) {  // uniform over the block
    for (int j = tid; j < k; j += nt) ib[j] = -1;
    for (int j = tid; j < N; j += nt) mdb[j] = quiet_nan<acc>();
    return;
  }

  for (int i = 0; i < k; ++i) {
    if (tid == 0) ib[i] = pick;
    const bool last = i + 1 == k;
    Best<acc> bb;
    bb.reset();
    if (STREAM) {
      const scalar_t* pr = xb + pick * sn;
      for (int d = tid; d < D; d += nt) prow[d] = to_acc(pr[d]);
      __syncthreads();
      const acc sqp = sqb[pick];
      for (int j = warp; j < N; j += nwarps) {
        const scalar_t* rj = xb + j * sn;
        acc s = acc(0);
        acc dj;
        if (cosine) {
          for (int d = lane; d < D; d += 32) s += prow[d] * to_acc(rj[d]);
          s = warp_sum(s);
          dj = acc(1) - s * inv_norm_from_sq(sqp) * inv_norm_from_sq(sqb[j]);
        } else {
          for (int d = lane; d < D; d += 32) {
            const acc t = prow[d] - to_acc(rj[d]);
            s += t * t;
          }
          dj = sqrt(warp_sum(s));
        }
        if (lane == 0) md[j] = dj < md[j] ? dj : md[j];
      }
      __syncthreads();
      for (int j = tid; j < N; j += nt) {
        if (j == pick) flag[j] = 2;
        else if (!last && flag[j] == 1) bb.push(md[j], j);
      }
    } else {
      const acc* drow = dist + ((long long)b * N + pick) * N;
      for (int j = tid; j < N; j += nt) {
        const acc d = drow[j];
        acc m = md[j];
        m = d < m ? d : m;
        md[j] = m;
        if (j == pick) flag[j] = 2;
        else if (!last && flag[j] == 1) bb.push(m, j);
      }
    }
    if (!last) {
      bb = block_argmax(bb, red);
      pick = bb.index();
    }
  }
  // every thread reads back only tokens it owns (j = tid mod nt): md and flag writes of the
  // final pick were made by the same thread (Gram) or before the last __syncthreads (STREAM)
  for (int j = tid; j < N; j += nt) mdb[j] = flag[j] == 2 ? acc(0) : md[j];
}

}  // namespace kcenter
}  // namespace cuda
}  // namespace tokenreduce

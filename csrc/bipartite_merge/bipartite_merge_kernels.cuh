// bipartite_merge on CUDA: device code (torch-free; compiled by nvcc and by NVRTC).
//
// Pipeline per call (one stream, no host sync, no atomics on data, deterministic):
//   1. bm_inv_norm  1 / ||metric row|| per token (warp per token); NaN marks a non-finite row.
//   2. bm_match     for 64 A tokens per block, a tile GEMM against all B tokens with a fused
//                   row arg-max: each A token's best partner (ties to the smaller B index)
//                   and score; the A x B score matrix is never written.
//   3. bm_plan      one block per batch row: the stable descending rank of the A scores
//                   (ties to the smaller A index, exactly the CPU's stable_sort), the output
//                   slot of every token ("tome" or "spatial" order, protect), the owner token
//                   of every output slot, and the merged A tokens grouped by partner
//                   (counting sort, ascending A index inside a group: warp match_any).
//   4. bm_merge     one block per (output slot, batch row): the size-weighted mean of the
//                   slot's members summed in ascending token order (as the CPU kernel).
//
// Non-finite metric rows: the CPU kernel raises; on CUDA that would need a host sync, so
// the batch row is poisoned instead: merged[b] and size[b] are NaN (source stays a valid
// slot map, so the backward still runs and propagates the NaN).
#pragma once

#include "../common/cuda_common.cuh"

namespace tokenreduce {
namespace cuda {
namespace bipartite_merge {

// 1. inv[b, n] = 1 / max(||m[b, n]||, 1e-12), NaN if the row is not finite.
// grid (ceil(N / 8), B), block 256.
template <typename mscalar_t>
__global__ void __launch_bounds__(256) bm_inv_norm(const mscalar_t* __restrict__ m, long long sb,
                                                   long long sn, int N, int D,
                                                   acc_t<mscalar_t>* __restrict__ inv) {
  typedef acc_t<mscalar_t> acc;
  const int b = blockIdx.y;
  const int n = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (n >= N) return;
  const acc s = warp_row_sqnorm(m + b * sb + n * sn, D);
  if ((threadIdx.x & 31) == 0) inv[(long long)b * N + n] = isfinite(s) ? inv_norm_from_sq(s) : quiet_nan<acc>();
}

template <typename mscalar_t> struct OddCols {  // column c = token 2c + 1 of batch row b
  const mscalar_t* base;
  long long sn;
  const acc_t<mscalar_t>* inv;
  __device__ __forceinline__ void operator()(int c, const mscalar_t*& p, acc_t<mscalar_t>& s) const {
    p = base + (2LL * c + 1) * sn;
    s = inv[2 * c + 1];
  }
};

// 2. node_max[b, a], node_idx[b, a] for the A tokens (even positions). Protected A rows
// (a < pa) and an empty column range get -inf and partner 0, as on the CPU.
// grid (ceil(Na / 64), B), block kTileThreads.
template <typename mscalar_t>
__global__ void __launch_bounds__(kTileThreads)
    bm_match(const mscalar_t* __restrict__ m, long long sb, long long sn, int N, int D,
             const acc_t<mscalar_t>* __restrict__ inv, int pa, int pb,
             acc_t<mscalar_t>* __restrict__ node_max, int* __restrict__ node_idx) {
  typedef acc_t<mscalar_t> acc;
  __shared__ TileSmem<mscalar_t> sm;
  __shared__ const mscalar_t* rows_a[kTileM];
  __shared__ const mscalar_t* rows_b[kTileM];
  __shared__ acc scale_b[kTileM];
  const int Na = (N + 1) / 2, Nb = N / 2;
  const int b = blockIdx.y, a0 = blockIdx.x * kTileM, tid = threadIdx.x;
  const mscalar_t* base = m + b * sb;
  const acc* invb = inv + (long long)b * N;
  if (tid < kTileM) rows_a[tid] = a0 + tid < Na ? base + 2LL * (a0 + tid) * sn : nullptr;
  __syncthreads();
  OddCols<mscalar_t> cols;
  cols.base = base;
  cols.sn = sn;
  cols.inv = invb;
  Best<acc> best[4];
  tile_rows_argmax<mscalar_t, acc>(rows_a, rows_b, scale_b, cols, pb, Nb, D, sm, best);
  if ((tid & 15) == 0) {
    const int ty = tid >> 4;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int a = a0 + ty + 16 * r;
      if (a >= Na) continue;
      const bool ok = a >= pa && best[r].valid();
      node_max[(long long)b * Na + a] = ok ? best[r].value() * invb[2 * a] : -pos_inf<acc>();
      node_idx[(long long)b * Na + a] = ok ? best[r].index() : 0;
    }
  }
}

// (Grids, blocks and the dynamic shared memory of these kernels: bipartite_merge_plan.h.)

// 3. the merge plan of one batch row. grid (B), block 512 (a multiple of 32).
// Outputs: source [B, N] int64; owner [B, No] int (the token whose slot it is: an unmerged
// A token or a B token); off [B, Nb + 1] int and mem [B, R] int (R = max(r, 1)): the merged
// A tokens of partner c are mem[off[c] : off[c + 1]], ascending; bad [B] int.
template <typename acc>
__global__ void __launch_bounds__(512)
    bm_plan(const acc* __restrict__ node_max, const int* __restrict__ node_idx, const acc* __restrict__ inv,
            int N, int r, int protect, int tome, long long* __restrict__ source, int* __restrict__ owner,
            int* __restrict__ off, int* __restrict__ mem, int* __restrict__ bad) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int Na = (N + 1) / 2, Nb = N / 2, No = N - r, R = r > 0 ? r : 1;
  const int pa = (protect + 1) / 2, pb = protect / 2;
  acc* val = reinterpret_cast<acc*>(smem_raw);
  int* rnk = reinterpret_cast<int*>(val + Na);
  int* pre = rnk + Na;
  int* cnt = pre + Na;
  __shared__ int sm[33];
  const int b = blockIdx.x, tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
  const acc* nm = node_max + (long long)b * Na;
  const int* ni = node_idx + (long long)b * Na;
  long long* src = source + (long long)b * N;
  int* own = owner + (long long)b * No;

  int nonfinite = 0;
  for (int i = tid; i < N; i += nt)
    if (inv[(long long)b * N + i] != inv[(long long)b * N + i]) nonfinite = 1;
  for (int a = tid; a < Na; a += nt) {
    const acc v = nm[a];
    val[a] = v != v ? -pos_inf<acc>() : v;  // keeps the ranking a permutation
  }
  for (int c = tid; c <= Nb; c += nt) cnt[c] = 0;
  nonfinite = __syncthreads_or(nonfinite);
  if (tid == 0) bad[b] = nonfinite;

  // stable descending rank: how many A tokens come before a. Protected A tokens (-inf
  // scores) rank after every unprotected one: the same order as the CPU's stable_sort when
  // the scores are finite, and a valid plan (protected tokens never merge) even when not.
  for (int a = tid; a < Na; a += nt) {
    const acc v = val[a];
    const bool pa_a = a < pa;
    int k = 0;
    for (int e = 0; e < Na; ++e) {
      const acc w = val[e];
      const bool pa_e = e < pa;
      k += (pa_e == pa_a ? (w > v || (w == v && e < a)) : pa_a) ? 1 : 0;
    }
    rnk[a] = k;
  }
  __syncthreads();
  // prefix flags: tome + protect: unmerged unprotected A; spatial: merged A
  const bool tome_index_order = tome && protect > 0;
  for (int a = tid; a < Na; a += nt) {
    const bool merged = rnk[a] < r;
    pre[a] = tome ? ((!merged && a >= pa) ? 1 : 0) : (merged ? 1 : 0);
  }
  __syncthreads();
  const int total = block_exclusive_scan(pre, Na, sm);
  // slot of B token c (token 2c + 1)
  // tome: protected B first (their own index), then after the unmerged A tokens
  // spatial: (2c + 1) - #(merged A tokens a' <= c)
  for (int c = tid; c < Nb; c += nt) {
    int s;
    if (tome) {
      const int n_unm = tome_index_order ? total : Na - r;
      s = c < pb ? 2 * c + 1 : protect + n_unm + (c - pb);
    } else {
      s = 2 * c + 1 - (pre[c] + (rnk[c] < r ? 1 : 0));
    }
    src[2 * c + 1] = s;
    own[s] = 2 * c + 1;
  }
  for (int a = tid; a < Na; a += nt) {
    if (rnk[a] < r) {
      atomicAdd(&cnt[ni[a]], 1);  // counts only: the order comes from the warp pass below
      continue;
    }
    int s;
    if (tome) s = tome_index_order ? (a < pa ? 2 * a : protect + pre[a]) : rnk[a] - r;
    else s = 2 * a - pre[a];
    src[2 * a] = s;
    own[s] = 2 * a;
  }
  __syncthreads();
  const int nmerged = block_exclusive_scan(cnt, Nb, sm);  // == r
  int* offb = off + (long long)b * (Nb + 1);
  for (int c = tid; c < Nb; c += nt) offb[c] = cnt[c];
  if (tid == 0) offb[Nb] = nmerged;
  __syncthreads();
  // stable placement by partner in ascending A order, and the merged A tokens' slots
  if (tid < 32) {
    int* memb = mem + (long long)b * R;
    for (int a0 = 0; a0 < Na; a0 += 32) {
      const int a = a0 + lane;
      const bool merged = a < Na && rnk[a] < r;
      const int c = merged ? ni[a] : -1;
      const unsigned group = __match_any_sync(kFullMask, c);
      int pos = 0;
      if (merged) {
        pos = cnt[c] + __popc(group & ((1u << lane) - 1u));
        memb[pos] = a;
      }
      __syncwarp();
      if (merged && lane == 31 - __clz(group)) cnt[c] += __popc(group);  // the group's last lane
      __syncwarp();
    }
  }
  // merged A tokens go to their partner's slot (src of B tokens was written above)
  __syncthreads();
  for (int a = tid; a < Na; a += nt)
    if (rnk[a] < r) src[2 * a] = src[2 * ni[a] + 1];
}

// 4. merged[b, s] = sum_i size_i x_i / sum_i size_i over the slot's members (ascending token
// order). grid (No, B), block 128. x has unit stride on its last dim; merged is contiguous.
// V > 1: V elements per 16-byte access (the launcher checks alignment and D % V == 0).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(128)
    bm_merge(const scalar_t* __restrict__ x, long long sb, long long sn, int N, int D, int r,
             const acc_t<scalar_t>* __restrict__ size, const int* __restrict__ owner,
             const int* __restrict__ off, const int* __restrict__ mem, const int* __restrict__ bad,
             scalar_t* __restrict__ merged, acc_t<scalar_t>* __restrict__ size_out) {
  typedef acc_t<scalar_t> acc;
  const int s = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
  const int No = N - r, Nb = N / 2, R = r > 0 ? r : 1;
  scalar_t* orow = merged + ((long long)b * No + s) * D;
  if (bad[b]) {
    for (int d = tid; d < D; d += blockDim.x) store_acc(orow + d, quiet_nan<acc>());
    if (tid == 0) size_out[(long long)b * No + s] = quiet_nan<acc>();
    return;
  }
  const int i = owner[(long long)b * No + s];
  const scalar_t* xb = x + b * sb;
  const acc* sz = size + (long long)b * N;
  int lo = 0, hi = 0;
  if (i & 1) {
    const int* offb = off + (long long)b * (Nb + 1);
    lo = offb[i >> 1];
    hi = offb[(i >> 1) + 1];
  }
  const int* memb = mem + (long long)b * R;
  const int dlim = D > 0 ? D : 1;  // one pass even when D == 0: size_out is still due
  for (int d0 = tid * V; d0 < dlim; d0 += blockDim.x * V) {
    const bool in = d0 < D;
    acc row[V];
#pragma unroll
    for (int q = 0; q < V; ++q) row[q] = acc(0);
    acc total = acc(0);
    // members in ascending token order: merged A tokens 2a < i, the owner i, the rest
    bool own_done = false;
    for (int e = lo; e < hi; ++e) {
      const int t = 2 * memb[e];
      if (!own_done && t > i) {
        const acc w = sz[i];
        if (in) axpy_vec<scalar_t, V>(xb + i * sn + d0, w, row);
        total += w;
        own_done = true;
      }
      const acc w = sz[t];
      if (in) axpy_vec<scalar_t, V>(xb + t * sn + d0, w, row);
      total += w;
    }
    if (!own_done) {
      const acc w = sz[i];
      if (in) axpy_vec<scalar_t, V>(xb + i * sn + d0, w, row);
      total += w;
    }
    if (in) {
      const acc inv = acc(1) / total;
#pragma unroll
      for (int q = 0; q < V; ++q) row[q] *= inv;
      store_vec<scalar_t, V>(orow + d0, row);
    }
    if (d0 == 0) size_out[(long long)b * No + s] = total;
  }
}

}  // namespace bipartite_merge
}  // namespace cuda
}  // namespace tokenreduce

// Device helpers shared by the CUDA kernels of every op.
//
// Torch-free and std-library-free on purpose: the same text compiles with nvcc (the
// compiled extension, csrc/<op>/<op>_launch.cu) and with NVRTC through CuPy (the run-time
// fallback, tokenreduce/nvrtc). Only cuda_fp16.h / cuda_bf16.h / mma.h are included; math comes
// from the CUDA built-ins (sqrtf, isfinite, ...), constants are spelled out.
//
// Contents:
//   * acc_t<T>: float for half / bfloat16 / float, double for double;
//     to_acc(v) and store_acc(p, v) convert between storage and accumulator types;
//   * inf / nan constants of both accumulator types;
//   * warp and block reductions (sum, min, argmax), a block exclusive scan;
//   * Best<acc>: an arg-max accumulator whose ties go to the smallest index and where
//     NaN never wins; for float it is one packed 64-bit key
//     (order-preserving distance bits << 32 | ~index), so max() of keys is the arg-max;
//   * a 64 x 64 tile GEMM core (SIMT for float / double, tensor cores for half / bfloat16;
//     rows addressed through pointer tables, so gathered and strided rows cost nothing
//     extra) used by the Gram / matching kernels, and a fused row arg-max over it.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

namespace tokenreduce {
namespace cuda {

// ---------------------------------------------------------------- types and conversion
template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store_acc(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_acc(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_acc(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename acc> __device__ __forceinline__ acc pos_inf();
template <> __device__ __forceinline__ float pos_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double pos_inf<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}
template <typename acc> __device__ __forceinline__ acc quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// 1 / max(||v||, 1e-12) from the squared norm (a zero row normalises to zero, as on the CPU).
__device__ __forceinline__ float inv_norm_from_sq(float sq) {
  const float n = sqrtf(sq);
  return 1.0f / (n > 1e-12f ? n : 1e-12f);
}
__device__ __forceinline__ double inv_norm_from_sq(double sq) {
  const double n = sqrt(sq);
  return 1.0 / (n > 1e-12 ? n : 1e-12);
}

// Vector access: V consecutive elements as one 16-byte load / store (V * sizeof(T) == 16,
// 16-byte aligned pointer), or one element (V == 1).
template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, acc_t<T> (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_acc(p[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "16-byte vectors");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* t = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int q = 0; q < V; ++q) out[q] = to_acc(t[q]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const acc_t<T> (&in)[V]) {
  if constexpr (V == 1) {
    store_acc(p, in[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "16-byte vectors");
    uint4 raw;
    T* t = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int q = 0; q < V; ++q) store_acc(t + q, in[q]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// row[0:V] += w * p[0:V] (one vector access)
template <typename T, int V>
__device__ __forceinline__ void axpy_vec(const T* p, acc_t<T> w, acc_t<T> (&row)[V]) {
  acc_t<T> v[V];
  load_vec<T, V>(p, v);
#pragma unroll
  for (int q = 0; q < V; ++q) row[q] += w * v[q];
}

// ---------------------------------------------------------------- warp / block reductions
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
template <typename T> __device__ __forceinline__ T warp_min(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(kFullMask, v, o);
    v = w < v ? w : v;
  }
  return v;
}

// Order-preserving map float -> uint32 (a < b  <=>  ordered(a) < ordered(b) for non-NaN).
__device__ __forceinline__ unsigned ordered_bits(float v) {
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float from_ordered_bits(unsigned o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
// Packed arg-max key: larger key = larger value, then smaller index. 0 = no candidate.
// -0.0 is keyed as +0.0 (they compare equal, so the index decides, as on the CPU).
__device__ __forceinline__ unsigned long long argmax_key(float v, int i) {
  v = v + 0.0f;  // -0 -> +0 (exact for every other value; no fast-math here)
  return (static_cast<unsigned long long>(ordered_bits(v)) << 32) |
         static_cast<unsigned long long>(~static_cast<unsigned>(i));
}

// Arg-max accumulator: candidates may arrive in any order; ties go to the smallest
// index; NaN never wins (matches tokenreduce::ArgMax of the CPU kernels).
template <typename acc> struct Best;

template <> struct Best<float> {
  unsigned long long key;
  __device__ __forceinline__ void reset() { key = 0ull; }
  __device__ __forceinline__ void push(float v, int i) {
    if (v != v) return;
    const unsigned long long k = argmax_key(v, i);
    key = k > key ? k : key;
  }
  __device__ __forceinline__ void merge(const Best& o) { key = o.key > key ? o.key : key; }
  __device__ __forceinline__ Best shfl_xor(int o) const {
    Best r;
    r.key = __shfl_xor_sync(kFullMask, key, o);
    return r;
  }
  __device__ __forceinline__ bool valid() const { return key != 0ull; }
  __device__ __forceinline__ int index() const {
    return valid() ? static_cast<int>(~static_cast<unsigned>(key & 0xffffffffull)) : -1;
  }
  __device__ __forceinline__ float value() const {
    return from_ordered_bits(static_cast<unsigned>(key >> 32));
  }
};

template <> struct Best<double> {
  double v;
  int i;
  __device__ __forceinline__ void reset() { v = -pos_inf<double>(); i = -1; }
  __device__ __forceinline__ void push(double w, int j) {
    if (w != w || j < 0) return;
    if (i < 0 || w > v || (w == v && j < i)) { v = w; i = j; }
  }
  __device__ __forceinline__ void merge(const Best& o) { push(o.v, o.i); }
  __device__ __forceinline__ Best shfl_xor(int o) const {
    Best r;
    r.v = __shfl_xor_sync(kFullMask, v, o);
    r.i = __shfl_xor_sync(kFullMask, i, o);
    return r;
  }
  __device__ __forceinline__ bool valid() const { return i >= 0; }
  __device__ __forceinline__ int index() const { return i; }
  __device__ __forceinline__ double value() const { return v; }
};

template <typename acc> __device__ __forceinline__ Best<acc> warp_argmax(Best<acc> b) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) b.merge(b.shfl_xor(o));
  return b;
}

// Block-wide arg-max; every thread gets the result. `sm` holds 33 entries. Contains two
// __syncthreads(): call it from all threads of the block. Back-to-back calls are safe.
template <typename acc>
__device__ __forceinline__ Best<acc> block_argmax(Best<acc> b, Best<acc>* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  b = warp_argmax(b);
  if (lane == 0) sm[warp] = b;
  __syncthreads();
  if (warp == 0) {
    Best<acc> c;
    c.reset();
    if (lane < nwarps) c = sm[lane];
    c = warp_argmax(c);
    if (lane == 0) sm[32] = c;
  }
  __syncthreads();
  return sm[32];
}

// Block-wide sum of ints; every thread gets the result. `sm` holds 33 ints.
__device__ __forceinline__ int block_sum_int(int v, int* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int c = lane < nwarps ? sm[lane] : 0;
    c = warp_sum(c);
    if (lane == 0) sm[32] = c;
  }
  __syncthreads();
  const int r = sm[32];
  __syncthreads();  // sm may be reused right after
  return r;
}

// In-place exclusive prefix sum of data[0:n] (shared memory) by the whole block; returns
// the total. `sm` holds 33 ints. Each thread scans a contiguous chunk, then the chunk
// totals are scanned across the block. Contains __syncthreads(): call from all threads.
__device__ __forceinline__ int block_exclusive_scan(int* data, int n, int* sm) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = (nt + 31) >> 5;
  const int chunk = (n + nt - 1) / nt;
  const int lo = min(n, tid * chunk), hi = min(n, lo + chunk);
  int local = 0;
  for (int i = lo; i < hi; ++i) local += data[i];
  // inclusive warp scan of the chunk totals
  int incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int up = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += up;
  }
  if (lane == 31) sm[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? sm[lane] : 0;
    int wi = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(kFullMask, wi, o);
      if (lane >= o) wi += up;
    }
    if (lane < nwarps) sm[lane] = wi - w;  // exclusive warp offsets
    if (lane == 31) sm[32] = wi;           // block total
  }
  __syncthreads();
  int run = sm[warp] + incl - local;
  for (int i = lo; i < hi; ++i) {
    const int c = data[i];
    data[i] = run;
    run += c;
  }
  const int total = sm[32];
  __syncthreads();
  return total;
}

// Squared norm of a row of D elements by one warp (lanes stride over D).
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> warp_row_sqnorm(const scalar_t* row, int D) {
  typedef acc_t<scalar_t> acc;
  acc s = acc(0);
  for (int d = threadIdx.x & 31; d < D; d += 32) {
    const acc v = to_acc(row[d]);
    s += v * v;
  }
  return warp_sum(s);
}

// ---------------------------------------------------------------- tile GEMM core
// A block of kTileThreads threads computes a kTileM x kTileM tile of dot products
// C[i][j] = sum_d A_i[d] * B_j[d] (accumulated in acc). Row pointers come from shared
// tables (nullptr = a missing row, read as zeros). On return thread (ty, tx) =
// (tid / 16, tid % 16) holds rows ty + 16 * a and columns tx + 16 * c (a, c in 0..3) in
// c[a][c]: the epilogue's stores of a row are 16 consecutive columns.
//   * float / double inputs: SIMT FMA in the accumulator type (exactly the CPU's math);
//   * half / bfloat16 inputs: tensor cores (WMMA 16x16x16, fp32 accumulation; the
//     products of 16-bit inputs are exact in fp32), staged through shared memory.
// Call tile_gemm(...) without template arguments so that the 16-bit overloads are chosen.
constexpr int kTileM = 64;
constexpr int kTileK = 32;
constexpr int kTileThreads = 256;
constexpr int kWmmaLd = kTileK + 8;  // 16-bit elements per staged row (a multiple of 8)

template <typename scalar_t> struct TileSmem {  // SIMT staging (float / double)
  acc_t<scalar_t> a[kTileK][kTileM + 1];  // padded: the transposed stores hit distinct banks
  acc_t<scalar_t> b[kTileK][kTileM + 1];
};
template <typename T> struct WmmaSmem {  // tensor-core staging (half / bfloat16)
  __align__(32) T a[kTileM][kWmmaLd];
  __align__(32) T b[kTileM][kWmmaLd];
  __align__(32) float c[kTileM][kTileM + 4];
};
template <> struct TileSmem<__half> : WmmaSmem<__half> {};
template <> struct TileSmem<__nv_bfloat16> : WmmaSmem<__nv_bfloat16> {};

template <typename scalar_t, typename acc>
__device__ __forceinline__ void tile_gemm(const scalar_t* const* rows_a, const scalar_t* const* rows_b,
                                          int D, TileSmem<scalar_t>& sm, acc c[4][4]) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[a][e] = acc(0);
  for (int k0 = 0; k0 < D; k0 += kTileK) {
    // each warp loads 32 consecutive elements of one row (kTileM * kTileK / 256 = 8 each)
#pragma unroll
    for (int e = 0; e < (kTileM * kTileK) / kTileThreads; ++e) {
      const int idx = tid + e * kTileThreads;
      const int r = idx / kTileK, kk = idx % kTileK;
      const int d = k0 + kk;
      const scalar_t* pa = rows_a[r];
      const scalar_t* pb = rows_b[r];
      sm.a[kk][r] = (pa != nullptr && d < D) ? to_acc(pa[d]) : acc(0);
      sm.b[kk][r] = (pb != nullptr && d < D) ? to_acc(pb[d]) : acc(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      acc fa[4], fb[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) fa[a] = sm.a[kk][ty + 16 * a];
#pragma unroll
      for (int e = 0; e < 4; ++e) fb[e] = sm.b[kk][tx + 16 * e];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[a][e] += fa[a] * fb[e];
    }
    __syncthreads();
  }
}

__device__ __forceinline__ __half zero_of(const __half*) { return __ushort_as_half(0); }
__device__ __forceinline__ __nv_bfloat16 zero_of(const __nv_bfloat16*) { return __ushort_as_bfloat16(0); }

// 8 warps: warp w computes the 16 x 32 strip (rows 16 * (w / 2), columns 32 * (w % 2)).
template <typename T>
__device__ __forceinline__ void tile_gemm_wmma(const T* const* rows_a, const T* const* rows_b, int D,
                                               WmmaSmem<T>& sm, float c[4][4]) {
  using namespace nvcuda;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int fr = warp >> 1, fc0 = (warp & 1) * 2;
  const T zero = zero_of(static_cast<const T*>(nullptr));
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0, acc1;
  wmma::fill_fragment(acc0, 0.0f);
  wmma::fill_fragment(acc1, 0.0f);
  for (int k0 = 0; k0 < D; k0 += kTileK) {
#pragma unroll
    for (int e = 0; e < (kTileM * kTileK) / kTileThreads; ++e) {
      const int idx = tid + e * kTileThreads;
      const int r = idx / kTileK, kk = idx % kTileK;
      const int d = k0 + kk;
      const T* pa = rows_a[r];
      const T* pb = rows_b[r];
      sm.a[r][kk] = (pa != nullptr && d < D) ? pa[d] : zero;
      sm.b[r][kk] = (pb != nullptr && d < D) ? pb[d] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb0, fb1;  // (k, n) at b[n][k]
      wmma::load_matrix_sync(fa, &sm.a[fr * 16][kk], kWmmaLd);
      wmma::load_matrix_sync(fb0, &sm.b[fc0 * 16][kk], kWmmaLd);
      wmma::load_matrix_sync(fb1, &sm.b[(fc0 + 1) * 16][kk], kWmmaLd);
      wmma::mma_sync(acc0, fa, fb0, acc0);
      wmma::mma_sync(acc1, fa, fb1, acc1);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&sm.c[fr * 16][fc0 * 16], acc0, kTileM + 4, wmma::mem_row_major);
  wmma::store_matrix_sync(&sm.c[fr * 16][(fc0 + 1) * 16], acc1, kTileM + 4, wmma::mem_row_major);
  __syncthreads();
  const int tx = tid & 15, ty = tid >> 4;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[a][e] = sm.c[ty + 16 * a][tx + 16 * e];
  __syncthreads();  // sm.c is rewritten by the next call
}

__device__ __forceinline__ void tile_gemm(const __half* const* rows_a, const __half* const* rows_b, int D,
                                          TileSmem<__half>& sm, float c[4][4]) {
  tile_gemm_wmma<__half>(rows_a, rows_b, D, sm, c);
}
__device__ __forceinline__ void tile_gemm(const __nv_bfloat16* const* rows_a, const __nv_bfloat16* const* rows_b,
                                          int D, TileSmem<__nv_bfloat16>& sm, float c[4][4]) {
  tile_gemm_wmma<__nv_bfloat16>(rows_a, rows_b, D, sm, c);
}

// Row-wise arg-max of a GEMM without storing it: for the kTileM rows of rows_a, the column
// j in [col_begin, ncols) maximising dot(A_i, B_j) * scale_j (ties to the smallest j, NaN
// never wins). `cols(j, ptr, scale)` gives column j's row pointer (nullptr = zeros) and its
// scale. On return, threads with tx == 0 (tid % 16 == 0) hold the result of rows
// ty + 16 * a in best[a]. Contains __syncthreads(): call from all kTileThreads threads.
template <typename scalar_t, typename acc, typename Cols>
__device__ __forceinline__ void tile_rows_argmax(const scalar_t* const* rows_a, const scalar_t** rows_b,
                                                 acc* scale_b, const Cols& cols, int col_begin,
                                                 int ncols, int D, TileSmem<scalar_t>& sm, Best<acc> best[4]) {
  const int tid = threadIdx.x, tx = tid & 15;
#pragma unroll
  for (int a = 0; a < 4; ++a) best[a].reset();
  for (int j0 = (col_begin / kTileM) * kTileM; j0 < ncols; j0 += kTileM) {
    if (tid < kTileM) {
      const int j = j0 + tid;
      const scalar_t* p = nullptr;
      acc s = acc(0);
      if (j < ncols) cols(j, p, s);
      rows_b[tid] = p;
      scale_b[tid] = s;
    }
    __syncthreads();
    acc c[4][4];
    tile_gemm(rows_a, rows_b, D, sm, c);  // ends with __syncthreads() when D > 0
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = j0 + tx + 16 * e;
      if (j >= col_begin && j < ncols) {
        const acc s = scale_b[tx + 16 * e];
#pragma unroll
        for (int a = 0; a < 4; ++a) best[a].push(c[a][e] * s, j);
      }
    }
    __syncthreads();  // rows_b / scale_b are rewritten by the next tile
  }
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) best[a].merge(best[a].shfl_xor(o));
  }
}

}  // namespace cuda
}  // namespace tokenreduce

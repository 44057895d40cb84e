// CUDA kernels of attention_with_scores (device code only).
//
// Torch-free and std-library-free: the same text compiles with nvcc
// (attention_with_scores_launch.cu) and with NVRTC through CuPy
// (tokenreduce/nvrtc/attention_with_scores.py). Only cuda_fp16.h / cuda_bf16.h are included.
//
// Three kernels, all with 256 threads (8 warps), templated on the storage type T
// (float, __half, __nv_bfloat16, double); accumulation is float (double for double):
//
//  * attn_fwd_kernel<T>: one CTA per (query block of 64 rows, head, batch). The block's
//    logits for a "chunk" of up to `kc` keys are kept in shared memory (fp32, base-2 units):
//      1. S = Q K^T * scale*log2(e) + bias*log2(e), masked to -inf, tile by tile (64 keys);
//      2. per row: chunk max, running max m, p = exp2(s - m) written in place (ONE exp per
//         logit), running sum l, correction exp2(m_old - m) of the previous chunks;
//      3. if the CTA scores its rows in-kernel (single chunk, i.e. Nk fits): column sums of
//         cnt[r] * p[r][j] / l[r] over the block's scored rows -> partial[b, h*nqb + qb, :]
//         (p is divided by the FINAL row sum: exact probabilities, not running-max exps);
//      4. O = P V, Dv in chunks of 64 columns; O is kept in a global fp32 workspace between
//         key chunks (only when Nk does not fit, the long-sequence path), rescaled by the
//         correction, and normalised by 1/l at the end. LSE (base 2) is written when asked.
//    fp16 / bf16 use tensor cores (mma.sync m16n8k16, fp32 accumulate; sm_80+, a CUDA-core
//    emulation of the same fragments below sm_80), fp32 / fp64 a CUDA-core 4x4 micro-tile.
//  * attn_colscore_kernel<T>: key-block-major column scores from the LSE, for the row-score
//    fast path (few score_rows, e.g. [CLS]) and the long-sequence path. One CTA per (64-key
//    tile, head, batch) keeps its K tile and walks the scored rows (gathered by index) in
//    blocks of 64: p = exp2(s - lse), summed per column in a fixed order -> partial[b, h, :].
//  * attn_reduce_scores_kernel<acc>: scores[b, j] = sum_p partial[b, p, j] * inv_denom in a
//    fixed order (deterministic, no atomics anywhere on float data).
//
// Semantics (as the CPU kernel): grouped KV heads (head h reads KV head h / (H / Hkv)),
// bottom-right causal (row i sees keys j <= i + Nk - Nq), additive key bias (-inf masks),
// a row with no admissible key outputs 0 and adds nothing, NaN propagates.
// Score rows are read on the device only: negative indices count from the end; an index
// outside [-Nq, Nq) cannot raise without a host sync, so it is ignored (adds nothing, but
// still counts in the 1 / (H * R) denominator). The CPU op raises IndexError instead.
#pragma once

// TR_ATTN_LAYOUT_ONLY: only the tiling constants and shared-memory layout functions, for
// host compilers (the planner in attention_with_scores_plan.h, host unit tests).
#ifndef TR_ATTN_LAYOUT_ONLY
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define TR_ATTN_HD __host__ __device__
#else
#define TR_ATTN_HD
#endif

namespace tokenreduce {
namespace attn {

// ------------------------------------------------------------------ tiling constants
// Shared with the host planner (attention_with_scores_launch.cu) and mirrored in
// tokenreduce/nvrtc/attention_with_scores.py (attention_plan): change them together.
constexpr int kBQ = 64;        // query rows per CTA
constexpr int kBK = 64;        // keys per tile
constexpr int kDvChunk = 64;   // output columns per O pass
constexpr int kThreads = 256;  // 8 warps: 4 row strips of 16 x 2 column halves of 32
constexpr int kScalarDChunk = 64;  // head-dim chunk of the CUDA-core (fp32 / fp64) path

// ------------------------------------------------------------------ shared-memory layout
// Host and device compute the same sizes (the host passes the total as dynamic smem).
TR_ATTN_HD constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }
// head-dim width of one Q / K tile in shared memory
TR_ATTN_HD constexpr int dq_width(bool mma, int Dh) {
  return mma ? round_up(Dh, 16) : (Dh < kScalarDChunk ? Dh : kScalarDChunk);
}
// leading dimension of Q / K tiles (elements): +8 halves keeps mma fragment loads
// conflict-free; odd for the CUDA-core path
TR_ATTN_HD constexpr int q_ld(bool mma, int Dh) {
  return mma ? dq_width(mma, Dh) + 8 : dq_width(mma, Dh) + 1;
}
// V tile: mma path stores it transposed [kDvChunk][kBK + 8]; CUDA-core path [kBK][kDvChunk + 1]
TR_ATTN_HD constexpr int v_ld(bool mma) { return mma ? kBK + 8 : kDvChunk + 1; }
TR_ATTN_HD constexpr long long q_tile_bytes(bool mma, int Dh, int esize) {
  return (long long)round_up(kBQ * q_ld(mma, Dh) * esize, 16);
}
TR_ATTN_HD constexpr long long kv_tile_bytes(bool mma, int Dh, int esize) {
  // max of the K tile [kBK][q_ld] and the V tile
  return (long long)round_up(
      (kBK * q_ld(mma, Dh) > (mma ? kDvChunk : kBK) * v_ld(mma) ? kBK * q_ld(mma, Dh)
                                                                 : (mma ? kDvChunk : kBK) * v_ld(mma)) *
          esize,
      16);
}
TR_ATTN_HD constexpr int s_ld(int kc) { return kc + 4; }
TR_ATTN_HD constexpr long long s_bytes(int kc, int acc_size) {
  return (long long)round_up(kBQ * s_ld(kc) * acc_size, 16);
}
// per-row state: m, l, corr, w (acc) + cnt (int)
TR_ATTN_HD constexpr long long row_bytes(int acc_size) {
  return (long long)round_up(kBQ * (4 * acc_size + 4), 16);
}
// esize: bytes of a shared-memory Q/K/V element (T for mma, acc otherwise)
TR_ATTN_HD constexpr long long fwd_smem_bytes(bool mma, int Dh, int esize, int acc_size, int kc) {
  return q_tile_bytes(mma, Dh, esize) + kv_tile_bytes(mma, Dh, esize) + s_bytes(kc, acc_size) +
         row_bytes(acc_size);
}
TR_ATTN_HD constexpr long long colscore_smem_bytes(bool mma, int Dh, int esize, int acc_size) {
  return q_tile_bytes(mma, Dh, esize) + kv_tile_bytes(mma, Dh, esize) + s_bytes(kBK, acc_size) +
         row_bytes(acc_size);
}

#ifndef TR_ATTN_LAYOUT_ONLY

// ------------------------------------------------------------------ types
template <typename A, typename B> struct SameType { static constexpr bool value = false; };
template <typename A> struct SameType<A, A> { static constexpr bool value = true; };

// min_blocks: __launch_bounds__ of the forward kernel (2 CTAs per SM -> at most 128
// registers, so small key counts can run two CTAs per SM; fp64 gets 1 so its larger
// accumulators do not spill, and so do fp16 / bf16 below sm_90, where 128 registers spill)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define TR_ATTN_MMA_MIN_BLOCKS 1
#else
#define TR_ATTN_MMA_MIN_BLOCKS 2
#endif
template <typename T> struct Traits {  // float
  typedef float acc;
  typedef float smem_t;  // what Q / K / V tiles are stored as in shared memory
  static constexpr bool mma = false;
  static constexpr int min_blocks = 2;
};
template <> struct Traits<double> {
  typedef double acc;
  typedef double smem_t;
  static constexpr bool mma = false;
  static constexpr int min_blocks = 1;
};
template <> struct Traits<__half> {
  typedef float acc;
  typedef __half smem_t;
  static constexpr bool mma = true;
  static constexpr int min_blocks = TR_ATTN_MMA_MIN_BLOCKS;
};
template <> struct Traits<__nv_bfloat16> {
  typedef float acc;
  typedef __nv_bfloat16 smem_t;
  static constexpr bool mma = true;
  static constexpr int min_blocks = TR_ATTN_MMA_MIN_BLOCKS;
};

// zero of each storage type without the implicit float conversions that torch's builds
// disable (-D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__)
template <typename T> __device__ __forceinline__ T zero_of() { return T(0); }
template <> __device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.0f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.0f); }

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename D> __device__ __forceinline__ D from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename D> __device__ __forceinline__ D from_acc(double v) { return (D)v; }

// storage -> shared-memory type (identity, or to the accumulator type)
template <typename D> __device__ __forceinline__ D convert_elem(float v) { return (D)v; }
template <> __device__ __forceinline__ __half convert_elem<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 convert_elem<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <typename D, typename S> __device__ __forceinline__ D to_smem(S v) {
  if constexpr (SameType<D, S>::value) return v;
  else return convert_elem<D>(to_acc(v));
}

template <typename acc> __device__ __forceinline__ acc neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(0xfff0000000000000LL);
}
__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }
template <typename acc> __device__ __forceinline__ acc log2e();
template <> __device__ __forceinline__ float log2e<float>() { return 1.4426950408889634f; }
template <> __device__ __forceinline__ double log2e<double>() { return 1.4426950408889634074; }

// aligned pair access to fp32 / fp64 shared memory (p at an even element offset)
__device__ __forceinline__ void store_pair(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
__device__ __forceinline__ void store_pair(double* p, double x, double y) {
  *reinterpret_cast<double2*>(p) = make_double2(x, y);
}
__device__ __forceinline__ void load_pair(const float* p, float& x, float& y) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  x = v.x;
  y = v.y;
}
__device__ __forceinline__ void load_pair(const double* p, double& x, double& y) {
  const double2 v = *reinterpret_cast<const double2*>(p);
  x = v.x;
  y = v.y;
}

// max that propagates NaN (a NaN logit must turn the row into NaN, as in eager softmax)
template <typename acc> __device__ __forceinline__ acc nanmax(acc a, acc b) {
  return (b != b || b > a) ? b : a;
}

template <typename acc> __device__ __forceinline__ acc warp_sum(acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename acc> __device__ __forceinline__ acc warp_nanmax(acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nanmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ------------------------------------------------------------------ tile loads
// dst[r * ld + c] (r < 64, c < width) = src row r, column col0 + c, or 0 when the row is
// absent (r >= nrows, or rowidx[r] < 0 when rows are gathered) or c >= ncols.
// vec: the rows may be read with 16-byte loads (base and strides aligned, ncols and width
// multiples of the vector width: checked by the host).
template <typename T, typename D>
__device__ __forceinline__ void load_rows(D* __restrict__ dst, int ld, const T* __restrict__ base,
                                          long long stride, int nrows, const int* rowidx, int col0,
                                          int ncols, int width, bool vec) {
  constexpr int VW = 16 / sizeof(T);
  if (vec && (width % VW) == 0) {
    const int wv = width / VW;
    for (int e = threadIdx.x; e < kBQ * wv; e += kThreads) {
      const int r = e / wv, c = (e - r * wv) * VW;
      const long long row = rowidx ? (long long)rowidx[r] : (r < nrows ? (long long)r : -1);
      D* d = dst + r * ld + c;
      if (row >= 0 && c < ncols) {
        const uint4 x = *reinterpret_cast<const uint4*>(base + row * stride + col0 + c);
        const T* xt = reinterpret_cast<const T*>(&x);
#pragma unroll
        for (int u = 0; u < VW; ++u) d[u] = to_smem<D>(xt[u]);
      } else {
#pragma unroll
        for (int u = 0; u < VW; ++u) d[u] = to_smem<D>(zero_of<T>());
      }
    }
  } else {
    for (int e = threadIdx.x; e < kBQ * width; e += kThreads) {
      const int r = e / width, c = e - r * width;
      const long long row = rowidx ? (long long)rowidx[r] : (r < nrows ? (long long)r : -1);
      T x = zero_of<T>();
      if (row >= 0 && c < ncols) x = base[row * stride + col0 + c];
      dst[r * ld + c] = to_smem<D>(x);
    }
  }
}

// V tile: keys [0, nrows) of base (row stride `stride`), columns [col0, col0 + ncols) of a
// kDvChunk-wide chunk. Transposed (dst[c * ld + r]) for the mma path.
template <typename T, typename D, bool kTransposed>
__device__ __forceinline__ void load_v(D* __restrict__ dst, const T* __restrict__ base, long long stride,
                                       int nrows, int col0, int ncols, bool vec) {
  constexpr int VW = 16 / sizeof(T);
  constexpr int ld = kTransposed ? kBK + 8 : kDvChunk + 1;
  if (vec) {
    constexpr int wv = kDvChunk / VW;
    for (int e = threadIdx.x; e < kBK * wv; e += kThreads) {
      const int r = e / wv, c = (e - r * wv) * VW;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are 0 in every type
      if (r < nrows && c < ncols) x = *reinterpret_cast<const uint4*>(base + (long long)r * stride + col0 + c);
      const T* xt = reinterpret_cast<const T*>(&x);
#pragma unroll
      for (int u = 0; u < VW; ++u) {
        if (kTransposed) dst[(c + u) * ld + r] = to_smem<D>(xt[u]);
        else dst[r * ld + c + u] = to_smem<D>(xt[u]);
      }
    }
  } else {
    for (int e = threadIdx.x; e < kBK * kDvChunk; e += kThreads) {
      const int r = e / kDvChunk, c = e - r * kDvChunk;
      T x = zero_of<T>();
      if (r < nrows && c < ncols) x = base[(long long)r * stride + col0 + c];
      if (kTransposed) dst[c * ld + r] = to_smem<D>(x);
      else dst[r * ld + c] = to_smem<D>(x);
    }
  }
}

// Register-staged copies for the tensor-core path with 16-byte loads (2-byte types): the
// next tile's global loads are issued into registers before the warps compute on the
// current tile, and stored to shared memory after the following barrier, so load latency
// overlaps the mma work (one shared buffer, no cp.async needed).
constexpr int kKStage = 4;  // K tile [64][<= 128] : at most 4 x 16 bytes per thread
template <typename T>
__device__ __forceinline__ void fetch_k_regs(uint4* regs, const T* __restrict__ base, long long stride,
                                             int nrows, int ncols, int width) {
  const int wv = width / 8;
#pragma unroll
  for (int u = 0; u < kKStage; ++u) {
    const int e = threadIdx.x + u * kThreads;
    const int r = e / wv, c = (e - r * wv) * 8;
    uint4 x = make_uint4(0u, 0u, 0u, 0u);
    if (e < kBK * wv && r < nrows && c < ncols)
      x = *reinterpret_cast<const uint4*>(base + (long long)r * stride + c);
    regs[u] = x;
  }
}
template <typename T>
__device__ __forceinline__ void put_k_regs(T* __restrict__ dst, int ld, const uint4* regs, int width) {
  const int wv = width / 8;
#pragma unroll
  for (int u = 0; u < kKStage; ++u) {
    const int e = threadIdx.x + u * kThreads;
    if (e < kBK * wv) {
      const int r = e / wv, c = (e - r * wv) * 8;
      *reinterpret_cast<uint4*>(dst + r * ld + c) = regs[u];  // ld, c multiples of 8: aligned
    }
  }
}
// V tile [64 keys][64 columns]: 2 x 16 bytes per thread, stored transposed (Vt[c][r]).
template <typename T>
__device__ __forceinline__ void fetch_v_regs(uint4* regs, const T* __restrict__ base, long long stride,
                                             int nrows, int col0, int ncols) {
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int e = threadIdx.x + u * kThreads;
    const int r = e >> 3, c = (e & 7) * 8;
    uint4 x = make_uint4(0u, 0u, 0u, 0u);
    if (r < nrows && c < ncols) x = *reinterpret_cast<const uint4*>(base + (long long)r * stride + col0 + c);
    regs[u] = x;
  }
}
template <typename T>
__device__ __forceinline__ void put_v_regs(T* __restrict__ dst, const uint4* regs) {
  constexpr int ld = kBK + 8;
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int e = threadIdx.x + u * kThreads;
    const int r = e >> 3, c = (e & 7) * 8;
    const T* xt = reinterpret_cast<const T*>(&regs[u]);
#pragma unroll
    for (int w = 0; w < 8; ++w) dst[(c + w) * ld + r] = xt[w];
  }
}

// ------------------------------------------------------------------ warp tiles
// A warp computes a 16 x 32 tile C[r][c] (16 accumulators per thread). Element a of the
// accumulator array sits at (acc_row(a), acc_col(a)) of the tile.
//  mma path: 4 n8 tiles of the m16n8 C fragment: a = nt * 4 + ci,
//            row = lane/4 + 8*(ci/2), col = nt*8 + 2*(lane%4) + ci%2.
//  CUDA-core path: a 4 x 4 micro-tile: a = ri * 4 + ci, row = (lane/8)*4 + ri, col = (lane%8)*4 + ci.
template <bool kMma> __device__ __forceinline__ int acc_row(int a, int lane) {
  return kMma ? (lane >> 2) + ((a & 2) ? 8 : 0) : (lane >> 3) * 4 + (a >> 2);
}
template <bool kMma> __device__ __forceinline__ int acc_col(int a, int lane) {
  return kMma ? (a >> 2) * 8 + 2 * (lane & 3) + (a & 1) : (lane & 7) * 4 + (a & 3);
}

__device__ __forceinline__ unsigned int pack2(__half lo, __half hi) {
  return (unsigned int)__half_as_ushort(lo) | ((unsigned int)__half_as_ushort(hi) << 16);
}
__device__ __forceinline__ unsigned int pack2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return (unsigned int)__bfloat16_as_ushort(lo) | ((unsigned int)__bfloat16_as_ushort(hi) << 16);
}
template <typename T> __device__ __forceinline__ unsigned int pack_f2(float lo, float hi) {
  return pack2(convert_elem<T>(lo), convert_elem<T>(hi));
}
template <typename T> __device__ __forceinline__ float lo_f(unsigned int x);
template <> __device__ __forceinline__ float lo_f<__half>(unsigned int x) {
  return __half2float(__ushort_as_half((unsigned short)(x & 0xffffu)));
}
template <> __device__ __forceinline__ float lo_f<__nv_bfloat16>(unsigned int x) {
  return __bfloat162float(__ushort_as_bfloat16((unsigned short)(x & 0xffffu)));
}
template <typename T> __device__ __forceinline__ float hi_f(unsigned int x) { return lo_f<T>(x >> 16); }

// c[0..3] += A(16x16, row-major fragment a0..a3) * B(16x8, "col" fragment b0, b1).
template <typename T>
__device__ __forceinline__ void mma_16816(float* c, unsigned int a0, unsigned int a1, unsigned int a2,
                                          unsigned int a3, unsigned int b0, unsigned int b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (SameType<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  // Emulation of the same fragment layout with shuffles (pre-sm_80 GPUs): lane l holds
  // A[g][2t..2t+1] (a0), A[g+8][2t..] (a1), A[g][2t+8..] (a2), A[g+8][2t+8..] (a3) and
  // B[2t..2t+1][g] (b0), B[2t+8..2t+9][g] (b1), with g = l/4, t = l%4.
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kt = 0; kt < 4; ++kt) {  // k pairs 2kt, 2kt+1 (a0/b0) and 2kt+8, 2kt+9 (a2/b1)
    const unsigned int A0 = __shfl_sync(0xffffffffu, a0, g * 4 + kt);
    const unsigned int A1 = __shfl_sync(0xffffffffu, a1, g * 4 + kt);
    const unsigned int A2 = __shfl_sync(0xffffffffu, a2, g * 4 + kt);
    const unsigned int A3 = __shfl_sync(0xffffffffu, a3, g * 4 + kt);
#pragma unroll
    for (int cc = 0; cc < 2; ++cc) {  // output column 2t + cc is held as B column by lane (2t+cc)*4 + kt
      const unsigned int B0 = __shfl_sync(0xffffffffu, b0, (2 * t + cc) * 4 + kt);
      const unsigned int B1 = __shfl_sync(0xffffffffu, b1, (2 * t + cc) * 4 + kt);
      c[cc] += lo_f<T>(A0) * lo_f<T>(B0) + hi_f<T>(A0) * hi_f<T>(B0) + lo_f<T>(A2) * lo_f<T>(B1) +
               hi_f<T>(A2) * hi_f<T>(B1);
      c[2 + cc] += lo_f<T>(A1) * lo_f<T>(B0) + hi_f<T>(A1) * hi_f<T>(B0) + lo_f<T>(A3) * lo_f<T>(B1) +
                   hi_f<T>(A3) * hi_f<T>(B1);
    }
  }
#endif
}

// acc(16x32) += A[16][dq] * B[32][dq]^T; A, B in shared memory (row-major, leading dims la, lb).
template <typename T>
__device__ __forceinline__ void warp_qk(float* acc, const T* __restrict__ A, int la, const T* __restrict__ Bm,
                                        int lb, int dq) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t2 = 2 * (lane & 3);
  for (int kk = 0; kk < dq; kk += 16) {
    const T* ap = A + g * la + kk + t2;
    const unsigned int a0 = *reinterpret_cast<const unsigned int*>(ap);
    const unsigned int a1 = *reinterpret_cast<const unsigned int*>(ap + 8 * la);
    const unsigned int a2 = *reinterpret_cast<const unsigned int*>(ap + 8);
    const unsigned int a3 = *reinterpret_cast<const unsigned int*>(ap + 8 * la + 8);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const T* bp = Bm + (nt * 8 + g) * lb + kk + t2;
      const unsigned int b0 = *reinterpret_cast<const unsigned int*>(bp);
      const unsigned int b1 = *reinterpret_cast<const unsigned int*>(bp + 8);
      mma_16816<T>(acc + nt * 4, a0, a1, a2, a3, b0, b1);
    }
  }
}
template <typename acc_t>
__device__ __forceinline__ void warp_qk_scalar(acc_t* acc, const acc_t* __restrict__ A, int la,
                                               const acc_t* __restrict__ Bm, int lb, int dq) {
  const int lane = threadIdx.x & 31;
  const acc_t* ap = A + ((lane >> 3) * 4) * la;
  const acc_t* bp = Bm + ((lane & 7) * 4) * lb;
  for (int d = 0; d < dq; ++d) {
    acc_t x[4], y[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      x[u] = ap[u * la + d];
      y[u] = bp[u * lb + d];
    }
#pragma unroll
    for (int ri = 0; ri < 4; ++ri)
#pragma unroll
      for (int ci = 0; ci < 4; ++ci) acc[ri * 4 + ci] += x[ri] * y[ci];
  }
}

// O(16x32) += P[16][64] (fp32 probabilities in shared memory, leading dim lp) * V.
// mma path: V transposed in shared memory, Vt[n][k] (leading dim lv), n = the warp's 32 columns.
template <typename T>
__device__ __forceinline__ void warp_pv(float* acc, const float* __restrict__ P, int lp,
                                        const T* __restrict__ Vt, int lv) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t2 = 2 * (lane & 3);
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    const float* pp = P + g * lp + kk + t2;  // 8-byte aligned: lp, kk and t2 are even
    const float2 x0 = *reinterpret_cast<const float2*>(pp);
    const float2 x1 = *reinterpret_cast<const float2*>(pp + 8 * lp);
    const float2 x2 = *reinterpret_cast<const float2*>(pp + 8);
    const float2 x3 = *reinterpret_cast<const float2*>(pp + 8 * lp + 8);
    const unsigned int a0 = pack_f2<T>(x0.x, x0.y);
    const unsigned int a1 = pack_f2<T>(x1.x, x1.y);
    const unsigned int a2 = pack_f2<T>(x2.x, x2.y);
    const unsigned int a3 = pack_f2<T>(x3.x, x3.y);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const T* bp = Vt + (nt * 8 + g) * lv + kk + t2;
      const unsigned int b0 = *reinterpret_cast<const unsigned int*>(bp);
      const unsigned int b1 = *reinterpret_cast<const unsigned int*>(bp + 8);
      mma_16816<T>(acc + nt * 4, a0, a1, a2, a3, b0, b1);
    }
  }
}
// CUDA-core path: V natural [k][n] (leading dim lv), Vb points at the warp's first column.
template <typename acc_t>
__device__ __forceinline__ void warp_pv_scalar(acc_t* acc, const acc_t* __restrict__ P, int lp,
                                               const acc_t* __restrict__ Vb, int lv) {
  const int lane = threadIdx.x & 31;
  const acc_t* pp = P + ((lane >> 3) * 4) * lp;
  const acc_t* vp = Vb + (lane & 7) * 4;
  for (int kk = 0; kk < kBK; ++kk) {
    acc_t x[4], y[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      x[u] = pp[u * lp + kk];
      y[u] = vp[kk * lv + u];
    }
#pragma unroll
    for (int ri = 0; ri < 4; ++ri)
#pragma unroll
      for (int ci = 0; ci < 4; ++ci) acc[ri * 4 + ci] += x[ri] * y[ci];
  }
}

// S tile (16 x 32 per warp) of Q rows [64][Dh] (tile Qs, resident when one chunk covers Dh)
// against K rows [64][Dh] (tile Ks). Reloads Q / K per head-dim chunk when Dh > chunk.
// Ends with a __syncthreads (tiles may be overwritten afterwards).
template <typename T>
__device__ __forceinline__ void block_qk(typename Traits<T>::acc* sacc, typename Traits<T>::smem_t* Qs,
                                         typename Traits<T>::smem_t* Ks, bool q_resident,
                                         const T* qbase, long long qstride, int qrows, const int* qrowidx,
                                         const T* kbase, long long kstride, int krows, int Dh, bool vec_qk) {
  typedef typename Traits<T>::smem_t S;
  constexpr bool kMma = Traits<T>::mma;
  const int dqw = dq_width(kMma, Dh), ld = q_ld(kMma, Dh);
  const int warp = threadIdx.x >> 5, wm = warp & 3, wn = warp >> 2;
  const int nchunks = kMma ? 1 : (Dh + kScalarDChunk - 1) / kScalarDChunk;
#pragma unroll
  for (int a = 0; a < 16; ++a) sacc[a] = 0;
  for (int dc = 0; dc < nchunks; ++dc) {
    const int col0 = dc * kScalarDChunk;
    const int ncols = kMma ? Dh : (Dh - col0 < kScalarDChunk ? Dh - col0 : kScalarDChunk);
    const int width = kMma ? dqw : ncols;
    if (!q_resident) load_rows<T, S>(Qs, ld, qbase, qstride, qrows, qrowidx, col0, ncols, width, vec_qk);
    load_rows<T, S>(Ks, ld, kbase, kstride, krows, nullptr, col0, ncols, width, vec_qk);
    __syncthreads();
    if constexpr (kMma) warp_qk<T>(sacc, Qs + wm * 16 * ld, ld, Ks + wn * 32 * ld, ld, width);
    else warp_qk_scalar(sacc, Qs + wm * 16 * ld, ld, Ks + wn * 32 * ld, ld, width);
    __syncthreads();
  }
}

// ------------------------------------------------------------------ forward kernel
// grid (ceil(Nq / 64), H, B), block 256, dynamic smem fwd_smem_bytes(..., kc).
// q [B,H,Nq,Dh], k [B,Hkv,Nk,Dh], v [B,Hkv,Nk,Dv] with the given strides (last dim contiguous).
// bias [B, Nk] (acc, contiguous) or null. rows [R] int64 or null (every row scored).
// out [B,H,Nq,Dv] contiguous. lse2 [B,H,Nq] (log2 units) or null. oacc [B,H,Nq,Dv] acc
// workspace, needed when Nk > kc (several key chunks), else null. partial [B, H*nqb, Nk]
// column sums, only when Nk <= kc (single chunk), else null.
template <typename T>
__global__ void __launch_bounds__(kThreads, Traits<T>::min_blocks) attn_fwd_kernel(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, long long qsb, long long qsh,
    long long qsn, long long ksb, long long ksh, long long ksn, long long vsb, long long vsh, long long vsn,
    const typename Traits<T>::acc* __restrict__ bias, const long long* __restrict__ rows, int R,
    T* __restrict__ out, typename Traits<T>::acc* __restrict__ lse2, typename Traits<T>::acc* __restrict__ oacc,
    typename Traits<T>::acc* __restrict__ partial, int H, int Hkv, int Nq, int Nk, int Dh, int Dv,
    typename Traits<T>::acc scale_log2, int causal, int kc, int vec_qk, int vec_v) {
  typedef typename Traits<T>::acc acc;
  typedef typename Traits<T>::smem_t S;
  constexpr bool kMma = Traits<T>::mma;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int esize = (int)sizeof(S);
  S* Qs = reinterpret_cast<S*>(smem_raw);
  S* KVs = reinterpret_cast<S*>(smem_raw + q_tile_bytes(kMma, Dh, esize));
  acc* Ss = reinterpret_cast<acc*>(smem_raw + q_tile_bytes(kMma, Dh, esize) + kv_tile_bytes(kMma, Dh, esize));
  acc* row_m = reinterpret_cast<acc*>(reinterpret_cast<unsigned char*>(Ss) + s_bytes(kc, (int)sizeof(acc)));
  acc* row_l = row_m + kBQ;
  acc* row_corr = row_l + kBQ;
  acc* row_w = row_corr + kBQ;
  int* row_cnt = reinterpret_cast<int*>(row_w + kBQ);

  const int qb = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (H / Hkv);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp & 3, wn = warp >> 2;
  const int i0 = qb * kBQ;
  const int mrows = Nq - i0 < kBQ ? Nq - i0 : kBQ;
  const int off = Nk - Nq;
  const int lds = s_ld(kc), ld = q_ld(kMma, Dh);
  const acc NEG_INF = neg_inf<acc>();
  // keys any row of the block may see
  int jend = Nk;
  if (causal) {
    jend = i0 + mrows + off;
    jend = jend < 0 ? 0 : (jend > Nk ? Nk : jend);
  }
  const int nchunks = jend > 0 ? (jend + kc - 1) / kc : 1;

  const T* qbase = q + (long long)b * qsb + (long long)h * qsh + (long long)i0 * qsn;
  const T* kbase = k + (long long)b * ksb + (long long)hk * ksh;
  const T* vbase = v + (long long)b * vsb + (long long)hk * vsh;
  const acc* brow = bias ? bias + (long long)b * Nk : nullptr;
  const long long orow0 = ((long long)b * H + h) * Nq;  // row index of (b, h, 0)

  if (tid < kBQ) {
    row_m[tid] = NEG_INF;
    row_l[tid] = 0;
    row_corr[tid] = 1;
    row_cnt[tid] = (partial && !rows && tid < mrows) ? 1 : 0;
  }
  __syncthreads();
  if (partial && rows) {  // how many times each of the block's rows is listed
    for (int e = tid; e < R; e += kThreads) {
      long long i = rows[e];
      if (i < 0) i += Nq;
      if (i >= i0 && i < i0 + mrows) atomicAdd(&row_cnt[(int)(i - i0)], 1);
    }
  }
  const bool q_resident = kMma || Dh <= kScalarDChunk;
  const int dqw = dq_width(kMma, Dh);
  // register-staged K / V tiles (tensor-core path, 16-byte loads, Dh <= 128)
  const bool stage_k = kMma && vec_qk && dqw <= 8 * kKStage * kThreads / kBK;
  const bool stage_v = kMma && vec_v;
  if (q_resident) {
    load_rows<T, S>(Qs, ld, qbase, qsn, mrows, nullptr, 0, Dh, dq_width(kMma, Dh), vec_qk);
  }
  __syncthreads();

  for (int ch = 0; ch < nchunks; ++ch) {
    const int c0 = ch * kc;
    const int clen = jend - c0 < kc ? jend - c0 : kc;  // 0 only when jend == 0
    const int ntiles = (clen + kBK - 1) / kBK;
    const int cw = ntiles * kBK;  // written width of the chunk in Ss
    // ---- 1. logits of the chunk (base 2), masked
    uint4 kst[kKStage];
    if (stage_k && ntiles > 0) fetch_k_regs<T>(kst, kbase + (long long)c0 * ksn, ksn, jend - c0, Dh, dqw);
    for (int t = 0; t < ntiles; ++t) {
      const int j0 = c0 + t * kBK;
      acc sacc[16];
      if constexpr (kMma) {
        if (stage_k) {
          put_k_regs<T>(KVs, ld, kst, dqw);
          __syncthreads();
          if (t + 1 < ntiles)  // next tile's loads in flight during this tile's mma
            fetch_k_regs<T>(kst, kbase + (long long)(j0 + kBK) * ksn, ksn, jend - j0 - kBK, Dh, dqw);
#pragma unroll
          for (int a = 0; a < 16; ++a) sacc[a] = 0;
          warp_qk<T>(sacc, Qs + wm * 16 * ld, ld, KVs + wn * 32 * ld, ld, dqw);
          __syncthreads();
        }
      }
      if (!stage_k)
        block_qk<T>(sacc, Qs, KVs, q_resident, qbase, qsn, mrows, nullptr, kbase + (long long)j0 * ksn, ksn,
                    jend - j0, Dh, vec_qk != 0);
#pragma unroll
      for (int a = 0; a < 16; ++a) {
        const int r = wm * 16 + acc_row<kMma>(a, lane);
        const int c = wn * 32 + acc_col<kMma>(a, lane);
        const int i = i0 + r, j = j0 + c;
        acc s = NEG_INF;
        if (i < Nq && j < jend && (!causal || j <= i + off)) {
          s = sacc[a] * scale_log2;
          if (brow) s += brow[j] * log2e<acc>();
        }
        Ss[r * lds + (j - c0)] = s;
      }
    }
    __syncthreads();
    // ---- 2. online softmax over the chunk, one exp2 per logit, in place
    for (int rr = 0; rr < kBQ / 8; ++rr) {
      const int r = warp * (kBQ / 8) + rr;
      acc* srow = Ss + r * lds;
      acc mx = NEG_INF;
      for (int c = 2 * lane; c < cw; c += 64) {  // cw is a multiple of 64: pairs, no tail
        acc x0, x1;
        load_pair(srow + c, x0, x1);
        mx = nanmax(nanmax(mx, x0), x1);
      }
      mx = warp_nanmax(mx);
      const acc m_old = row_m[r];
      const acc m_new = nanmax(m_old, mx);
      acc sum = 0;
      if (m_new == NEG_INF) {
        for (int c = 2 * lane; c < cw; c += 64) store_pair(srow + c, acc(0), acc(0));
      } else {
        for (int c = 2 * lane; c < cw; c += 64) {
          acc x0, x1;
          load_pair(srow + c, x0, x1);
          const acc p0 = exp2_acc(x0 - m_new), p1 = exp2_acc(x1 - m_new);
          store_pair(srow + c, p0, p1);
          sum += p0 + p1;
        }
      }
      sum = warp_sum(sum);
      __syncwarp();
      if (lane == 0) {
        const acc corr = m_new == NEG_INF ? acc(1) : exp2_acc(m_old - m_new);  // 0 when m_old = -inf
        row_corr[r] = corr;
        row_l[r] = row_l[r] * corr + sum;
        row_m[r] = m_new;
        const acc l = row_l[r];
        // weight of the row in the column sums: cnt / l (l == 0: empty row, adds nothing)
        row_w[r] = row_cnt[r] == 0 ? acc(0) : (l == acc(0) ? acc(0) : acc(row_cnt[r]) / l);
      }
    }
    __syncthreads();
    // ---- 3. column sums of the scored rows (single-chunk mode only)
    if (partial) {
      acc* prow = partial + (((long long)b * H + h) * gridDim.x + qb) * Nk;
      for (int j = tid; j < Nk; j += kThreads) {
        acc s = 0;
        if (j < clen) {
          for (int r = 0; r < kBQ; ++r) {
            if (row_cnt[r] != 0) s += row_w[r] * Ss[r * lds + j];
          }
        }
        prow[j] = s;
      }
    }
    // ---- 4. O = P V, per 64-wide column chunk of Dv
    uint4 vst[2];  // first V tile of the chunk: loads issued before the loop
    if (stage_v && ntiles > 0) fetch_v_regs<T>(vst, vbase + (long long)c0 * vsn, vsn, jend - c0, 0, Dv < kDvChunk ? Dv : kDvChunk);
    const bool last = ch == nchunks - 1;
    for (int dv0 = 0; dv0 < Dv; dv0 += kDvChunk) {
      acc oa[16];
#pragma unroll
      for (int a = 0; a < 16; ++a) {
        oa[a] = 0;
        if (ch > 0) {  // resume from the workspace, rescaled to the new running max
          const int r = wm * 16 + acc_row<kMma>(a, lane), d = dv0 + wn * 32 + acc_col<kMma>(a, lane);
          if (i0 + r < Nq && d < Dv) oa[a] = oacc[(orow0 + i0 + r) * Dv + d] * row_corr[r];
        }
      }
      const int ncols = Dv - dv0 < kDvChunk ? Dv - dv0 : kDvChunk;
      for (int t = 0; t < ntiles; ++t) {
        const int j0 = c0 + t * kBK;
        if (stage_v) {
          if constexpr (kMma) put_v_regs<T>(KVs, vst);
          __syncthreads();
          // prefetch the next (tile, column chunk) of this key chunk
          int tn = t + 1, dn = dv0;
          if (tn == ntiles) {
            tn = 0;
            dn = dv0 + kDvChunk;
          }
          if (dn < Dv)
            fetch_v_regs<T>(vst, vbase + (long long)(c0 + tn * kBK) * vsn, vsn, jend - c0 - tn * kBK, dn,
                            Dv - dn < kDvChunk ? Dv - dn : kDvChunk);
        } else {
          load_v<T, S, kMma>(KVs, vbase + (long long)j0 * vsn, vsn, jend - j0, dv0, ncols, vec_v != 0);
          __syncthreads();
        }
        if constexpr (kMma) {
          warp_pv<T>(oa, Ss + wm * 16 * lds + t * kBK, lds, KVs + wn * 32 * v_ld(true), v_ld(true));
        } else {
          warp_pv_scalar(oa, Ss + wm * 16 * lds + t * kBK, lds, KVs + wn * 32, v_ld(false));
        }
        __syncthreads();
      }
#pragma unroll
      for (int a = 0; a < 16; ++a) {
        const int r = wm * 16 + acc_row<kMma>(a, lane), d = dv0 + wn * 32 + acc_col<kMma>(a, lane);
        if (i0 + r < Nq && d < Dv) {
          const long long o = (orow0 + i0 + r) * Dv + d;
          if (last) {
            const acc l = row_l[r];
            const acc inv = l == acc(0) ? acc(0) : acc(1) / l;  // empty row -> 0; NaN stays NaN
            out[o] = from_acc<T>(oa[a] * inv);
          } else {
            oacc[o] = oa[a];
          }
        }
      }
    }
    __syncthreads();
  }
  if (lse2 && tid < mrows) {
    const acc l = row_l[tid];
    lse2[orow0 + i0 + tid] = l == acc(0) ? NEG_INF : row_m[tid] + log2_acc(l);
  }
}

// ------------------------------------------------------------------ column scores from LSE
// grid (ceil(Nk / 64), H, B), block 256, dynamic smem colscore_smem_bytes(...).
// Entries: rows[e] for e < R (R > 0), or every row (rows null, R = Nq). Each entry adds
// p[i][j] = exp2(s2[i][j] - lse2[i]) to column j; partial[b, h, j] holds the sum.
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_colscore_kernel(
    const T* __restrict__ q, const T* __restrict__ k, long long qsb, long long qsh, long long qsn,
    long long ksb, long long ksh, long long ksn, const typename Traits<T>::acc* __restrict__ bias,
    const long long* __restrict__ rows, int R, const typename Traits<T>::acc* __restrict__ lse2,
    typename Traits<T>::acc* __restrict__ partial, int H, int Hkv, int Nq, int Nk, int Dh,
    typename Traits<T>::acc scale_log2, int causal, int vec_qk) {
  typedef typename Traits<T>::acc acc;
  typedef typename Traits<T>::smem_t S;
  constexpr bool kMma = Traits<T>::mma;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int esize = (int)sizeof(S);
  S* Qs = reinterpret_cast<S*>(smem_raw);
  S* Ks = reinterpret_cast<S*>(smem_raw + q_tile_bytes(kMma, Dh, esize));
  acc* Ps = reinterpret_cast<acc*>(smem_raw + q_tile_bytes(kMma, Dh, esize) + kv_tile_bytes(kMma, Dh, esize));
  acc* row_lse = reinterpret_cast<acc*>(reinterpret_cast<unsigned char*>(Ps) + s_bytes(kBK, (int)sizeof(acc)));
  int* row_idx = reinterpret_cast<int*>(row_lse + 4 * kBQ);

  const int j0 = blockIdx.x * kBK, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (H / Hkv);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp & 3, wn = warp >> 2;
  const int off = Nk - Nq;
  const int lds = s_ld(kBK), ld = q_ld(kMma, Dh);
  const acc NEG_INF = neg_inf<acc>();
  const int nE = rows ? R : Nq;
  const T* qbase = q + (long long)b * qsb + (long long)h * qsh;
  const T* kbase = k + (long long)b * ksb + (long long)hk * ksh + (long long)j0 * ksn;
  const acc* brow = bias ? bias + (long long)b * Nk : nullptr;
  const long long lrow0 = ((long long)b * H + h) * Nq;
  const bool k_resident = kMma || Dh <= kScalarDChunk;
  if (k_resident) load_rows<T, S>(Ks, ld, kbase, ksn, Nk - j0, nullptr, 0, Dh, dq_width(kMma, Dh), vec_qk);
  acc colsum = 0;  // thread tid < 64 owns column j0 + tid

  for (int e0 = 0; e0 < nE; e0 += kBQ) {
    bool sees = false;
    if (tid < kBQ) {
      const int e = e0 + tid;
      long long i = -1;
      if (e < nE) {
        i = rows ? rows[e] : (long long)e;
        if (i < 0) i += Nq;
        if (i < 0 || i >= Nq) i = -1;  // out of range: ignored (see the header)
      }
      acc l = NEG_INF;
      if (i >= 0) {
        l = lse2[lrow0 + i];
        if (l == NEG_INF) i = -1;  // no admissible key: the row adds nothing
      }
      row_idx[tid] = (int)i;
      row_lse[tid] = l;
      sees = i >= 0 && (!causal || (long long)j0 <= i + off);
    }
    if (!__syncthreads_or(sees)) continue;  // block-uniform; also publishes row_idx / row_lse
    acc sacc[16];
    // Ks is either resident (loaded above) or reloaded per chunk by block_qk (q_resident
    // is false here: the Q rows change every iteration; K takes block_qk's reload slot).
    if (k_resident) {
      load_rows<T, S>(Qs, ld, qbase, qsn, 0, row_idx, 0, Dh, dq_width(kMma, Dh), vec_qk);
      __syncthreads();
#pragma unroll
      for (int a = 0; a < 16; ++a) sacc[a] = 0;
      if constexpr (kMma) warp_qk<T>(sacc, Qs + wm * 16 * ld, ld, Ks + wn * 32 * ld, ld, dq_width(kMma, Dh));
      else warp_qk_scalar(sacc, Qs + wm * 16 * ld, ld, Ks + wn * 32 * ld, ld, dq_width(kMma, Dh));
    } else {
      block_qk<T>(sacc, Qs, Ks, false, qbase, qsn, 0, row_idx, kbase, ksn, Nk - j0, Dh, vec_qk != 0);
    }
#pragma unroll
    for (int a = 0; a < 16; ++a) {
      const int r = wm * 16 + acc_row<kMma>(a, lane);
      const int c = wn * 32 + acc_col<kMma>(a, lane);
      const int i = row_idx[r], j = j0 + c;
      acc p = 0;
      if (i >= 0 && j < Nk && (!causal || j <= i + off)) {
        acc s = sacc[a] * scale_log2;
        if (brow) s += brow[j] * log2e<acc>();
        p = exp2_acc(s - row_lse[r]);
      }
      Ps[r * lds + c] = p;
    }
    __syncthreads();
    if (tid < kBK) {
      for (int r = 0; r < kBQ; ++r) colsum += Ps[r * lds + tid];
    }
    __syncthreads();
  }
  if (tid < kBK && j0 + tid < Nk) partial[((long long)b * H + h) * Nk + j0 + tid] = colsum;
}

// ------------------------------------------------------------------ final reduction
// grid (ceil(Nk / 256), B), block 256: scores[b, j] = inv_denom * sum_{p < P} partial[b, p, j].
template <typename acc>
__global__ void __launch_bounds__(kThreads) attn_reduce_scores_kernel(const acc* __restrict__ partial, int P,
                                                                      int Nk, acc inv_denom,
                                                                      acc* __restrict__ scores) {
  const int j = blockIdx.x * kThreads + threadIdx.x, b = blockIdx.y;
  if (j >= Nk) return;
  const acc* p = partial + (long long)b * P * Nk + j;
  acc s = 0;
  for (int e = 0; e < P; ++e) s += p[(long long)e * Nk];
  scores[(long long)b * Nk + j] = s * inv_denom;
}

#endif  // TR_ATTN_LAYOUT_ONLY

}  // namespace attn
}  // namespace tokenreduce

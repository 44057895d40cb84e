// Shared helpers for the CPU kernels: argument checks with op-named messages,
// float accumulation helpers, a vectorisable exp, and a small GEMM wrapper.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace tokenreduce {

// Accumulation type: float for half/bfloat16/float, double for double.
template <typename T>
using acc_t = at::opmath_type<T>;

// ---- argument checks: every message starts with "tokenreduce.<op>: " ----
#define TR_CHECK(op, cond, ...) TORCH_CHECK(cond, "tokenreduce." op ": ", __VA_ARGS__)
#define TR_CHECK_VALUE(op, cond, ...) \
  TORCH_CHECK_VALUE(cond, "tokenreduce." op ": ", __VA_ARGS__)
#define TR_CHECK_INDEX(op, cond, ...) \
  TORCH_CHECK_INDEX(cond, "tokenreduce." op ": ", __VA_ARGS__)
#define TR_CHECK_TYPE(op, cond, ...) \
  TORCH_CHECK_TYPE(cond, "tokenreduce." op ": ", __VA_ARGS__)

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "tokenreduce.", op, ": ", name,
                   " must be a floating tensor (float32, float16, bfloat16 or float64), got ",
                   t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                      const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, "tokenreduce.", op, ": ", name, " must have shape ", shape,
                    " (", dim, " dims), got ", t.sizes());
}

inline void check_device(const char* op, const char* name, const at::Tensor& t,
                         const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "tokenreduce.", op, ": ", name, " is on ",
                    t.device(), " but the input is on ", ref.device());
}

inline void check_long(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "tokenreduce.", op, ": ", name,
                   " must be an int64 tensor, got ", t.scalar_type());
}

// Make the last dimension unit-stride (other strides are kept); copies only when needed.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  if (t.dim() == 0 || t.stride(-1) == 1 || t.size(-1) <= 1) return t;
  return t.contiguous();
}

// ---- parallel loops ----

// Below this many (rough) flops a loop runs on the calling thread: waking the pool
// costs more than the work, and on a loaded machine a parallel region of tiny tasks
// can wait milliseconds for a descheduled worker.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;

// at::parallel_for over [0, n) with a grain derived from the cost of one item.
template <typename F>
inline void parallel_for_cost(int64_t n, int64_t cost_per_item, const F& f) {
  if (n <= 0) return;
  const int64_t cost = std::max<int64_t>(cost_per_item, 1);
  if (n == 1 || n * cost < kMinParallelWork) {
    f(int64_t(0), n);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / cost);
  at::parallel_for(0, n, grain, f);
}

// Uninitialised buffer of n elements (at least 1), for scratch whose every element is
// written before it is read (a std::vector would zero-fill it first).
template <typename T>
inline std::unique_ptr<T[]> uninitialised(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// ---- element helpers ----

// dst[0:n] = (acc) src[0:n]
template <typename scalar_t, typename acc>
inline void load_row(const scalar_t* src, int64_t n, acc* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc>(src[i]);
}

// dst[0:n] = (acc) src[0:n] * s
template <typename scalar_t, typename acc>
inline void load_row_scaled(const scalar_t* src, int64_t n, acc s, acc* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc>(src[i]) * s;
}

template <typename acc>
inline acc dot(const acc* a, const acc* b, int64_t n) {
#if defined(__AVX512F__)
  // float32 with AVX-512: four zmm accumulators and a masked tail. The single accumulator of
  // the plain loop waits on the FMA latency (one 8-wide FMA per 4 cycles): the norms and
  // rescoring passes of kcenter / recycle took 10-15% of those ops at D = 1024.
  if constexpr (std::is_same_v<acc, float>) {
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
      s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
      s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i < n; i += 16) {
      const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1u);
      s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
  }
#endif
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc>
inline acc sqdist(const acc* a, const acc* b, int64_t n) {
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const acc d = a[i] - b[i];
    s += d * d;
  }
  return s;
}

// Squared norm of a row of any dtype, accumulated in acc.
template <typename scalar_t, typename acc>
inline acc row_sqnorm(const scalar_t* src, int64_t n) {
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const acc v = static_cast<acc>(src[i]);
    s += v * v;
  }
  return s;
}

// 1 / max(||v||, 1e-12): a zero row normalises to zero instead of NaN.
template <typename acc>
inline acc inv_norm(acc sqnorm) {
  const acc n = std::sqrt(sqnorm);
  return acc(1) / (n > acc(1e-12) ? n : acc(1e-12));
}

// Inverse norm of a row whose squared norm `sqnorm = dot(row, row)` was already taken, with
// `ok` = false when the row holds NaN or Inf. A finite row whose squared norm overflows
// (|x| > ~1e19 in float32) is rescaled by its largest magnitude instead of being taken for a
// non-finite one.
template <typename acc>
inline acc inv_norm_checked(const acc* row, int64_t n, acc sqnorm, bool& ok) {
  ok = true;
  if (std::isfinite(static_cast<double>(sqnorm))) return inv_norm(sqnorm);
  acc m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc a = std::abs(row[i]);
    if (!std::isfinite(static_cast<double>(a))) {
      ok = false;
      return acc(0);
    }
    m = a > m ? a : m;
  }
  acc s = 0;
  for (int64_t i = 0; i < n; ++i) s += (row[i] / m) * (row[i] / m);
  return acc(1) / (m * std::sqrt(s));
}

// exp(x) for float, branch-free so loops over it vectorise (Cephes-style
// range reduction and a degree-6 polynomial, about 2 ulp). exp(x < -87) is
// flushed to 0 (exp(-inf) == 0), NaN propagates.
inline float fast_exp(float x) {
  const bool under = x < -87.0f;
  float xc = x > 88.3f ? 88.3f : x;
  xc = xc < -87.0f ? -87.0f : xc;
  const float t = xc * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest, vectorisable
  const float r = xc - fn * 0.693359375f + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return under ? 0.0f : p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

// ---- GEMM on raw row-major buffers ----
// Float and double go straight to the BLAS that ATen's CPU matmul calls (sgemm_/dgemm_,
// MKL's Fortran interface exported by libtorch_cpu; declared weak: a torch without them
// takes the at::mm_out path), saving the tensor wrapping and dispatch of each small GEMM
// (several microseconds, a call per block in the attention kernel). Same routine, same
// threading rule (single-threaded inside a parallel region) as at::mm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

// Row-major C[m, n] = op(A) @ op(B) by the column-major BLAS: C^T = op(B)^T op(A)^T.
// b_transposed: B is stored [n, kd] (C = A B^T), else [kd, n]. False if not handled.
template <typename acc>
inline bool blas_gemm_rowmajor(bool b_transposed, const acc* a, int64_t lda, const acc* b,
                               int64_t ldb, acc* c, int64_t ldc, int64_t m, int64_t n,
                               int64_t kd, acc alpha = acc(1)) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (m > kMax || n > kMax || kd > kMax || lda > kMax || ldb > kMax || ldc > kMax) return false;
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(kd);
  const int LA = static_cast<int>(ldb), LB = static_cast<int>(lda), LC = static_cast<int>(ldc);
  const char ta = b_transposed ? 'T' : 'N', tb = 'N';
  if ((b_transposed ? LA < K : LA < M) || LB < K || LC < M) return false;
  if constexpr (std::is_same_v<acc, float>) {
    if (sgemm_ == nullptr) return false;
    const float zero = 0.0f;
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LA, a, &LB, &zero, c, &LC);
    return true;
  } else if constexpr (std::is_same_v<acc, double>) {
    if (dgemm_ == nullptr) return false;
    const double zero = 0.0;
    dgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LA, a, &LB, &zero, c, &LC);
    return true;
  }
  return false;
}

// C[m, n] = alpha A[m, kd] @ B[n, kd]^T, with leading dimensions lda, ldb, ldc (unit inner
// stride).
template <typename acc>
inline void gemm_abt(const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c, int64_t ldc,
                     int64_t m, int64_t n, int64_t kd, acc alpha = acc(1)) {
  if (m == 0 || n == 0) return;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value);
  if (kd == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = 0;
    return;
  }
  if (blas_gemm_rowmajor(true, a, lda, b, ldb, c, ldc, m, n, kd, alpha)) return;
  at::Tensor A = at::from_blob(const_cast<acc*>(a), {m, kd}, {lda, 1}, opts);
  at::Tensor B = at::from_blob(const_cast<acc*>(b), {n, kd}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::mm_out(C, A, B.t());
  if (alpha != acc(1)) C.mul_(alpha);
}

// C[m, n] = A[m, kd] @ B[kd, n], B row-major with leading dimension ldb.
template <typename acc>
inline void gemm_ab(const acc* a, int64_t lda, const acc* b, int64_t ldb, acc* c, int64_t ldc,
                    int64_t m, int64_t n, int64_t kd) {
  if (m == 0 || n == 0) return;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value);
  if (kd == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = 0;
    return;
  }
  if (blas_gemm_rowmajor(false, a, lda, b, ldb, c, ldc, m, n, kd)) return;
  at::Tensor A = at::from_blob(const_cast<acc*>(a), {m, kd}, {lda, 1}, opts);
  at::Tensor B = at::from_blob(const_cast<acc*>(b), {kd, n}, {ldb, 1}, opts);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  at::mm_out(C, A, B);
}

// Best (value, index) with ties to the smallest index; NaN never wins.
template <typename acc>
struct ArgMax {
  acc value = -std::numeric_limits<acc>::infinity();
  int64_t index = -1;
  inline void push(acc v, int64_t i) {
    if (v > value || (index < 0 && !(v != v))) {  // first finite-or-inf candidate
      value = v;
      index = i;
    }
  }
};

}  // namespace tokenreduce

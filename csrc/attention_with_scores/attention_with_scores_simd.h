// AVX-512 row kernels of the CPU attention_with_scores (float32 only): the softmax row pass
// in place, with fast_exp's range reduction and polynomial (cpu_utils.h) and the 2^n scaling
// done by vscalefps, so a 16-lane exp is ~14 instructions instead of the ~25 the compiler
// makes of the scalar fast_exp's clamps and selects. Same values as fast_exp: exp(x < -87)
// is exactly 0 (masked keys, no denormals reach the P V GEMM), NaN propagates.
// Without AVX-512 (or for other dtypes) the kernel keeps its portable loops.
#pragma once

#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define TOKENREDUCE_ATTENTION_AVX512 1

namespace tokenreduce {
namespace attention_simd {

// exp of 16 lanes: fast_exp's Cephes reduction x = n ln2 + r, p(r), then scalef(p, n).
inline __m512 exp16(__m512 x) {
  // lanes kept: x >= -87 or NaN (unordered compares true), the others flush to 0
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  // max/min return their second operand when one is NaN: NaN lanes pass through
  __m512 xc = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  xc = _mm512_min_ps(_mm512_set1_ps(88.3f), xc);
  const __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(fn, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, fn));
}

// max of s[0:n] (-inf when empty); NaN lanes are skipped (vmaxps returns its second operand,
// the running max, when a lane is NaN). Four accumulators: one waits on vmaxps's latency.
inline float row_max(const float* s, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = _mm512_max_ps(_mm512_loadu_ps(s + j), m0);
    m1 = _mm512_max_ps(_mm512_loadu_ps(s + j + 16), m1);
    m2 = _mm512_max_ps(_mm512_loadu_ps(s + j + 32), m2);
    m3 = _mm512_max_ps(_mm512_loadu_ps(s + j + 48), m3);
  }
  for (; j < n; j += 16) {
    const int64_t left = n - j;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    m0 = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, m, s + j), m0);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
}

// s[0:n] = exp(s[j] - mx) in place; returns their sum (two accumulators, then one reduction).
inline float exp_sub_sum_inplace(float* s, int64_t n, float mx) {
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), vmx));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j + 16), vmx));
    _mm512_storeu_ps(s + j, e0);
    _mm512_storeu_ps(s + j + 16, e1);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; j < n; j += 16) {
    const int64_t left = n - j;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmx)));
    _mm512_mask_storeu_ps(s + j, m, e);
    acc0 = _mm512_add_ps(acc0, e);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

}  // namespace attention_simd
}  // namespace tokenreduce
#endif

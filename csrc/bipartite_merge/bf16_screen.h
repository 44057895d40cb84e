// bfloat16 screening of cosine scores (bipartite_merge, recycle on the CPU).
//
// The unit rows are rounded to bf16 and scored by one bf16 GEMM (AMX / AVX512-BF16 through
// oneDNN, several times the float32 GEMM's speed). For each scored row only the columns
// whose screened score r_c lies within `screen_margin` of the row's screened maximum M are
// rescored in float32; the bound is rigorous, so the chosen column (first maximum of the
// float32 scores) and its score are those of the float32 computation.
//
// Bound. s_c: exact dot of the float32 unit rows a, b_c; f_c: its float32 rescoring;
// g_c: the GEMM's float32 accumulation of the bf16 rows a' = a + da, b_c' = b_c + db_c;
// r_c = bf16(g_c). With ea = ||da||, eb = max_c ||db_c|| (measured while rounding, see
// to_bf16_scaled):
//   |g_c - s_c| <= ||da|| ||b_c|| + ||a'|| ||db_c|| + gamma_d <= ea + (1 + ea) eb + gamma_d,
//   |f_c - s_c| <= eps_f,  |r_c - g_c| <= u |g_c|  (u = 2^-8, round to nearest even).
// The float32 argmax c* has f_c* >= f_c for the screened argmax c, hence
//   r_c* >= M - 2.05 u |M| - (1 + 2u) 2 (ea + (1 + ea) eb + fp_err(d)),
// fp_err(d) >= gamma_d + eps_f covering the float32 accumulations and the norms. The
// measured rounding errors (about 2^-8 / sqrt(3) for a unit row, against the worst case
// 2^-8) make the margin about three times tighter than a worst-case bound, so about a
// third as many columns are rescored.
//
// Whether the screen pays is measured, not assumed (`screen_pays`): with AMX the bf16 GEMMs ran
// ~4x the float32 rate, with AVX512-BF16 on an AMD Zen 4 1.5-3.4x (the main job's GEMMs); on a
// Xeon whose VM hides AMX, oneDNN's AVX512-BF16 path ran 0.5-0.7x the float32 rate (36 against
// 49-71 GMAC/s), and the screen made recycle and bipartite_merge ~1.4-1.5x slower than their
// float32 path.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>

#include "../common/cpu_utils.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace tokenreduce {
namespace screen {

constexpr float kUnitRoundoff = 1.0f / 256.0f;  // bf16, round to nearest even

// Bound on the float32 accumulation errors of one score (GEMM, rescoring, norms) for unit
// rows of width d: 1.1 d 2^-24 each, plus 1e-5 for the inverse norms.
inline float fp_err(int64_t d) { return static_cast<float>(2.2 * static_cast<double>(d) / 16777216.0 + 1e-5); }

// dst[0:d] = bf16(row[0:d] * w), round to nearest even on the bits (row * w finite and at
// most 1 in magnitude: a unit row), so the loop vectorises, unlike c10::BFloat16's NaN-aware
// conversion. Returns an upper bound on || bf16(row * w) - row * w ||_2.
template <typename acc>
inline float to_bf16_scaled(const acc* row, int64_t d, float w, at::BFloat16* dst) {
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
#if defined(__AVX512F__)
  // float32 rows: the same rounding as the loop below in zmm registers (the compiler's
  // version of that loop ran 8 lanes with a word permute per store: ~30% of recycle's
  // assignment pass at D = 1024)
  if constexpr (std::is_same_v<acc, float>) {
    const __m512 wv = _mm512_set1_ps(w);
    const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    // rounds 16 lanes at i (mask m) and adds their squared rounding errors to e
    auto step = [&](int64_t i, __mmask16 m, __m512 e) {
      const __m512 f = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + i), wv);
      const __m512i bits = _mm512_castps_si512(f);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), one);
      const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(bits, bias), lsb), high);
      _mm512_mask_cvtepi32_storeu_epi16(out + i, m, _mm512_srli_epi32(rounded, 16));
      const __m512 diff = _mm512_sub_ps(f, _mm512_castsi512_ps(rounded));  // exact (Sterbenz)
      return _mm512_fmadd_ps(diff, diff, e);
    };
    __m512 e0 = _mm512_setzero_ps(), e1 = e0;
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
      e0 = step(i, 0xFFFF, e0);
      e1 = step(i + 16, 0xFFFF, e1);
    }
    for (; i < d; i += 16)
      e0 = step(i, static_cast<__mmask16>(d - i >= 16 ? 0xFFFFu : (1u << (d - i)) - 1u), e0);
    return std::sqrt(_mm512_reduce_add_ps(_mm512_add_ps(e0, e1))) * 1.001f + 1e-12f;
  }
#endif
  float e2 = 0;
#pragma omp simd reduction(+ : e2)
  for (int64_t i = 0; i < d; ++i) {
    uint32_t bits;
    const float f = static_cast<float>(row[i]) * w;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    out[i] = static_cast<uint16_t>(rounded >> 16);
    float g;
    std::memcpy(&g, &rounded, sizeof g);
    const float diff = f - g;  // exact (Sterbenz)
    e2 += diff * diff;
  }
  // the squares and their float32 sum round by at most d 2^-24 relative: 1.001 covers it
  return std::sqrt(e2) * 1.001f + 1e-12f;
}

// How far below the row's screened maximum `mx` a screened score may lie and still be the
// float32 maximum: ea = the scored row's rounding error, eb = the largest column rounding
// error, fp = fp_err(d).
inline float screen_margin(float mx, float ea, float eb, float fp) {
  const float u = kUnitRoundoff;
  return 2.05f * u * std::abs(mx) + (1.0f + 2.0f * u) * 2.0f * (ea + (1.0f + ea) * eb + fp);
}

// Screened scores as float: a bf16 value is the high half of its float (c10::BFloat16's
// conversion, as a shift the loops below vectorise; its scalar operator float does not).
inline float bf16_value(const at::BFloat16* row, int64_t c) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(row)[c]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// max of row[c0:c1) (finite scores of unit rows; -inf when empty)
inline float bf16_max(const at::BFloat16* row, int64_t c0, int64_t c1) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = c0; c < c1; ++c) {
    const float v = bf16_value(row, c);
    mx = v > mx ? v : mx;
  }
  return mx;
}

// how many of row[c0:c1) are >= thr
inline int64_t bf16_count_at_least(const at::BFloat16* row, int64_t c0, int64_t c1, float thr) {
  int64_t n = 0;
#pragma omp simd reduction(+ : n)
  for (int64_t c = c0; c < c1; ++c) n += bf16_value(row, c) >= thr;
  return n;
}

// The bf16 GEMM's speed over the float32 one's on this machine, for the screen's shape of
// product ([256, 1024] x [64, 1024]^T) on one thread (each task of the ops runs its GEMMs
// single-threaded, inside a parallel region): best of 5 timed calls each, after a warm-up.
inline double measure_bf16_speedup() {
  constexpr int64_t m = 256, n = 64, k = 1024;
  double speedup = 0;
  auto time_best = [](auto&& f) {
    f();
    double best = std::numeric_limits<double>::infinity();
    for (int rep = 0; rep < 5; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      f();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  auto run = [&] {
    std::vector<float> a(m * k), b(n * k), c(m * n);
    for (int64_t i = 0; i < m * k; ++i) a[i] = static_cast<float>((i * 7919) % 1000) * 1e-3f - 0.5f;
    for (int64_t i = 0; i < n * k; ++i) b[i] = static_cast<float>((i * 104729) % 1000) * 1e-3f - 0.5f;
    std::unique_ptr<at::BFloat16[]> a16(new at::BFloat16[m * k]), b16(new at::BFloat16[n * k]), c16(new at::BFloat16[m * n]);
    for (int64_t i = 0; i < m * k; ++i) a16[i] = a[i];
    for (int64_t i = 0; i < n * k; ++i) b16[i] = b[i];
    const double t32 = time_best([&] { gemm_abt(a.data(), k, b.data(), k, c.data(), n, m, n, k); });
    const double t16 = time_best([&] { gemm_abt(a16.get(), k, b16.get(), k, c16.get(), n, m, n, k); });
    speedup = t16 > 0 ? t32 / t16 : 0;
  };
  // inside a parallel region (task 0; the others return), so the GEMMs run on one thread
  const int64_t nt = at::get_num_threads();
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t) {
    if (t0 == 0) run();
  });
  return speedup;
}

// The bf16 screen runs where its GEMM is at least this much faster than the float32 one: the
// screen also rounds every row to bf16 and rescores its candidates in float32 (~15-20 % of the
// op where it pays), which the float32 path does not.
constexpr double kMinBf16Speedup = 1.3;

// Measured once per process (the first wide call of bipartite_merge or recycle, a few ms).
inline double bf16_speedup() {
  static const double s = measure_bf16_speedup();
  return s;
}

// Whether the ops screen with bf16 on this machine. TOKENREDUCE_BF16_SCREEN=on|off (read per
// call) forces it, for tests and benchmarks; otherwise bf16_speedup() >= kMinBf16Speedup.
// Either way the choices are the float32 ones (the bound above is rigorous).
inline bool screen_pays() {
  if (const char* env = std::getenv("TOKENREDUCE_BF16_SCREEN")) {
    const std::string v(env);
    if (v == "on") return true;
    if (v == "off") return false;
  }
  return bf16_speedup() >= kMinBf16Speedup;
}

}  // namespace screen
}  // namespace tokenreduce

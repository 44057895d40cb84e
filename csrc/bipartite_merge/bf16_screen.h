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
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

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

}  // namespace screen
}  // namespace tokenreduce

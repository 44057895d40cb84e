// kcenter on the CPU: greedy max-min (Gonzalez) selection, DivPrune's k-center.
// (Over 400 lines: the three schedules and the isolated search share the sweep, its
// micro-kernel, the row loading, the speculation state and the cost model; split into
// files they would need a header of these internals.)
//
// Each pick lowers every token's running min-distance by its distance to the new pick and
// takes the farthest eligible, not-yet-picked token next (ties to the smallest index). The
// picks are sequential, so the work is k passes over a batch row's tokens X [N, D]. What
// limits it is where X comes from on each pass: streamed from memory/L3 it is bandwidth-
// bound; resident in the core's L2 it runs several times faster. So the kernel runs all k
// picks of a batch row while that row (or the thread's slice of it) stays cache-resident,
// choosing one of three schedules by a cost model (`choose_schedule`):
//  * rows:  one batch row per thread (B >= threads, the row within twice the per-core
//           cache budget), no synchronisation; the sweep direction alternates each pass,
//           so the part of X that the last pass left in cache is read first.
//  * split: every thread owns a slice of the row's tokens (B < threads, or the row is
//           over twice one core's cache budget but its slices fit): per pick each thread
//           sweeps its slice, posts its best token, and after a spin barrier all threads
//           reduce the posts in slice order (ties keep the smaller index), the same on
//           every thread. Needs the OpenMP backend (the team's threads run concurrently).
//  * gram:  cosine with k/N large: one GEMM X X^T [N, N] (at GEMM speed, ~3x the flop rate
//           of the pick sweeps) and then k cheap passes over rows of the Gram matrix; it
//           wins when N^2 D / r_gemm < k N D / r_sweep, i.e. k >= N / kGramRatio.
// TOKENREDUCE_KCENTER_SCHEDULE=rows|split|gram (read per call; default: the cost model)
// forces a schedule where it applies (gram: cosine only; split: OpenMP builds), for
// benchmarks and tests.
// Speculation: each pass over X also computes the distances to the last step's three
// runners-up (the likely next picks; `Speculation`); a pick among them reads its stored
// distances instead of X. Exact: the picks and mindist are those of the plain greedy, with
// about 24 instead of 64 passes at N=576 D=1024 k=64 (random tokens). Measured (one
// thread, same run): the gram schedule costs ~3x the sweeps at k = N/9, so it wins from
// k ~ N/3 (kGramRatio).
// Every distance is computed by the same 4-row x 4-vector micro-kernel whatever the
// schedule, slice, slot or position (a partial block repeats its last row), so identical
// tokens get bit-identical distances (ties resolve by index) and the result does not
// depend on the thread count or the batch split. (Seven candidates per pass with a
// 2-row x 8-vector kernel, 16 instead of 24 passes, measured ~15% slower on the 2-core
// Xeon: the passes are near the FMA limit, so the extra 1/3 of FMAs costs more than the
// X traffic saved.)
// "isolated" (DivPrune's first pick, the token farthest from its nearest neighbour):
// all N^2 pairs would cost ~N/k times the picks (a [576, 576] GEMM per row took ~6x the
// 64 picks). `IsoSearch` finds the same token from upper bounds of each token's nearest-
// neighbour distance and exact passes for the likely winners; random tokens in D=1024
// need ~1/4 of the pairs (~5x faster than the GEMM, measured), clustered or image tokens
// a few percent. With a kept Gram matrix (the gram schedule) it reads the matrix instead.
// TOKENREDUCE_KCENTER_ISOLATED=full forces the all-pairs GEMM path (tests, benchmarks).
// Machines: the model reads L2 from sysconf; on an AMD EPYC (512 KiB-1 MiB L2 per core)
// no half row fits L2 either, so the rule (split only when the row overflows twice the
// budget and its slices fit) keeps the barrier-free rows schedule there too. At the bench
// shape (B=8 N=576 D=1024, a 2.36 MB row, 2 MiB L2) the rows schedule runs; split
// (TOKENREDUCE_KCENTER_SCHEDULE=split) measured 2-5x slower on the loaded 2-core Xeon (a
// descheduled peer stalls every per-pick barrier), and rows already reads most of X from
// L2 (the alternating sweep direction).
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm512_undefined_*() inside its own AVX-512 intrinsics (a false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <torch/library.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>

#include "../common/cpu_utils.h"  // also <immintrin.h> where AVX-512 is on
#include "kcenter_checks.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "kcenter";
constexpr int64_t kTile = 256;        // row tile of the nearest-neighbour GEMM
constexpr int64_t kGramRatio = 3;     // gram schedule when k >= N / kGramRatio (cosine)
constexpr int64_t kGramMinN = 128;    // ... and N at least this (small rows: sweeps are cheap)
constexpr int64_t kGramMaxElems = int64_t(1) << 24;  // N^2 floats kept per thread at most
constexpr int64_t kSplitMinWork = int64_t(1) << 15;  // floats per thread and pick in split

// Per-core cache budget for the resident rows: 3/4 of L2 (sysconf), 1 MiB if unknown.
int64_t cache_budget_bytes() {
  static const int64_t bytes = [] {
    long l2 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return static_cast<int64_t>(l2 > 0 ? l2 : (1 << 20)) * 3 / 4;
  }();
  return bytes;
}

template <typename acc>
struct Rows {  // the batch row's tokens as acc rows (borrowed or converted) and 1/norms
  const acc* ptr = nullptr;
  int64_t ld = 0;
  std::vector<acc> buf, inv, sq;
};

template <typename scalar_t, typename acc>
void load_rows(Rows<acc>& R, const scalar_t* base, int64_t row_stride, int64_t N, int64_t D,
               bool cosine, int64_t b) {
  bool borrowed = false;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (row_stride >= D) {
      R.ptr = base;
      R.ld = row_stride;
      borrowed = true;
    }
  }
  if (!borrowed) {
    R.buf.resize(std::max<int64_t>(N * D, 1));
    for (int64_t n = 0; n < N; ++n) load_row(base + n * row_stride, D, R.buf.data() + n * D);
    R.ptr = R.buf.data();
    R.ld = D;
  }
  R.inv.resize(N);
  R.sq.resize(N);
  std::vector<int64_t> huge;  // finite rows whose squared norm overflows (|x| > ~1e19 in float32)
  for (int64_t n = 0; n < N; ++n) {
    const acc s = dot(R.ptr + n * R.ld, R.ptr + n * R.ld, D);
    R.sq[n] = s;
    R.inv[n] = cosine ? inv_norm(s) : acc(1);
    if (!std::isfinite(static_cast<double>(s))) {
      bool finite;
      const acc iv = inv_norm_checked(R.ptr + n * R.ld, D, s, finite);
      TORCH_CHECK_VALUE(finite, "tokenreduce.kcenter: x has a non-finite value (NaN or Inf) in batch ", b,
                        ", token ", n);
      TORCH_CHECK_VALUE(cosine, "tokenreduce.kcenter: x has finite values too large for float32 l2 distances "
                        "(the squared norm of batch ", b, ", token ", n, " overflows): scale x down");
      R.inv[n] = iv;
      huge.push_back(n);
    }
  }
  if (!huge.empty()) {  // cosine: those rows become unit rows (inverse norm 1), their own copy
    if (R.ptr != R.buf.data()) {  // borrowed rows: copy them first (the input is never written)
      std::vector<acc> copy(std::max<int64_t>(N * D, 1));
      for (int64_t n = 0; n < N; ++n) std::copy(R.ptr + n * R.ld, R.ptr + n * R.ld + D, copy.data() + n * D);
      R.buf.swap(copy);
      R.ptr = R.buf.data();
      R.ld = D;
    }
    for (const int64_t n : huge) {
      acc* row = R.buf.data() + n * D;
      for (int64_t d = 0; d < D; ++d) row[d] *= R.inv[n];
      R.sq[n] = dot(row, row, D);
      R.inv[n] = acc(1);
    }
  }
}

// Best (value, index): larger value, ties to the smaller index, in any visiting order.
template <typename acc>
struct Best {
  acc value = -std::numeric_limits<acc>::infinity();
  int64_t index = -1;
  inline void push(acc v, int64_t i) {
    if (v != v) return;  // NaN never wins
    if (index < 0 || v > value || (v == value && i < index)) {
      value = v;
      index = i;
    }
  }
};

constexpr int kCand = 3;  // speculative candidates per pass over X
// The first kPrefetchLines lines of each row of the next 4-token block are prefetched: a
// row is one 4 KB page, where the hardware streamer starts over (measured in one process,
// blocks of calls: ~2.5 % faster at the bench shape with 4 lines one block ahead; 8 lines,
// 16 lines or 2-4 blocks ahead gained less or lost).
constexpr int64_t kPrefetchLines = 4;

// The best kCand + 1 (value, index) under Best's order, best first: the next pick and the
// runners-up, the speculative candidates of the next pass over X (see `Speculation`).
template <typename acc>
struct BestK {
  Best<acc> at[kCand + 1];
  static inline bool better(acc v, int64_t i, const Best<acc>& b) {
    return b.index < 0 || v > b.value || (v == b.value && i < b.index);
  }
  inline void push(acc v, int64_t i) {
    if (v != v || !better(v, i, at[kCand])) return;  // NaN never wins
    int r = kCand;
    while (r > 0 && better(v, i, at[r - 1])) {
      at[r] = at[r - 1];
      --r;
    }
    at[r].value = v;
    at[r].index = i;
  }
  inline void merge(const BestK& o) {
    for (const auto& e : o.at)
      if (e.index >= 0) push(e.value, e.index);
  }
};

// For four rows r_q and four vectors v (the pick and up to three candidates; unused ones
// repeat the pick): s[4 * v + q] = <v, r_q> (cosine) or |v - r_q|^2 (l2). The one code path
// for every distance the sweeps compute, so each (vector, token) pair gets the same bits
// whichever slot, block or schedule computes it. 16 FMAs per 8 loads: with 512-bit vectors
// it runs near the FMA limit while X streams from L2.
// GCC vectorises with 256-bit registers by default even where AVX-512 is there; this loop
// is FMA-bound, so it asks for 512-bit ones (a preference only: no AVX-512, no effect).
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#define TR_WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define TR_WIDE_VECTORS
#endif

template <typename acc, bool cosine>
TR_WIDE_VECTORS void block4x4(const acc* const* v, const acc* r0, const acc* r1, const acc* r2,
                              const acc* r3, int64_t D, acc* s) {
  const acc *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
  acc a00 = 0, a01 = 0, a02 = 0, a03 = 0, a10 = 0, a11 = 0, a12 = 0, a13 = 0;
  acc a20 = 0, a21 = 0, a22 = 0, a23 = 0, a30 = 0, a31 = 0, a32 = 0, a33 = 0;
#define TR_TERM(vv, xx) (cosine ? (vv) * (xx) : ((vv) - (xx)) * ((vv) - (xx)))
#pragma omp simd reduction(+ : a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, \
                               a30, a31, a32, a33)
  for (int64_t d = 0; d < D; ++d) {
    const acc x0 = r0[d], x1 = r1[d], x2 = r2[d], x3 = r3[d];
    const acc p0 = v0[d], p1 = v1[d], p2 = v2[d], p3 = v3[d];
    a00 += TR_TERM(p0, x0);
    a01 += TR_TERM(p0, x1);
    a02 += TR_TERM(p0, x2);
    a03 += TR_TERM(p0, x3);
    a10 += TR_TERM(p1, x0);
    a11 += TR_TERM(p1, x1);
    a12 += TR_TERM(p1, x2);
    a13 += TR_TERM(p1, x3);
    a20 += TR_TERM(p2, x0);
    a21 += TR_TERM(p2, x1);
    a22 += TR_TERM(p2, x2);
    a23 += TR_TERM(p2, x3);
    a30 += TR_TERM(p3, x0);
    a31 += TR_TERM(p3, x1);
    a32 += TR_TERM(p3, x2);
    a33 += TR_TERM(p3, x3);
  }
#undef TR_TERM
  s[0] = a00; s[1] = a01; s[2] = a02; s[3] = a03;
  s[4] = a10; s[5] = a11; s[6] = a12; s[7] = a13;
  s[8] = a20; s[9] = a21; s[10] = a22; s[11] = a23;
  s[12] = a30; s[13] = a31; s[14] = a32; s[15] = a33;
}

#if defined(__AVX512F__)
// float32 with AVX-512: the same 4 x 4 block with 16 zmm accumulators (lane l sums d = l mod
// 16; a masked last step for D % 16) and one transpose-and-add tree over them. The compiled
// loop above spends about as long as its FMAs in sixteen separate horizontal sums (spilled to
// the stack) per block at D = 1024; the tree sums every accumulator in the same order
// ((l, l + 8), then + 4, + 2, + 1), so a (vector, token) pair still gets the same bits in any
// slot. Measured (one thread, a 1.2 MB row in L2): 80 instead of 107 ns per token and pass.
inline __m512 tr_sum16(const __m512* A) {  // lane 4 q + v: the lane sum of A[4 v + q]
  __m512 Z[8], W[4], U[2];
  for (int i = 0; i < 8; ++i)
    Z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(A[2 * i], A[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(A[2 * i], A[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    W[i] = _mm512_add_ps(_mm512_shuffle_f32x4(Z[2 * i], Z[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(Z[2 * i], Z[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    U[i] = _mm512_add_ps(_mm512_shuffle_ps(W[2 * i], W[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(W[2 * i], W[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(U[0], U[1], 0x88), _mm512_shuffle_ps(U[0], U[1], 0xDD));
}

template <bool cosine>
inline void block4x4_avx512(const float* const* v, const float* r0, const float* r1,
                            const float* r2, const float* r3, int64_t D, float* s) {
  __m512 A[16];
  for (auto& a : A) a = _mm512_setzero_ps();
  const float* r[4] = {r0, r1, r2, r3};
  auto step = [&](__mmask16 m, int64_t d) {
    __m512 x[4], p[4];
    for (int q = 0; q < 4; ++q) x[q] = _mm512_maskz_loadu_ps(m, r[q] + d);
    for (int w = 0; w < 4; ++w) p[w] = _mm512_maskz_loadu_ps(m, v[w] + d);
    for (int w = 0; w < 4; ++w)
      for (int q = 0; q < 4; ++q) {
        if constexpr (cosine) {
          A[4 * w + q] = _mm512_fmadd_ps(p[w], x[q], A[4 * w + q]);
        } else {
          const __m512 t = _mm512_sub_ps(p[w], x[q]);
          A[4 * w + q] = _mm512_fmadd_ps(t, t, A[4 * w + q]);
        }
      }
  };
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) step(static_cast<__mmask16>(0xFFFF), d);
  if (d < D) step(static_cast<__mmask16>((1u << (D - d)) - 1u), d);
  const __m512i to_vq = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_ps(s, _mm512_permutexvar_ps(to_vq, tr_sum16(A)));  // s[4 v + q]
}

template <>
inline void block4x4<float, true>(const float* const* v, const float* r0, const float* r1,
                                  const float* r2, const float* r3, int64_t D, float* s) {
  block4x4_avx512<true>(v, r0, r1, r2, r3, D, s);
}
template <>
inline void block4x4<float, false>(const float* const* v, const float* r0, const float* r1,
                                   const float* r2, const float* r3, int64_t D, float* s) {
  block4x4_avx512<false>(v, r0, r1, r2, r3, D, s);
}
#endif

// What one pick does to tokens [j0, j1) of a row: lower md by the distances to `pick` and
// track the best eligible tokens (if track). Where the pick's distances are not known yet
// (slot < 0), one pass over X computes them together with the distances to the candidates
// cand[0..kCand) (the runners-up of the last step, the likely next picks; -1: none), stored
// in cd[c * N + j]; where they are known (the pick was a candidate of the last pass, in
// slot `slot` of cd), cd is read instead of X; with a kept Gram matrix G (cosine), its row.
// `reverse` visits the 4-token blocks last to first.
template <typename acc, bool cosine>
BestK<acc> sweep(const Rows<acc>& R, const acc* G, int64_t N, int64_t D, int64_t pick,
                 const int64_t* cand, int slot, int64_t j0, int64_t j1, bool reverse, acc* md,
                 acc* cd, const uint8_t* elig, bool track) {
  BestK<acc> best;
  if (j1 <= j0) return best;
  const acc ip = R.inv[pick];
  if (G != nullptr || slot >= 0) {
    const acc* g = G != nullptr ? G + pick * N : nullptr;
    const acc* known = G != nullptr ? nullptr : cd + slot * N;
    for (int64_t j = j0; j < j1; ++j) {
      const acc d = g != nullptr ? acc(1) - g[j] * ip * R.inv[j] : known[j];
      md[j] = d < md[j] ? d : md[j];
      if (track && elig[j]) best.push(md[j], j);
    }
    return best;
  }
  const acc* vec[kCand + 1];
  acc inv[kCand + 1];
  vec[0] = R.ptr + pick * R.ld;
  inv[0] = ip;
  int nv = 1;  // vectors in use: the pick, then the candidates that exist
  for (int c = 0; c < kCand; ++c) {
    const bool on = cand[c] >= 0;
    vec[c + 1] = on ? R.ptr + cand[c] * R.ld : vec[0];
    inv[c + 1] = on ? R.inv[cand[c]] : ip;
    if (on) nv = c + 2;
  }
  const int64_t nblk = (j1 - j0 + 3) / 4;
  acc s[4 * (kCand + 1)];
  for (int64_t t = 0; t < nblk; ++t) {
    const int64_t j = j0 + 4 * (reverse ? nblk - 1 - t : t);
    const int64_t m = std::min<int64_t>(4, j1 - j);
    auto row = [&](int64_t q) { return R.ptr + (j + std::min<int64_t>(q, m - 1)) * R.ld; };
    if (t + 1 < nblk) {  // the first lines of the next block's rows
      const int64_t jn = j0 + 4 * (reverse ? nblk - 2 - t : t + 1);
      const int64_t mn = std::min<int64_t>(4, j1 - jn);
      for (int64_t q = 0; q < mn; ++q) {
        const char* p = reinterpret_cast<const char*>(R.ptr + (jn + q) * R.ld);
        for (int64_t o = 0; o < kPrefetchLines * 64; o += 64) __builtin_prefetch(p + o);
      }
    }
    block4x4<acc, cosine>(vec, row(0), row(1), row(2), row(3), D, s);
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<acc, float>) {
      // the block's 4 tokens at once (the scalar loop below, as 128-bit lanes, masked to m;
      // the one formula for fresh and cached distances, so a pick's distances have the same
      // bits whichever pass computed them): 1 - (e inv_v) inv_j, or sqrt(e)
      const __mmask8 mk = static_cast<__mmask8>((1u << m) - 1u);
      const __m128 rinv = _mm_maskz_loadu_ps(mk, R.inv.data() + j);
      auto dist = [&](int v) {
        const __m128 e = _mm_loadu_ps(s + 4 * v);
        if constexpr (cosine)
          return _mm_fnmadd_ps(_mm_mul_ps(e, _mm_set1_ps(inv[v])), rinv, _mm_set1_ps(1.0f));
        else
          return _mm_sqrt_ps(e);
      };
      for (int v = 1; v < nv; ++v)
        if (cand[v - 1] >= 0) _mm_mask_storeu_ps(cd + (v - 1) * N + j, mk, dist(v));
      const __m128 old = _mm_maskz_loadu_ps(mk, md + j);
      _mm_mask_storeu_ps(md + j, mk, _mm_min_ps(dist(0), old));   // d < md ? d : md
      if (track)
        for (int64_t q = 0; q < m; ++q)
          if (elig[j + q]) best.push(md[j + q], j + q);
      continue;
    }
#endif
    for (int64_t q = 0; q < m; ++q) {
      const int64_t jj = j + q;
      for (int v = 1; v < nv; ++v) {
        if (cand[v - 1] < 0) continue;
        const acc e = s[4 * v + q];
        cd[(v - 1) * N + jj] = cosine ? acc(1) - e * inv[v] * R.inv[jj] : std::sqrt(e);
      }
      const acc d = cosine ? acc(1) - s[q] * ip * R.inv[jj] : std::sqrt(s[q]);
      md[jj] = d < md[jj] ? d : md[jj];
      if (track && elig[jj]) best.push(md[jj], jj);
    }
  }
  return best;
}

template <typename acc>
BestK<acc> sweep_any(bool cosine, const Rows<acc>& R, const acc* G, int64_t N, int64_t D,
                     int64_t pick, const int64_t* cand, int slot, int64_t j0, int64_t j1,
                     bool reverse, acc* md, acc* cd, const uint8_t* elig, bool track) {
  return cosine ? sweep<acc, true>(R, G, N, D, pick, cand, slot, j0, j1, reverse, md, cd, elig,
                                   track)
                : sweep<acc, false>(R, G, N, D, pick, cand, slot, j0, j1, reverse, md, cd, elig,
                                    track);
}

// DivPrune's start without the full distance matrix (no Gram matrix kept): the eligible
// token whose nearest other token is farthest, by bounds. ub[i], an upper bound of token
// i's nearest-neighbour distance nn(i), is the minimum over the pairs computed so far; a
// token whose ub cannot beat the best exact nn found (larger, ties to the smaller index) is
// dropped. Stages: (1) each token against its 7 index neighbours (image tokens next to
// each other are often alike), (2) the exact nn of the 4 highest-ub tokens (a full pass,
// raising the best early; repeated after column chunks 0, 1, 3, 7, 15), (3) the tokens still
// in the running against chunks of kIsoChunk columns spread over the row, until every
// column is seen (then their ub is exact). Every pair distance comes from block4x4 and is
// symmetric bit for bit (cosine: 1 - s * (inv[min] * inv[max])), so the answer is the
// argmax of the same nn values whichever stage settles a token and however the work is
// split over threads. Cost: random tokens in D=1024 (all distances alike) need ~1/4 of
// the N^2 D pairs; clustered or image tokens far fewer.
constexpr int64_t kIsoChunk = 32;  // columns per chunk (8 groups of 4 vectors)
// A chunk runs on the thread team only above this many FMAs (~0.1 ms): the live set shrinks
// fast, and on a loaded machine every small parallel region can wait for a descheduled peer.
constexpr int64_t kIsoParallelFmas = int64_t(1) << 22;

template <typename acc, bool cosine>
struct IsoSearch {
  const Rows<acc>& R;
  int64_t N, D;
  std::vector<acc> ub;        // upper bound of nn (exact once done)
  std::vector<uint8_t> done;  // ub is exact
  std::vector<int64_t> live;  // eligible, not done, can still win
  Best<acc> best;             // the best exact nn so far

  IsoSearch(const Rows<acc>& rows, int64_t n, int64_t d, const uint8_t* elig)
      : R(rows), N(n), D(d), ub(n, std::numeric_limits<acc>::infinity()), done(n, 0) {
    for (int64_t i = 0; i < N; ++i)
      if (elig[i]) live.push_back(i);
  }
  const acc* row(int64_t i) const { return R.ptr + i * R.ld; }
  acc pair(acc s, int64_t i, int64_t j) const {  // symmetric in (i, j)
    if constexpr (cosine) {
      return acc(1) - s * (R.inv[std::min(i, j)] * R.inv[std::max(i, j)]);
    } else {
      return std::sqrt(s);
    }
  }
  bool can_win(int64_t i) const {
    return best.index < 0 || ub[i] > best.value || (ub[i] == best.value && i < best.index);
  }
  void prune() {
    size_t w = 0;
    for (const int64_t i : live)
      if (!done[i] && can_win(i)) live[w++] = i;
    live.resize(w);
  }
  // s for vectors vi[0..4) against rows ri[0..4) (indices; repeats allowed)
  void block(const int64_t* vi, const int64_t* ri, acc* s) const {
    const acc* v[4] = {row(vi[0]), row(vi[1]), row(vi[2]), row(vi[3])};
    block4x4<acc, cosine>(v, row(ri[0]), row(ri[1]), row(ri[2]), row(ri[3]), D, s);
  }
  // (1) pairs (j, j + o), o = 1..7: block b against itself and block b + 1
  void neighbours() {
    for (int64_t j = 0; j < N; j += 4) {
      int64_t ri[4], vi[4];
      for (int q = 0; q < 4; ++q) ri[q] = std::min(j + q, N - 1);
      acc s[16];
      for (int64_t o = 0; o <= 4; o += 4) {
        if (j + o >= N) break;
        for (int v = 0; v < 4; ++v) vi[v] = std::min(j + o + v, N - 1);
        block(vi, ri, s);
        for (int v = 0; v < 4; ++v)
          for (int q = 0; q < 4; ++q) {
            const int64_t a = ri[q], c = vi[v];
            if (c <= a) continue;  // each pair once, no self pairs, no repeats
            const acc d = pair(s[4 * v + q], a, c);
            ub[a] = d < ub[a] ? d : ub[a];
            ub[c] = d < ub[c] ? d : ub[c];
          }
      }
    }
  }
  // (2) the exact nn of the (up to) 4 live tokens of highest ub: one pass over all rows
  void exact_top() {
    prune();
    if (live.empty()) return;
    int64_t top[4];
    const int nt = static_cast<int>(std::min<size_t>(4, live.size()));
    std::partial_sort(live.begin(), live.begin() + nt, live.end(), [&](int64_t a, int64_t b) {
      return ub[a] > ub[b] || (ub[a] == ub[b] && a < b);
    });
    for (int t = 0; t < 4; ++t) top[t] = live[std::min(t, nt - 1)];
    const int64_t nblk = (N + 3) / 4;
    std::vector<acc> part(4 * nblk, std::numeric_limits<acc>::infinity());  // per row block
    auto pass = [&](int64_t b0, int64_t b1) {
      acc s[16];
      for (int64_t b = b0; b < b1; ++b) {
        acc* m = part.data() + 4 * b;
        int64_t ri[4];
        for (int q = 0; q < 4; ++q) ri[q] = std::min(4 * b + q, N - 1);
        block(top, ri, s);
        for (int t = 0; t < nt; ++t)
          for (int q = 0; q < 4; ++q) {
            if (ri[q] == top[t]) continue;
            const acc d = pair(s[4 * t + q], top[t], ri[q]);
            m[t] = d < m[t] ? d : m[t];
          }
      }
    };
    pass(0, nblk);  // 4 N D FMAs: one thread
    for (int t = 0; t < nt; ++t) {
      acc nn = std::numeric_limits<acc>::infinity();
      for (int64_t b = 0; b < nblk; ++b) nn = part[4 * b + t] < nn ? part[4 * b + t] : nn;
      ub[top[t]] = nn;
      done[top[t]] = 1;
      best.push(nn, top[t]);
    }
    prune();
  }
  // (3) the live tokens against columns cols[0..nc)
  void columns(const int64_t* cols, int64_t nc) {
    const int64_t nl = static_cast<int64_t>(live.size());
    const int64_t nblk = (nl + 3) / 4;
    auto chunk = [&](int64_t b0, int64_t b1) {
      acc s[16];
      for (int64_t b = b0; b < b1; ++b) {
        int64_t ri[4];
        const int64_t m = std::min<int64_t>(4, nl - 4 * b);
        for (int q = 0; q < 4; ++q) ri[q] = live[4 * b + std::min<int64_t>(q, m - 1)];
        acc lo[4] = {ub[ri[0]], ub[ri[1]], ub[ri[2]], ub[ri[3]]};
        for (int64_t c = 0; c < nc; c += 4) {
          int64_t vi[4];
          const int64_t mv = std::min<int64_t>(4, nc - c);
          for (int v = 0; v < 4; ++v) vi[v] = cols[c + std::min<int64_t>(v, mv - 1)];
          block(vi, ri, s);
          for (int v = 0; v < mv; ++v)
            for (int q = 0; q < 4; ++q) {
              if (vi[v] == ri[q]) continue;
              const acc d = pair(s[4 * v + q], ri[q], vi[v]);
              lo[q] = d < lo[q] ? d : lo[q];
            }
        }
        for (int q = 0; q < m; ++q) ub[ri[q]] = lo[q];
      }
    };
    if (nl * nc * D >= kIsoParallelFmas)
      at::parallel_for(0, nblk, 1, chunk);
    else
      chunk(0, nblk);
  }
  int64_t run() {
    if (N == 1) return live.empty() ? -1 : 0;
    neighbours();
    exact_top();
    // columns in a spread order: j = s, s + stride, ... for s = 0, 1, ...
    const int64_t stride = std::max<int64_t>(1, N / kIsoChunk);
    std::vector<int64_t> order;
    order.reserve(N);
    for (int64_t s0 = 0; s0 < stride; ++s0)
      for (int64_t j = s0; j < N; j += stride) order.push_back(j);
    int64_t chunk = 0;
    for (int64_t c0 = 0; c0 < N && !live.empty(); c0 += kIsoChunk, ++chunk) {
      columns(order.data() + c0, std::min(kIsoChunk, N - c0));
      if (chunk == 0 || chunk == 1 || chunk == 3 || chunk == 7 || chunk == 15) exact_top();
      else prune();
    }
    for (const int64_t i : live) best.push(ub[i], i);  // every column seen: ub is exact
    return best.index;
  }
};

// TOKENREDUCE_KCENTER_ISOLATED=full (read per call): the isolated start from all pairs
// (GEMM row tiles) instead of the bounded search, for tests and benchmarks.
inline bool isolated_full_forced() {
  const char* env = std::getenv("TOKENREDUCE_KCENTER_ISOLATED");
  return env != nullptr && std::string(env) == "full";
}

// DivPrune's start: the eligible token whose nearest other token is farthest. G: the full
// Gram matrix if kept (read in row tiles); else the bounded search above.
template <typename acc>
int64_t isolated_start(const Rows<acc>& R, const acc* G, int64_t N, int64_t D, bool cosine,
                       const uint8_t* elig) {
  if (!G && !isolated_full_forced()) {
    return cosine ? IsoSearch<acc, true>(R, N, D, elig).run()
                  : IsoSearch<acc, false>(R, N, D, elig).run();
  }
  std::vector<acc> nn(N, std::numeric_limits<acc>::infinity());
  std::vector<acc> tile(G ? 0 : kTile * std::min(N, kTile));
  for (int64_t i0 = 0; i0 < N; i0 += kTile) {
    const int64_t mi = std::min(kTile, N - i0);
    for (int64_t j0 = 0; j0 < N; j0 += kTile) {
      const int64_t mj = std::min(kTile, N - j0);
      const acc* gt;
      int64_t ldg;
      if (G) {
        gt = G + i0 * N + j0;
        ldg = N;
      } else {
        gemm_abt(R.ptr + i0 * R.ld, R.ld, R.ptr + j0 * R.ld, R.ld, tile.data(), mj, mi, mj, D);
        gt = tile.data();
        ldg = mj;
      }
      for (int64_t a = 0; a < mi; ++a) {
        const int64_t i = i0 + a;
        acc best = nn[i];
        for (int64_t c = 0; c < mj; ++c) {
          const int64_t j = j0 + c;
          if (j == i) continue;
          const acc g = gt[a * ldg + c];
          const acc d = cosine ? acc(1) - g * R.inv[i] * R.inv[j]
                               : std::sqrt(std::max(R.sq[i] + R.sq[j] - acc(2) * g, acc(0)));
          best = d < best ? d : best;
        }
        nn[i] = best;
      }
    }
  }
  Best<acc> am;
  for (int64_t i = 0; i < N; ++i)
    if (elig[i]) am.push(N > 1 ? nn[i] : acc(0), i);
  return am.index;
}

enum class Schedule { kRows, kSplit, kGram };

// The cost model (see the top of the file), unless TOKENREDUCE_KCENTER_SCHEDULE forces one.
Schedule choose_schedule(int64_t B, int64_t N, int64_t D, int64_t k, bool cosine,
                         size_t acc_bytes, int64_t threads) {
  if (const char* env = std::getenv("TOKENREDUCE_KCENTER_SCHEDULE")) {
    const std::string s(env);
    if (s == "rows") return Schedule::kRows;
    if (s == "gram" && cosine) return Schedule::kGram;
#if AT_PARALLEL_OPENMP
    if (s == "split" && threads > 1 && N >= 4 * threads) return Schedule::kSplit;
#endif
  }
  if (cosine && N >= kGramMinN && k * kGramRatio >= N && N * N <= kGramMaxElems)
    return Schedule::kGram;
#if AT_PARALLEL_OPENMP
  if (threads > 1 && N >= 4 * threads && (N * D) / threads >= kSplitMinWork) {
    const int64_t row_bytes = N * D * static_cast<int64_t>(acc_bytes);
    const int64_t budget = cache_budget_bytes();
    if (B < threads) return Schedule::kSplit;
    // the passes are near the FMA limit while X is in L2 (40 vs 34 ns per token and pick
    // for a 2.25 MB row vs a 1.1 MB one, one thread): splitting pays its per-pick barriers
    // only when the row overflows L2 well, and a loaded machine makes them costlier
    if (row_bytes > 2 * budget && row_bytes / threads <= budget) return Schedule::kSplit;
  }
#endif
  return Schedule::kRows;
}

// A batch row ready for its picks: tokens, eligibility, first pick, optional Gram matrix.
template <typename acc>
struct Prepared {
  Rows<acc> R;
  std::vector<uint8_t> elig;
  std::vector<acc> gram;
  int64_t first = 0;
};

template <typename scalar_t, typename acc>
void prepare(Prepared<acc>& P, const at::Tensor& x, int64_t b, int64_t k, bool cosine,
             const int64_t* first, bool isolated, const bool* mask, bool keep_gram) {
  const int64_t N = x.size(1), D = x.size(2);
  load_rows<scalar_t, acc>(P.R, x.data_ptr<scalar_t>() + b * x.stride(0), x.stride(1), N, D,
                           cosine, b);
  P.elig.assign(N, 1);
  if (mask) {
    for (int64_t n = 0; n < N; ++n) P.elig[n] = mask[b * N + n];
  }
  int64_t n_elig = 0;
  for (int64_t n = 0; n < N; ++n) n_elig += P.elig[n];
  TORCH_CHECK_VALUE(k <= n_elig, "tokenreduce.kcenter: k=", k, " exceeds the ", n_elig,
                    " eligible tokens of batch ", b);
  if (keep_gram) {
    P.gram.resize(N * N);
    gemm_abt(P.R.ptr, P.R.ld, P.R.ptr, P.R.ld, P.gram.data(), N, N, N, D);
  }
  const acc* G = keep_gram ? P.gram.data() : nullptr;
  if (isolated) {
    P.first = isolated_start<acc>(P.R, G, N, D, cosine, P.elig.data());
  } else {
    int64_t pick = first[b];
    TORCH_CHECK_INDEX(pick >= -N && pick < N, "tokenreduce.kcenter: first=", pick,
                      " is out of range for N=", N, " (batch ", b, ")");
    if (pick < 0) pick += N;
    TORCH_CHECK_VALUE(P.elig[pick], "tokenreduce.kcenter: first=", pick,
                      " is masked out in batch ", b);
    P.first = pick;
  }
}

// The pick loop's state between picks: which tokens' distances cd holds (the candidates of
// the last pass over X), and the candidates of the next pass (the runners-up of the last
// step). Every thread of the split schedule steps the same state from the same merged
// BestK. On random tokens (N=576, D=1024, k=64) three candidates cut the passes over X
// from 64 to about 24.
struct Speculation {
  int64_t cached[kCand] = {-1, -1, -1};  // cd's slots
  int64_t cand[kCand] = {-1, -1, -1};    // the coming pass's candidates
  int slot = -1;                         // the pick's slot in cd, or -1: a pass over X
  // before a pick: read its distances from cd, or make a pass (candidates unless last)
  void start(int64_t pick, bool last) {
    slot = -1;
    for (int c = 0; c < kCand; ++c)
      if (cached[c] == pick) slot = c;
    if (slot >= 0) {
      cached[slot] = -1;  // picked: never needed again
    } else {
      for (int c = 0; c < kCand; ++c) cached[c] = last ? -1 : cand[c];  // the pass fills cd
      if (last)
        for (int c = 0; c < kCand; ++c) cand[c] = -1;
    }
  }
  template <typename acc>
  void finish(const BestK<acc>& best) {  // the step's runners-up: the next candidates
    for (int c = 0; c < kCand; ++c) cand[c] = best.at[c + 1].index;
  }
};

// All k picks of one batch row on the calling thread.
template <typename acc>
void picks_serial(Prepared<acc>& P, int64_t N, int64_t D, int64_t k, bool cosine, acc* md,
                  int64_t* idx) {
  const acc* G = P.gram.empty() ? nullptr : P.gram.data();
  std::vector<acc> cd(G ? 0 : kCand * N);
  std::fill(md, md + N, std::numeric_limits<acc>::infinity());
  int64_t pick = P.first;
  Speculation sp;
  int64_t passes = 0;
  for (int64_t i = 0; i < k; ++i) {
    idx[i] = pick;
    P.elig[pick] = 0;  // picked: never again
    const bool last = i + 1 == k;
    sp.start(pick, last);
    const bool reverse = passes % 2 == 1;
    if (sp.slot < 0) ++passes;
    const BestK<acc> best = sweep_any(cosine, P.R, G, N, D, pick, sp.cand, sp.slot, 0, N,
                                      reverse, md, cd.data(), P.elig.data(), !last);
    sp.finish(best);
    if (!last) pick = best.at[0].index;
  }
  for (int64_t i = 0; i < k; ++i) md[idx[i]] = acc(0);
}

// Spin barrier over a fixed number of arrivals per round (monotonic counter, no reset).
struct SpinBarrier {
  std::atomic<int64_t> count{0};
  void wait(int64_t arrivals, int64_t target) {
    count.fetch_add(arrivals, std::memory_order_acq_rel);
    for (int spins = 0; count.load(std::memory_order_acquire) < target; ++spins) {
      if (spins > 256) std::this_thread::yield();  // a loaded machine: let the peer run
    }
  }
};

// All k picks of one batch row, its tokens split into T slices over the OpenMP team.
// Chunk [w0, w1) of [0, T) plays slices w0..w1-1, so any team size completes every round.
template <typename acc>
void picks_split(Prepared<acc>& P, int64_t N, int64_t D, int64_t k, bool cosine, acc* md,
                 int64_t* idx, int64_t T) {
  std::fill(md, md + N, std::numeric_limits<acc>::infinity());
  std::vector<acc> cd(kCand * N);
  std::vector<BestK<acc>> posts(2 * T);  // double-buffered by pick parity
  SpinBarrier barrier;
  const int64_t step = (N + T - 1) / T;
  at::parallel_for(0, T, 1, [&](int64_t w0, int64_t w1) {
    int64_t pick = P.first;
    Speculation sp;
    int64_t passes = 0;
    for (int64_t i = 0; i < k; ++i) {
      const bool last = i + 1 == k;
      sp.start(pick, last);
      const bool reverse = passes % 2 == 1;
      if (sp.slot < 0) ++passes;
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t j0 = std::min(N, w * step), j1 = std::min(N, (w + 1) * step);
        if (pick >= j0 && pick < j1) P.elig[pick] = 0;  // the slice's owner clears it
        if (w == 0) idx[i] = pick;
        posts[(i % 2) * T + w] =
            sweep_any(cosine, P.R, static_cast<const acc*>(nullptr), N, D, pick, sp.cand,
                      sp.slot, j0, j1, reverse, md, cd.data(), P.elig.data(), !last);
      }
      if (last) break;
      barrier.wait(w1 - w0, (i + 1) * T);
      BestK<acc> best;
      for (int64_t w = 0; w < T; ++w) best.merge(posts[(i % 2) * T + w]);
      sp.finish(best);
      pick = best.at[0].index;
    }
  });
  for (int64_t i = 0; i < k; ++i) md[idx[i]] = acc(0);
}

template <typename scalar_t>
void kcenter_cpu_impl(const at::Tensor& x, int64_t k, bool cosine, const int64_t* first,
                      bool isolated, const bool* mask, at::Tensor& index, at::Tensor& mindist) {
  using acc = acc_t<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  int64_t* ip = index.data_ptr<int64_t>();
  auto* mp = mindist.data_ptr<acc>();
  const int64_t T = at::get_num_threads();
  const Schedule sched = choose_schedule(B, N, D, k, cosine, sizeof(acc), T);
  const bool keep_gram = sched == Schedule::kGram;

  if (sched == Schedule::kSplit || (keep_gram && B < T)) {
    // one batch row at a time, all threads on it (the Gram GEMM is multi-threaded itself)
    for (int64_t b = 0; b < B; ++b) {
      Prepared<acc> P;
      prepare<scalar_t, acc>(P, x, b, k, cosine, first, isolated, mask, keep_gram);
      if (sched == Schedule::kSplit)
        picks_split<acc>(P, N, D, k, cosine, mp + b * N, ip + b * k, T);
      else
        picks_serial<acc>(P, N, D, k, cosine, mp + b * N, ip + b * k);
    }
    return;
  }
  const int64_t cost = keep_gram ? N * N * D : k * N * D;
  parallel_for_cost(B, cost, [&](int64_t b0, int64_t b1) {
    Prepared<acc> P;
    for (int64_t b = b0; b < b1; ++b) {
      prepare<scalar_t, acc>(P, x, b, k, cosine, first, isolated, mask, keep_gram);
      picks_serial<acc>(P, N, D, k, cosine, mp + b * N, ip + b * k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kcenter_cpu(const at::Tensor& x_in, int64_t k,
                                               c10::string_view metric, int64_t first,
                                               const std::optional<at::Tensor>& first_index,
                                               bool isolated, const std::optional<at::Tensor>& mask) {
  check_kcenter_args(x_in, k, metric, first_index, mask);
  const int64_t B = x_in.size(0), N = x_in.size(1);
  at::Tensor firsts;
  if (first_index.has_value()) {
    firsts = first_index->contiguous();
  } else {
    firsts = at::full({B}, first, x_in.options().dtype(at::kLong));
  }
  at::Tensor m;
  if (mask.has_value()) m = mask->contiguous();
  const at::Tensor x = last_dim_contiguous(x_in);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor index = at::empty({B, k}, x.options().dtype(at::kLong));
  at::Tensor mindist = at::empty({B, N}, x.options().dtype(acc_dtype));
  if (B == 0 || N == 0) return {index, mindist};
  if (k == 0) {
    mindist.fill_(std::numeric_limits<double>::infinity());
    return {index, mindist};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kcenter_cpu", [&] {
    kcenter_cpu_impl<scalar_t>(x, k, metric == "cosine", firsts.data_ptr<int64_t>(), isolated,
                               m.defined() ? m.data_ptr<bool>() : nullptr, index, mindist);
  });
  return {index, mindist};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CPU, m) { m.impl("kcenter", &kcenter_cpu); }

}  // namespace tokenreduce

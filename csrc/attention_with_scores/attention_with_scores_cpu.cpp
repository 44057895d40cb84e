// attention_with_scores on the CPU: exact softmax attention that also returns the
// attention each key receives, averaged over heads and scored query rows, without
// ever materialising the [B, H, Nq, Nk] probability tensor.
//
// Work is split into tasks (batch, kv head, chunk of query rows). A task keeps its
// K and V slices in float, and walks its query rows in blocks:
//  * single pass (Nk <= kSinglePassMaxKeys): S = Q K^T for the block's full key
//    range lives in a per-thread tile; one exp per element gives P, which feeds both
//    O = P V and the column sums of the scored rows.
//  * two passes (longer keys): an online-softmax pass over key blocks gives O and the
//    row log-sum-exp; a second pass over key blocks, for the scored rows only, sums
//    exp(s - lse) into the columns.
// single_pass_for holds the cost model choosing between them (the internal knob
// TOKENREDUCE_ATTENTION_CPU_PATH forces either, for the tests).
// Torch's CPU flash attention (FlashAttentionKernel.cpp: 64-row query blocks x 512-key blocks,
// an MKL GEMM pair per block pair that re-packs K and V each time, an online-softmax rescale of
// O per key block, so N = 577 splits into a 512-key and a thin 65-key block) is the bar. The
// single pass has one key range per block (no rescale, no thin block) and, for float32:
//  * the exp pass is an AVX-512 kernel (attention_with_scores_simd.h, vscalefps scaling);
//  * O = P V is written straight into out and scaled there (no O buffer copy);
//  * S = scale Q K^T reads q in place (the scale as the GEMM's alpha): copying and scaling
//    the query rows had cost ~10% of the kernel's own time, in cache misses on q;
//  * the row max runs four vmaxps chains (one chain waited on its latency: ~15%).
// (MKL's packed-B GEMM, K packed once per task by cblas_sgemm_pack, was measured slower at
// N = 577, Dh = 64: a task has too few query blocks to amortise the pack.)
// Column sums go to a per-task slot and are reduced in a fixed order afterwards:
// the result is deterministic and independent of the thread count.
// GCC vectorises with 256-bit registers by default even where AVX-512 is there; the row
// loops (max, exp, column sums) run twice as wide with 512-bit ones. For the whole file,
// headers included, so every inline helper is compiled with the same target options.
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
// GCC 12 flags the _mm512_undefined_ps() inside its own AVX-512 intrinsics (a false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../common/cpu_utils.h"
#include "attention_with_scores_checks.h"
#include "attention_with_scores_simd.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "attention_with_scores";
constexpr int64_t kSinglePassMaxKeys = 4096;
constexpr int64_t kTileElems = int64_t(1) << 17;  // score tile budget per thread
constexpr int64_t kKeyBlock = 1024;                // key block of the two-pass path
constexpr int64_t kTargetTasks = 64;

// Internal knobs for tests (not API): TOKENREDUCE_ATTENTION_CPU_PATH = "single" / "blocked"
// forces a path whatever Nk (see single_pass_for).
inline bool env_is(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

// Cost model of the two paths, per (query row, key): both do the same two GEMMs and one exp.
// The single pass keeps S for the block's whole key range (bq x Nk floats, bq >= 16) in the
// per-thread tile and reads it once more for the scored rows; the blocked path adds, per key
// block, the online-softmax rescale of O (Dv per row) and, for the scored rows, a second
// Q K^T GEMM and exp. Up to 4096 keys the tile (>= 16 rows x Nk) stays within L2 and the
// single pass costs less (~1 exp, no rescales); beyond that the tile spills to L3 and the
// blocked path's fixed kKeyBlock tile wins.
inline bool single_pass_for(int64_t Nk) {
  if (env_is("TOKENREDUCE_ATTENTION_CPU_PATH", "single")) return true;
  if (env_is("TOKENREDUCE_ATTENTION_CPU_PATH", "blocked")) return false;
  return Nk <= kSinglePassMaxKeys;
}

// MKL's per-thread thread count (weak: absent without MKL). The kernel's parallelism is
// over its tasks; its block GEMMs must be sequential even where the tasks run on the
// calling thread (small inputs), or MKL's threaded GEMM would make the bits depend on the
// thread count.
extern "C" int MKL_Set_Num_Threads_Local(int nth) __attribute__((weak));
struct SequentialBlas {
  int prev = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(prev);
  }
};

template <typename acc>
struct Slice {  // a [rows, cols] row-major view in acc, either borrowed or converted
  const acc* ptr = nullptr;
  int64_t ld = 0;
  std::vector<acc> buf;
};

// max of s[0:n] (NaN skipped; -inf when empty): the AVX-512 row kernel for float.
template <typename acc>
inline acc row_max(const acc* s, int64_t n) {
#if defined(TOKENREDUCE_ATTENTION_AVX512)
  if constexpr (std::is_same_v<acc, float>) return attention_simd::row_max(s, n);
#endif
  acc mx = -std::numeric_limits<acc>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  return mx;
}

// s[0:n] = exp(s - mx) in place, returning the sum (a NaN logit makes the sum NaN): the
// AVX-512 row kernel for float, the vectorisable fast_exp loop otherwise.
template <typename acc>
inline acc exp_sub_sum_inplace(acc* s, int64_t n, acc mx) {
#if defined(TOKENREDUCE_ATTENTION_AVX512)
  if constexpr (std::is_same_v<acc, float>) return attention_simd::exp_sub_sum_inplace(s, n, mx);
#endif
  acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const acc e = fast_exp(s[j] - mx);
    s[j] = e;
    sum += e;
  }
  return sum;
}

// Borrow a [rows, cols] slice of an acc-typed tensor, or convert it into a buffer.
template <typename scalar_t, typename acc>
void load_slice(Slice<acc>& s, const scalar_t* base, int64_t row_stride, int64_t rows,
                int64_t cols) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (row_stride >= cols) {
      s.ptr = base;
      s.ld = row_stride;
      return;
    }
  }
  s.buf.resize(std::max<int64_t>(rows * cols, 1));
  for (int64_t r = 0; r < rows; ++r) load_row(base + r * row_stride, cols, s.buf.data() + r * cols);
  s.ptr = s.buf.data();
  s.ld = cols;
}

template <typename scalar_t>
void attention_cpu_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                        bool causal, const at::Tensor& bias, const std::vector<double>& row_weight,
                        at::Tensor& out, at::Tensor& partial, int64_t chunks, int64_t blocks_per_chunk,
                        int64_t bq, bool single_pass) {
  using acc = acc_t<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dh = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2), Dv = v.size(3);
  const int64_t group = H / Hkv;
  const int64_t off = Nk - Nq;  // bottom-right causal alignment: row i sees keys j <= i + off
  constexpr bool direct_out = std::is_same_v<scalar_t, acc>;
  const acc sc = static_cast<acc>(scale);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const acc* biasp = bias.defined() ? bias.data_ptr<acc>() : nullptr;
  acc* partp = partial.data_ptr<acc>();
  const int64_t ntasks = B * Hkv * chunks;
  const int64_t nblocks = (Nq + bq - 1) / bq;
  constexpr acc kNegInf = -std::numeric_limits<acc>::infinity();

  parallel_for_cost(ntasks, group * blocks_per_chunk * bq * Nk * (Dh + Dv), [&](int64_t t0, int64_t t1) {
    const SequentialBlas sequential_blas;
    Slice<acc> K, V;
    const int64_t kb = single_pass ? Nk : std::min(Nk, kKeyBlock);
    std::vector<acc> Q(bq * Dh), Qs(bq * Dh), S(std::max<int64_t>(bq * kb, 1)), O(bq * Dv), Ot(bq * Dv);
    std::vector<acc> rmax(bq), rsum(bq), rlse(bq);
    std::vector<int64_t> scored;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c = task % chunks;
      const int64_t hk = (task / chunks) % Hkv;
      const int64_t b = task / (chunks * Hkv);
      acc* colsum = partp + task * Nk;
      std::fill(colsum, colsum + Nk, acc(0));
      load_slice<scalar_t, acc>(K, kp + b * k.stride(0) + hk * k.stride(1), k.stride(2), Nk, Dh);
      load_slice<scalar_t, acc>(V, vp + b * v.stride(0) + hk * v.stride(1), v.stride(2), Nk, Dv);
      const acc* brow = biasp ? biasp + b * Nk : nullptr;
      const int64_t blk_end = std::min(nblocks, (c + 1) * blocks_per_chunk);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t blk = c * blocks_per_chunk; blk < blk_end; ++blk) {
          const int64_t i0 = blk * bq, m = std::min(bq, Nq - i0);
          // keys any row of this block may see
          const int64_t jend = causal ? std::min(Nk, std::max<int64_t>(i0 + m + off, 0)) : Nk;
          scalar_t* orow0 = op + ((b * H + h) * Nq + i0) * Dv;
          if (jend <= 0) {
            std::fill(orow0, orow0 + m * Dv, scalar_t(0));
            continue;
          }
          const scalar_t* qrow0 = qp + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
          // float / double single pass: the GEMM reads q itself and applies the scale (alpha)
          const bool q_direct = direct_out && single_pass;
          if (!q_direct)
            for (int64_t r = 0; r < m; ++r) load_row_scaled(qrow0 + r * q.stride(2), Dh, sc, Q.data() + r * Dh);
          // limit of keys row r may see, and the scored-row weights
          auto row_limit = [&](int64_t r) {
            return causal ? std::min(jend, std::max<int64_t>(i0 + r + off + 1, 0)) : jend;
          };
          if (single_pass) {
            if constexpr (direct_out)
              gemm_abt(reinterpret_cast<const acc*>(qrow0), q.stride(2), K.ptr, K.ld, S.data(), jend, m, jend, Dh, sc);
            else
              gemm_abt(Q.data(), Dh, K.ptr, K.ld, S.data(), jend, m, jend, Dh);
            for (int64_t r = 0; r < m; ++r) {
              acc* s = S.data() + r * jend;
              const int64_t lim = row_limit(r);
              rsum[r] = acc(0);  // 1 / row sum after the loop: O and the scores are scaled by it
              if (lim <= 0) {
                std::fill(s, s + jend, acc(0));
                continue;
              }
              // row max (vectorised; NaN is skipped here and found below), bias added in the pass
              acc mx = kNegInf;
              if (brow) {
#pragma omp simd reduction(max : mx)
                for (int64_t j = 0; j < lim; ++j) {
                  const acc t = s[j] + brow[j];
                  s[j] = t;
                  mx = t > mx ? t : mx;
                }
              } else {
                mx = row_max(s, lim);
              }
              if (mx == kNegInf) {
                // no finite logit: a NaN makes the row NaN (as eager), else the row is zero
                bool has_nan = false;
                for (int64_t j = 0; j < lim && !has_nan; ++j) has_nan = s[j] != s[j];
                if (!has_nan) {
                  std::fill(s, s + jend, acc(0));
                  continue;
                }
                mx = std::numeric_limits<acc>::quiet_NaN();
              }
              // exp and sum (a NaN logit makes the sum, hence the row, NaN); P stays unnormalised
              const acc sum = exp_sub_sum_inplace(s, lim, mx);
              std::fill(s + lim, s + jend, acc(0));
              const acc inv = acc(1) / sum;
              rsum[r] = inv;
              const acc w = static_cast<acc>(row_weight[i0 + r]) * inv;
              if (row_weight[i0 + r] != 0.0) {
#pragma omp simd
                for (int64_t j = 0; j < lim; ++j) colsum[j] += w * s[j];
              }
            }
            // float / double: O = P V straight into out (contiguous [B, H, Nq, Dv]), no copy
            acc* ob = direct_out ? reinterpret_cast<acc*>(orow0) : O.data();
            gemm_ab(S.data(), jend, V.ptr, V.ld, ob, Dv, m, Dv, jend);
            for (int64_t r = 0; r < m; ++r) {
              acc* o = ob + r * Dv;
              const acc inv = rsum[r];
#pragma omp simd
              for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
            }
          } else {
            // pass 1: online softmax over key blocks -> O, row max and sum
            std::fill(rmax.begin(), rmax.begin() + m, kNegInf);
            std::fill(rsum.begin(), rsum.begin() + m, acc(0));
            std::fill(O.begin(), O.begin() + m * Dv, acc(0));
            for (int64_t j0 = 0; j0 < jend; j0 += kb) {
              const int64_t n = std::min(kb, jend - j0);
              gemm_abt(Q.data(), Dh, K.ptr + j0 * K.ld, K.ld, S.data(), n, m, n, Dh);
              for (int64_t r = 0; r < m; ++r) {
                acc* s = S.data() + r * n;
                const int64_t lim = std::min<int64_t>(std::max<int64_t>(row_limit(r) - j0, 0), n);
                if (brow) {
#pragma omp simd
                  for (int64_t j = 0; j < lim; ++j) s[j] += brow[j0 + j];
                }
                acc mx = rmax[r];
                for (int64_t j = 0; j < lim; ++j) mx = (s[j] > mx || s[j] != s[j]) ? s[j] : mx;  // NaN sticks
                if (mx == kNegInf) {
                  std::fill(s, s + n, acc(0));
                  continue;
                }
                const acc corr = fast_exp(rmax[r] - mx);
                acc sum = 0;
#pragma omp simd reduction(+ : sum)
                for (int64_t j = 0; j < lim; ++j) {
                  const acc e = fast_exp(s[j] - mx);
                  s[j] = e;
                  sum += e;
                }
                std::fill(s + lim, s + n, acc(0));
                rsum[r] = rsum[r] * corr + sum;
                rmax[r] = mx;
                acc* o = O.data() + r * Dv;
#pragma omp simd
                for (int64_t d = 0; d < Dv; ++d) o[d] *= corr;
              }
              gemm_ab(S.data(), n, V.ptr + j0 * V.ld, V.ld, Ot.data(), Dv, m, Dv, n);
              for (int64_t e = 0; e < m * Dv; ++e) O[e] += Ot[e];
            }
            scored.clear();
            for (int64_t r = 0; r < m; ++r) {
              const bool nan_row = rsum[r] != rsum[r];  // a NaN logit: the row is NaN, as in eager
              const acc inv = rsum[r] > acc(0) || nan_row ? acc(1) / rsum[r] : acc(0);
              acc* o = O.data() + r * Dv;
#pragma omp simd
              for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
              rlse[r] = rsum[r] > acc(0) || nan_row ? rmax[r] + std::log(rsum[r]) : kNegInf;
              if (row_weight[i0 + r] != 0.0 && rlse[r] != kNegInf) scored.push_back(r);
            }
            // pass 2: the scored rows' probabilities, summed into the columns
            const int64_t ns = static_cast<int64_t>(scored.size());
            for (int64_t e = 0; e < ns; ++e)
              std::copy(Q.data() + scored[e] * Dh, Q.data() + (scored[e] + 1) * Dh,
                        Qs.data() + e * Dh);
            for (int64_t j0 = 0; ns > 0 && j0 < jend; j0 += kb) {
              const int64_t n = std::min(kb, jend - j0);
              gemm_abt(Qs.data(), Dh, K.ptr + j0 * K.ld, K.ld, S.data(), n, ns, n, Dh);
              for (int64_t e = 0; e < ns; ++e) {
                const int64_t r = scored[e];
                const acc* s = S.data() + e * n;
                const int64_t lim = std::min<int64_t>(std::max<int64_t>(row_limit(r) - j0, 0), n);
                const acc w = static_cast<acc>(row_weight[i0 + r]), lse = rlse[r];
                acc* cs = colsum + j0;
                if (brow) {
#pragma omp simd
                  for (int64_t j = 0; j < lim; ++j) cs[j] += w * fast_exp(s[j] + brow[j0 + j] - lse);
                } else {
#pragma omp simd
                  for (int64_t j = 0; j < lim; ++j) cs[j] += w * fast_exp(s[j] - lse);
                }
              }
            }
          }
          if (!(single_pass && direct_out))
            for (int64_t e = 0; e < m * Dv; ++e) orow0[e] = static_cast<scalar_t>(O[e]);
        }
      }
    }
  });
}

// scores [B, Nk] = the per-task column sums partial [B, S, Nk] added in slot order, on the
// calling thread: a few thousand adds, where a parallel at::sum would wake the thread pool
// a second time (milliseconds on a loaded machine).
at::Tensor sum_slots(const at::Tensor& partial) {
  const int64_t B = partial.size(0), S = partial.size(1), Nk = partial.size(2);
  at::Tensor scores = at::zeros({B, Nk}, partial.options());
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "attention_with_scores_sum_slots", [&] {
    const scalar_t* pp = partial.data_ptr<scalar_t>();
    scalar_t* sp = scores.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      scalar_t* row = sp + b * Nk;
      for (int64_t t = 0; t < S; ++t) {
        const scalar_t* src = pp + (b * S + t) * Nk;
        for (int64_t j = 0; j < Nk; ++j) row[j] += src[j];
      }
    }
  });
  return scores;
}

std::tuple<at::Tensor, at::Tensor> attention_with_scores_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
    bool causal, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& score_rows) {
  const AttentionShape sh = check_attention_args(q_in, k_in, v_in, key_bias, score_rows);
  const int64_t B = sh.B, H = sh.H, Nq = sh.Nq, Hkv = sh.Hkv, Nk = sh.Nk, Dv = sh.Dv;

  at::Tensor bias;
  if (key_bias.has_value()) {
    bias = key_bias->to(at::toOpMathType(q_in.scalar_type())).contiguous();
  }

  // weight of each query row in the scores: (times listed) / (H * R)
  std::vector<double> row_weight(Nq, 0.0);
  if (score_rows.has_value()) {
    const at::Tensor rows = score_rows->cpu().contiguous();
    const int64_t R = rows.numel();
    const int64_t* rp = rows.data_ptr<int64_t>();
    for (int64_t e = 0; e < R; ++e) {
      int64_t i = rp[e];
      TR_CHECK_INDEX("attention_with_scores", i >= -Nq && i < Nq, "score_rows[", e, "] = ", i,
                     " is out of range for Nq = ", Nq);
      if (i < 0) i += Nq;
      row_weight[i] += 1.0 / double(H * R);
    }
  } else {
    for (auto& w : row_weight) w = 1.0 / double(H * std::max<int64_t>(Nq, 1));
  }

  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  at::Tensor out = at::empty({B, H, Nq, Dv}, q.options());
  const auto acc_dtype = at::toOpMathType(q.scalar_type());

  const bool single_pass = single_pass_for(Nk);
  int64_t bq = single_pass ? std::clamp<int64_t>(kTileElems / Nk, 16, 128) : 64;
  bq = std::max<int64_t>(std::min(bq, Nq), 1);
  if (Nq > 0) {  // equal blocks: no thin tail GEMM
    const int64_t nb = (Nq + bq - 1) / bq;
    bq = (Nq + nb - 1) / nb;
  }
  const int64_t nblocks = (Nq + bq - 1) / bq;
  const int64_t want = (kTargetTasks + B * Hkv - 1) / std::max<int64_t>(B * Hkv, 1);
  int64_t chunks = std::max<int64_t>(std::min(nblocks, want), 1);
  const int64_t blocks_per_chunk = std::max<int64_t>((nblocks + chunks - 1) / chunks, 1);
  chunks = std::max<int64_t>((nblocks + blocks_per_chunk - 1) / blocks_per_chunk, 1);
  at::Tensor partial = at::empty({B, Hkv * chunks, Nk}, q.options().dtype(acc_dtype));

  if (B * H * Nq > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_with_scores_cpu", [&] {
      attention_cpu_impl<scalar_t>(q, k, v, scale, causal, bias, row_weight, out, partial, chunks,
                                   blocks_per_chunk, bq, single_pass);
    });
    return {out, sum_slots(partial)};
  }
  return {out, at::zeros({B, Nk}, q.options().dtype(acc_dtype))};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CPU, m) {
  m.impl("attention_with_scores", &attention_with_scores_cpu);
}

}  // namespace tokenreduce

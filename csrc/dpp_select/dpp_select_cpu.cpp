// dpp_select on the CPU: greedy MAP inference of a (conditional) DPP, CDPruner's selection.
//
// Kernel L = diag(r) S diag(r), S_ij = <u_i, u_j> with u_i = x_i / max(||x_i||, 1e-12)
// (cosine similarity, accumulated in float32, float64 for float64 features; S_ii = 1 exactly,
// ||x_i||^2 / 1e-24 below the norm floor, so tied relevances give exactly tied L_ii),
// r = relevance (1 without). Greedy MAP by the incremental Cholesky of Chen et al. (NeurIPS 2018), as
// CDPruner's encode_images: d2_i = L_ii; each step picks j = argmax d2 over the eligible,
// not-yet-picked tokens (ties to the smallest index), gain = d2_j (= det L_{Y+j} / det L_Y),
// then e_i = (L_ji - <c_j, c_i>) / sqrt(d2_j), c_i <- [c_i, e_i], d2_i -= e_i^2.
//
// Gain 0 (the kernel restricted to the picks is singular): a step whose best d2 is not above
// tau = eps * max_eligible L_ii (eps = 1e-5 for float32, 1e-10 for float64 accumulation) is
// degenerate: it and every later step (d2 never grows) pick the not-yet-picked token with
// the largest (eligible, L_ii), ties to the smallest index, with gain 0 and no Cholesky
// update. So masked tokens are picked only once no eligible token is left (k above the
// eligible count), duplicates of picked tokens only once nothing independent is left.
//
// The work is one row of S per pick (k N D flops instead of the N^2 D of the full kernel).
// A row is computed only when the pick's row is not cached: then one GEMM computes the rows
// of the pick and of the kCandidates - 1 next-best tokens by their current d2 (the likely
// next picks), so the features stream through the core once per kCandidates picks at GEMM
// speed (at most kMaxCachedRows rows are kept; a miss beyond that clears them). Batch rows run
// in parallel (at::parallel_for); with fewer rows than threads they run one after the other
// and the GEMM takes the threads (tests/test_dpp_select.py checks that the picks do not
// depend on the thread count).
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm512_undefined_*() inside its own AVX-512 intrinsics (a false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/cpu_utils.h"
#include "dpp_select_checks.h"

namespace tokenreduce {
namespace {

constexpr int64_t kCandidates = 16;  // S rows per GEMM (the pick + the next-best by d2)
constexpr int64_t kMaxCachedRows = 8 * kCandidates;  // a miss with this many cached rows clears the cache

template <typename acc>
constexpr acc degenerate_eps() {
  return std::is_same_v<acc, double> ? acc(1e-10) : acc(1e-5);
}

template <typename acc>
struct Workspace {  // one thread's buffers, reused over its batch rows
  std::vector<acc> u, diag, d2, rel, chol, rows, gathered, tmp;
  std::vector<int64_t> slot, order;
  std::vector<uint8_t> picked, elig;
};

// Unit rows u [N, D] (acc) of batch row b and their squared norms; raises on NaN/Inf.
template <typename scalar_t, typename acc>
void load_unit_rows(Workspace<acc>& W, const at::Tensor& x, int64_t b, int64_t N, int64_t D) {
  const scalar_t* base = x.data_ptr<scalar_t>() + b * x.stride(0);
  const int64_t sn = x.stride(1);
  W.u.resize(std::max<int64_t>(N * D, 1));
  W.diag.resize(N);
  for (int64_t n = 0; n < N; ++n) {
    acc* row = W.u.data() + n * D;
    load_row(base + n * sn, D, row);
    const acc s = dot(row, row, D);
    bool finite = true;
    const acc iv = inv_norm_checked(row, D, s, finite);
    TORCH_CHECK_VALUE(finite, "tokenreduce.dpp_select: features has a non-finite value (NaN or Inf) in batch ",
                      b, ", token ", n);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) row[d] *= iv;
    W.diag[n] = !(s < acc(1e-24)) ? acc(1) : s * iv * iv;  // S_nn: 1, below the norm floor ||x||^2 / 1e-24
  }
}

// Rows of S for the pick `j` and the next-best uncached eligible tokens by d2: one GEMM.
template <typename acc>
void compute_rows(Workspace<acc>& W, int64_t N, int64_t D, int64_t j) {
  std::vector<int64_t>& cand = W.order;
  cand.clear();
  cand.push_back(j);
  std::vector<int64_t> pool;
  for (int64_t i = 0; i < N; ++i)
    if (i != j && W.elig[i] && !W.picked[i] && W.slot[i] < 0) pool.push_back(i);
  const int64_t extra = std::min<int64_t>(kCandidates - 1, int64_t(pool.size()));
  auto better = [&](int64_t a, int64_t c) { return W.d2[a] > W.d2[c] || (W.d2[a] == W.d2[c] && a < c); };
  std::partial_sort(pool.begin(), pool.begin() + extra, pool.end(), better);
  cand.insert(cand.end(), pool.begin(), pool.begin() + extra);
  const int64_t m = int64_t(cand.size());
  if (int64_t(W.rows.size()) / std::max<int64_t>(N, 1) + m > kMaxCachedRows) {  // bounded memory: start over
    W.rows.clear();
    std::fill(W.slot.begin(), W.slot.end(), int64_t(-1));
  }
  W.gathered.resize(m * D);
  for (int64_t c = 0; c < m; ++c) std::copy_n(W.u.data() + cand[c] * D, D, W.gathered.data() + c * D);
  const int64_t first = int64_t(W.rows.size()) / std::max<int64_t>(N, 1);
  W.rows.resize((first + m) * N);
  // S rows as u [N, D] times the candidates^T: the [N, m] product, then transposed into rows.
  // (gathered [m, D] times u^T instead spends more time packing the [N, D] operand, per call,
  // than computing: MKL's sgemm copy of the large side was ~1/3 of the op, one thread.)
  W.tmp.resize(N * m);
  gemm_abt(W.u.data(), D, W.gathered.data(), D, W.tmp.data(), m, N, m, D);
  acc* dst = W.rows.data() + first * N;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t c = 0; c < m; ++c) dst[c * N + i] = W.tmp[i * m + c];
  for (int64_t c = 0; c < m; ++c) W.slot[cand[c]] = first + c;
}

// The greedy of one batch row: index[k], gains[k].
template <typename acc>
void greedy_row(Workspace<acc>& W, int64_t N, int64_t D, int64_t k, int64_t* index, acc* gains) {
  W.d2.resize(N);
  W.slot.assign(N, -1);
  W.picked.assign(N, 0);
  W.rows.clear();
  W.chol.resize(std::max<int64_t>(k * N, 1));
  acc maxdiag = 0;
  for (int64_t i = 0; i < N; ++i) {
    W.diag[i] = W.rel[i] * W.rel[i] * W.diag[i];  // L_ii
    W.d2[i] = W.diag[i];
    if (W.elig[i] && W.diag[i] > maxdiag) maxdiag = W.diag[i];
  }
  const acc tau = degenerate_eps<acc>() * maxdiag;
  bool degenerate = false;
  for (int64_t t = 0; t < k; ++t) {
    int64_t j = -1;
    acc g = 0;
    if (!degenerate) {
      for (int64_t i = 0; i < N; ++i) {  // first max wins: ties to the smallest index; NaN never
        const acc v = W.d2[i];
        if (!W.elig[i] || W.picked[i] || v != v) continue;
        if (j < 0 || v > g) {
          j = i;
          g = v;
        }
      }
      degenerate = j < 0 || !(g > tau);
    }
    if (degenerate) {  // the fallback: largest (eligible, L_ii) among the unpicked, gain 0
      j = -1;
      for (int64_t i = 0; i < N; ++i) {
        if (W.picked[i]) continue;
        if (j < 0 || W.elig[i] > W.elig[j] || (W.elig[i] == W.elig[j] && W.diag[i] > W.diag[j])) j = i;
      }
      index[t] = j;
      gains[t] = 0;
      W.picked[j] = 1;
      continue;
    }
    index[t] = j;
    gains[t] = g;
    W.picked[j] = 1;
    if (t + 1 == k) break;
    if (W.slot[j] < 0) compute_rows(W, N, D, j);
    const acc* srow = W.rows.data() + W.slot[j] * N;
    acc* e = W.chol.data() + t * N;
    const acc rj = W.rel[j];
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) e[i] = rj * W.rel[i] * srow[i];
    for (int64_t u = 0; u < t; ++u) {
      const acc* cu = W.chol.data() + u * N;
      const acc w = cu[j];
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) e[i] -= w * cu[i];
    }
    const acc s = acc(1) / std::sqrt(g);
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) {
      e[i] *= s;
      W.d2[i] -= e[i] * e[i];
    }
  }
}

template <typename scalar_t>
void dpp_select_cpu_impl(const at::Tensor& x, int64_t k, const at::Tensor& rel, const at::Tensor& mask,
                         at::Tensor& index, at::Tensor& gains) {
  typedef acc_t<scalar_t> acc;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const acc* rp = rel.defined() ? rel.data_ptr<acc>() : nullptr;
  const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  int64_t* ip = index.data_ptr<int64_t>();
  acc* gp = gains.data_ptr<acc>();
  auto run = [&](Workspace<acc>& W, int64_t b) {
    load_unit_rows<scalar_t, acc>(W, x, b, N, D);
    W.rel.assign(N, acc(1));
    W.elig.assign(N, 1);
    for (int64_t i = 0; i < N; ++i) {
      if (rp != nullptr) {
        W.rel[i] = rp[b * N + i];
        TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(W.rel[i])),
                          "tokenreduce.dpp_select: relevance has a non-finite value (NaN or Inf) in batch ", b,
                          ", token ", i);
      }
      if (mp != nullptr) W.elig[i] = mp[b * N + i] ? 1 : 0;
    }
    greedy_row<acc>(W, N, D, k, ip + b * k, gp + b * k);
  };
  if (B < at::get_num_threads()) {  // too few rows to share out: the GEMMs take the threads
    Workspace<acc> W;
    for (int64_t b = 0; b < B; ++b) run(W, b);
    return;
  }
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Workspace<acc> W;
    for (int64_t b = b0; b < b1; ++b) run(W, b);
  });
}

std::tuple<at::Tensor, at::Tensor> dpp_select_cpu(const at::Tensor& features, int64_t k,
                                                  const std::optional<at::Tensor>& relevance,
                                                  const std::optional<at::Tensor>& mask) {
  check_dpp_select_args(features, k, relevance, mask);
  const int64_t B = features.size(0);
  const at::Tensor x = last_dim_contiguous(features);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor index = at::empty({B, k}, x.options().dtype(at::kLong));
  at::Tensor gains = at::empty({B, k}, x.options().dtype(acc_dtype));
  if (B == 0 || k == 0) return {index, gains};
  const at::Tensor rel = relevance.has_value() ? relevance->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dpp_select_cpu", [&] {
    dpp_select_cpu_impl<scalar_t>(x, k, rel, m, index, gains);
  });
  return {index, gains};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CPU, m) { m.impl("dpp_select", &dpp_select_cpu); }

}  // namespace tokenreduce

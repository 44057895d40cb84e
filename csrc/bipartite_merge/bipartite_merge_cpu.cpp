// bipartite_merge on the CPU: ToMe's bipartite soft matching and size-weighted merge.
//
//  1. best B partner of every A token: a GEMM of A.B^T cosine scores, reduced at once to
//     each A token's best B partner (ties to the smaller B index); the score matrix is
//     never stored beyond one batch row (or a block of A rows). For float metrics of width
//     >= kScreenMinDim the scores are screened first with a bfloat16 GEMM of the unit rows
//     (AMX / AVX512-BF16, several times the fp32 GEMM's speed); only the B columns whose
//     screened score lies within a rigorous error bound of the row's screened maximum are
//     rescored in float32, so the chosen partner and its score are those of the float32
//     computation (bf16_screen.h: the bound uses each row's measured bf16 rounding error).
//  2. per batch row: stable ranking of the A tokens by best score (ties to the smaller A
//     index), the output slot of every token (ToMe's order or spatial order), and the
//     members of every slot by a counting sort (ascending token index).
//  3. the size-weighted mean of every slot's members, summed in a fixed order:
//     deterministic, no atomics.
// Parallel split: with B >= 2 x threads one task per batch row runs 1-3 back to back (its
// rows stay in cache, the threads meet once, no [B, N, Dm] bf16 buffer); otherwise each
// step runs over (batch row, block) tasks.
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm512_undefined_*() inside its own AVX-512 intrinsics (a false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <atomic>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>

#include "../common/cpu_utils.h"
#include "bf16_screen.h"
#include "bipartite_merge_checks.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "bipartite_merge";
constexpr int64_t kRowBlock = 64;
constexpr int64_t kScreenMinDim = 128;  // bf16 screening pays off from this metric width
constexpr int64_t kScreenMinCols = 32;  // ... and this many B columns

template <typename scalar_t, typename mscalar_t>
void bipartite_merge_cpu_impl(const at::Tensor& x, const at::Tensor& metric, const at::Tensor& size,
                              int64_t r, int64_t protect, bool tome_order, at::Tensor& merged,
                              at::Tensor& size_out, at::Tensor& source, const char* metric_name) {
  using acc = acc_t<scalar_t>;
  using macc = acc_t<mscalar_t>;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), Dm = metric.size(2);
  const int64_t Na = (N + 1) / 2, Nb = N / 2, No = N - r;
  const int64_t pa = (protect + 1) / 2, pb = protect / 2;  // protected A rows / B columns

  // 0. metric rows in float (borrowed when they already are) and their inverse norms
  const mscalar_t* mp = metric.data_ptr<mscalar_t>();
  const macc* mrows = nullptr;
  int64_t mld = 0, mbs = 0;  // row stride, batch stride
  std::vector<macc> mbuf;
  if constexpr (std::is_same_v<mscalar_t, macc>) {
    if (metric.stride(1) >= Dm) {
      mrows = mp;
      mld = metric.stride(1);
      mbs = metric.stride(0);
    }
  }
  if (!mrows) {
    mbuf.resize(std::max<int64_t>(B * N * Dm, 1));
    parallel_for_cost(B * N, Dm, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        load_row(mp + (i / N) * metric.stride(0) + (i % N) * metric.stride(1), Dm,
                 mbuf.data() + i * Dm);
    });
    mrows = mbuf.data();
    mld = Dm;
    mbs = N * Dm;
  }
  std::vector<macc> inv(B * N);
  // bf16 screening (float metrics only; double keeps the plain float64 GEMM; where the bf16
  // GEMM is the faster, screen::screen_pays)
  const bool screen = std::is_same_v<macc, float> && Dm >= kScreenMinDim && Nb >= kScreenMinCols &&
                      screen::screen_pays();
  std::vector<float> uerr(screen ? B * N : 0);  // rounding error norm of each bf16 unit row
  const float fp_err = screen::fp_err(Dm);
  // batch rows holding a finite row whose squared norm overflows (|x| > ~1e19 in float32):
  // their scores come from unit rows, since the raw dot products would overflow too
  std::unique_ptr<std::atomic<bool>[]> huge(new std::atomic<bool>[std::max<int64_t>(B, 1)]);
  for (int64_t b = 0; b < B; ++b) huge[b].store(false, std::memory_order_relaxed);
  // inverse norms of flat rows [i0, i1), and (screen) their bf16 unit rows into ud (row i0 first)
  auto norms = [&](int64_t i0, int64_t i1, at::BFloat16* ud) {
    for (int64_t i = i0; i < i1; ++i) {
      const macc* row = mrows + (i / N) * mbs + (i % N) * mld;
      bool finite;
      const macc sq = dot(row, row, Dm);
      inv[i] = inv_norm_checked(row, Dm, sq, finite);
      TORCH_CHECK_VALUE(finite, "tokenreduce.bipartite_merge: ", metric_name,
                        " has a non-finite value (NaN or Inf) in batch ", i / N, ", token ", i % N);
      if (!std::isfinite(static_cast<double>(sq))) huge[i / N].store(true, std::memory_order_relaxed);
      if (screen) uerr[i] = screen::to_bf16_scaled(row, Dm, static_cast<float>(inv[i]), ud + (i - i0) * Dm);
    }
  };

  // 1. best B partner of A rows [a0, a0 + m) of batch row b; ub: the batch row's bf16 unit rows
  std::vector<macc> node_max(B * Na);
  std::vector<int64_t> node_idx(B * Na);
  struct MatchScratch {
    std::vector<macc> S;
    std::unique_ptr<at::BFloat16[]> Sh;  // uninitialised: the GEMM writes it
    int64_t sh_cap = 0;
    std::vector<float> thr;
  };
  auto match = [&](int64_t b, int64_t a0, int64_t m, const at::BFloat16* ub, MatchScratch& w) {
    const macc* base = mrows + b * mbs;
    const macc* ib = inv.data() + b * N;
    std::vector<macc> unit_rows, ones;
    const bool is_huge = huge[b].load(std::memory_order_relaxed);
    if (is_huge) {  // rare: score unit rows (inverse norms 1)
      unit_rows.resize(N * Dm);
      ones.assign(N, macc(1));
      for (int64_t i = 0; i < N; ++i)
        for (int64_t d = 0; d < Dm; ++d) unit_rows[i * Dm + d] = base[i * mld + d] * ib[i];
      base = unit_rows.data();
      ib = ones.data();
    }
    const int64_t row_ld = is_huge ? Dm : mld;
    if (screen) {
      if (w.sh_cap < m * Nb) {
        w.Sh = uninitialised<at::BFloat16>(m * Nb);
        w.sh_cap = m * Nb;
      }
      w.thr.resize(m);
      gemm_abt(ub + 2 * a0 * Dm, 2 * Dm, ub + Dm, 2 * Dm, w.Sh.get(), Nb, m, Nb, Dm);
      const float* ue = uerr.data() + b * N;
      float eb = 0;  // largest rounding error of an unprotected B row
      for (int64_t c = pb; c < Nb; ++c) eb = std::max(eb, ue[2 * c + 1]);
      int64_t cand = 0;  // candidates in the tile: rescoring them must stay cheaper than the GEMM
      for (int64_t e = 0; e < m; ++e) {
        const at::BFloat16* sh = w.Sh.get() + e * Nb;
        const float mx = screen::bf16_max(sh, pb, Nb);
        w.thr[e] = mx - screen::screen_margin(mx, ue[2 * (a0 + e)], eb, fp_err);
        cand += screen::bf16_count_at_least(sh, pb, Nb, w.thr[e]);
      }
      if (cand * 8 <= m * Nb) {
        for (int64_t e = 0; e < m; ++e) {
          const int64_t a = a0 + e;
          ArgMax<macc> am;
          if (a >= pa) {
            const at::BFloat16* sh = w.Sh.get() + e * Nb;
            const macc* ar = base + 2 * a * row_ld;
            for (int64_t c = pb; c < Nb; ++c)
              if (screen::bf16_value(sh, c) >= w.thr[e]) am.push(dot(ar, base + (2 * c + 1) * row_ld, Dm) * ib[2 * c + 1], c);
          }
          node_max[b * Na + a] = am.index >= 0 ? am.value * ib[2 * a] : -std::numeric_limits<macc>::infinity();
          node_idx[b * Na + a] = std::max<int64_t>(am.index, 0);
        }
        return;
      }
      // near-duplicate tokens everywhere: the float32 GEMM is cheaper than rescoring
    }
    w.S.resize(m * std::max<int64_t>(Nb, 1));
    gemm_abt(base + 2 * a0 * row_ld, 2 * row_ld, base + row_ld, 2 * row_ld, w.S.data(), Nb, m, Nb, Dm);
    for (int64_t e = 0; e < m; ++e) {
      const int64_t a = a0 + e;
      ArgMax<macc> am;
      if (a >= pa) {
        const macc* s = w.S.data() + e * Nb;
        for (int64_t c = pb; c < Nb; ++c) am.push(s[c] * ib[2 * c + 1], c);
      }
      node_max[b * Na + a] = am.index >= 0 ? am.value * ib[2 * a] : -std::numeric_limits<macc>::infinity();
      node_idx[b * Na + a] = std::max<int64_t>(am.index, 0);
    }
  };

  // 2. ranking, output slots and slot members of batch row b: off [No + 1], mem [N]
  int64_t* srcp = source.data_ptr<int64_t>();
  struct PlanScratch {
    std::vector<int64_t> rank, slot_b, cnt, unm;
    std::vector<uint8_t> gone;
  };
  auto plan = [&](int64_t b, int64_t* off, int64_t* mem, PlanScratch& w) {
    w.rank.resize(Na);
    w.slot_b.resize(Nb);
    w.cnt.resize(No + 1);
    const macc* nm = node_max.data() + b * Na;
    std::iota(w.rank.begin(), w.rank.end(), 0);
    std::stable_sort(w.rank.begin(), w.rank.end(), [&](int64_t i, int64_t j) { return nm[i] > nm[j]; });
    int64_t* src = srcp + b * N;
    // rank[0:r] merge; rank[r:] stay
    if (tome_order) {
      // protected tokens (index order), unmerged A (index order when protect > 0, else
      // by descending score, as ToMe), then the unprotected B tokens
      w.unm.assign(w.rank.begin() + r, w.rank.end());
      if (protect > 0) std::sort(w.unm.begin(), w.unm.end());
      int64_t next = protect;
      for (int64_t a : w.unm) src[2 * a] = a < pa ? 2 * a : next++;
      for (int64_t c = 0; c < Nb; ++c) w.slot_b[c] = c < pb ? 2 * c + 1 : next++;
    } else {
      w.gone.assign(N, 0);
      for (int64_t e = 0; e < r; ++e) w.gone[2 * w.rank[e]] = 1;
      int64_t next = 0;
      for (int64_t i = 0; i < N; ++i) {
        if (w.gone[i]) continue;
        if (i % 2 == 0) src[i] = next++;
        else w.slot_b[i / 2] = next++;
      }
    }
    for (int64_t c = 0; c < Nb; ++c) src[2 * c + 1] = w.slot_b[c];
    for (int64_t e = 0; e < r; ++e) {
      const int64_t a = w.rank[e];
      src[2 * a] = w.slot_b[node_idx[b * Na + a]];
    }
    // counting sort of tokens by slot (ascending token index inside a slot)
    std::fill(w.cnt.begin(), w.cnt.end(), 0);
    for (int64_t i = 0; i < N; ++i) ++w.cnt[src[i] + 1];
    off[0] = 0;
    for (int64_t s = 0; s < No; ++s) off[s + 1] = off[s] + w.cnt[s + 1];
    std::copy(off, off + No, w.cnt.begin());
    for (int64_t i = 0; i < N; ++i) mem[w.cnt[src[i]]++] = i;
  };

  // 3. size-weighted mean of slot s of batch row b (members in a fixed order: deterministic)
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = merged.data_ptr<scalar_t>();
  const auto* sp = size.data_ptr<acc>();
  auto* sop = size_out.data_ptr<acc>();
  auto merge = [&](int64_t b, int64_t s, const int64_t* off, const int64_t* mem, acc* row) {
    std::fill(row, row + D, acc(0));
    acc total = 0;
    for (int64_t e = off[s]; e < off[s + 1]; ++e) {
      const int64_t i = mem[e];
      const acc w = sp[b * N + i];
      const scalar_t* xr = xp + b * x.stride(0) + i * x.stride(1);
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) row[d] += w * static_cast<acc>(xr[d]);
      total += w;
    }
    sop[b * No + s] = total;
    const acc inv_total = acc(1) / total;
    scalar_t* o = op + (b * No + s) * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(row[d] * inv_total);
  };

  // With enough batch rows, one task per batch row runs all three steps (its metric rows
  // and tokens are still in cache from one step to the next, and the threads meet once);
  // otherwise each step is split over (batch row, block) tasks.
  const bool per_batch = B >= 2 * at::get_num_threads() && Na * Nb <= (int64_t(1) << 20);
  if (per_batch) {
    parallel_for_cost(B, Na * Nb * Dm, [&](int64_t b0, int64_t b1) {
      // this batch row's bf16 unit rows (the norm pass writes every row)
      auto ub = uninitialised<at::BFloat16>(screen ? N * Dm : 0);
      MatchScratch mw;
      PlanScratch pw;
      std::vector<int64_t> off(No + 1), mem(N);
      std::vector<acc> row(D);
      for (int64_t b = b0; b < b1; ++b) {
        norms(b * N, (b + 1) * N, ub.get());
        match(b, 0, Na, ub.get(), mw);
        plan(b, off.data(), mem.data(), pw);
        for (int64_t s = 0; s < No; ++s) merge(b, s, off.data(), mem.data(), row.data());
      }
    });
    return;
  }
  // bf16 unit rows of every batch row (uninitialised: every row is written by its norm pass)
  auto unit = uninitialised<at::BFloat16>(screen ? B * N * Dm : 0);
  parallel_for_cost(B * N, Dm, [&](int64_t i0, int64_t i1) { norms(i0, i1, unit.get() + i0 * Dm); });
  const int64_t nblk = (Na + kRowBlock - 1) / kRowBlock;
  parallel_for_cost(B * nblk, kRowBlock * Nb * Dm, [&](int64_t t0, int64_t t1) {
    MatchScratch mw;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, a0 = (t % nblk) * kRowBlock;
      match(b, a0, std::min(kRowBlock, Na - a0), unit.get() + b * N * Dm, mw);
    }
  });
  std::vector<int64_t> offsets(B * (No + 1)), members(B * N);
  parallel_for_cost(B, 8 * N, [&](int64_t b0, int64_t b1) {
    PlanScratch pw;
    for (int64_t b = b0; b < b1; ++b) plan(b, offsets.data() + b * (No + 1), members.data() + b * N, pw);
  });
  parallel_for_cost(B * No, 2 * D * N / std::max<int64_t>(No, 1), [&](int64_t t0, int64_t t1) {
    std::vector<acc> row(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / No;
      merge(b, t % No, offsets.data() + b * (No + 1), members.data() + b * N, row.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_merge_cpu(
    const at::Tensor& x_in, int64_t r, const std::optional<at::Tensor>& metric_in,
    const std::optional<at::Tensor>& size_in, int64_t protect, c10::string_view order) {
  check_bipartite_merge_args(x_in, r, metric_in, size_in, protect, order);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const auto acc_dtype = at::toOpMathType(x_in.scalar_type());
  at::Tensor metric = metric_in.has_value() ? *metric_in : x_in;
  at::Tensor size;
  if (size_in.has_value()) {
    size = size_in->to(acc_dtype).contiguous();
  } else {
    size = at::ones({B, N}, x_in.options().dtype(acc_dtype));
  }
  const at::Tensor x = last_dim_contiguous(x_in);
  metric = last_dim_contiguous(metric);
  at::Tensor merged = at::empty({B, N - r, D}, x.options());
  at::Tensor size_out = at::empty({B, N - r}, x.options().dtype(acc_dtype));
  at::Tensor source = at::empty({B, N}, x.options().dtype(at::kLong));
  if (r == 0) {  // nothing merges: ToMe returns the tokens untouched
    merged.copy_(x);
    size_out.copy_(size);
    source.copy_(at::arange(N, source.options()).expand({B, N}));
    return {merged, size_out, source};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bipartite_merge_cpu", [&] {
    using xs_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "bipartite_merge_cpu_metric", [&] {
      bipartite_merge_cpu_impl<xs_t, scalar_t>(x, metric, size, r, protect, order == "tome", merged,
                                               size_out, source, metric_in.has_value() ? "metric" : "x");
    });
  });
  return {merged, size_out, source};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CPU, m) { m.impl("bipartite_merge", &bipartite_merge_cpu); }

}  // namespace tokenreduce

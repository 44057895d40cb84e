// bipartite_merge on the CPU: ToMe's bipartite soft matching and size-weighted merge.
//
//  1. (b, block of A rows) tasks: a GEMM tile of A.B^T cosine scores, reduced at once to
//     each A token's best B partner (ties to the smaller B index); the score matrix is
//     never stored beyond the tile. For float metrics of width >= kScreenMinDim the tile
//     is screened first with a bfloat16 GEMM of the unit rows (about 3x the fp32 GEMM's
//     speed); only the B columns whose screened score lies within twice a rigorous error
//     bound of the row's screened maximum are rescored in float32, so the chosen partner
//     and its score are those of the float32 computation (see screen_eps).
//  2. per batch row: stable ranking of the A tokens by best score (ties to the smaller A
//     index), the output slot of every token (ToMe's order or spatial order), and the
//     members of every slot by a counting sort (ascending token index).
//  3. (b, output slot) tasks: the size-weighted mean of the slot's members, summed in a
//     fixed order: deterministic, no atomics.
#include <atomic>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>

#include "../common/cpu_utils.h"
#include "bipartite_merge_checks.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "bipartite_merge";
constexpr int64_t kRowBlock = 64;
constexpr int64_t kScreenMinDim = 128;  // bf16 screening pays off from this metric width
constexpr int64_t kScreenMinCols = 32;  // ... and this many B columns

// Bound on |screened score - float32 score| for unit rows of width d. Rounding the unit
// rows to bf16 (unit roundoff u = 2^-8) moves a dot product by at most (2u + u^2), the
// GEMM's float32 accumulation and the float32 rescoring by at most d * 2^-24 each, and
// rounding the GEMM's result to bf16 by u (|score| <= 1); 1e-5 covers the float32 norms.
inline float screen_eps(int64_t d) {
  const double u = 1.0 / 256.0;
  return static_cast<float>(3 * u + 4 * u * u + 2.2 * static_cast<double>(d) / 16777216.0 + 1e-5);
}

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
  // bf16 screening (float metrics only; double keeps the plain float64 GEMM)
  const bool screen = std::is_same_v<macc, float> && Dm >= kScreenMinDim && Nb >= kScreenMinCols;
  // unit rows in bf16 (uninitialised: every row is written by its norm pass)
  std::unique_ptr<at::BFloat16[]> unit(screen ? new at::BFloat16[B * N * Dm] : nullptr);
  // batch rows holding a finite row whose squared norm overflows (|x| > ~1e19 in float32):
  // their scores come from unit rows, since the raw dot products would overflow too
  std::unique_ptr<std::atomic<bool>[]> huge(new std::atomic<bool>[std::max<int64_t>(B, 1)]);
  for (int64_t b = 0; b < B; ++b) huge[b].store(false, std::memory_order_relaxed);
  auto norms = [&](int64_t i0, int64_t i1) {  // inverse norms (and bf16 unit rows) of flat rows [i0, i1)
    for (int64_t i = i0; i < i1; ++i) {
      const macc* row = mrows + (i / N) * mbs + (i % N) * mld;
      bool finite;
      const macc sq = dot(row, row, Dm);
      inv[i] = inv_norm_checked(row, Dm, sq, finite);
      TORCH_CHECK_VALUE(finite, "tokenreduce.bipartite_merge: ", metric_name,
                        " has a non-finite value (NaN or Inf) in batch ", i / N, ", token ", i % N);
      if (!std::isfinite(static_cast<double>(sq))) huge[i / N].store(true, std::memory_order_relaxed);
      if (screen) {
        // round to nearest even on the bits (the row is finite: checked above), so the
        // loop vectorises, unlike c10::BFloat16's NaN-aware conversion
        const float w = static_cast<float>(inv[i]);
        uint16_t* u = reinterpret_cast<uint16_t*>(unit.get() + i * Dm);
#pragma omp simd
        for (int64_t d = 0; d < Dm; ++d) {
          uint32_t bits;
          const float f = static_cast<float>(row[d]) * w;
          std::memcpy(&bits, &f, sizeof bits);
          u[d] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        }
      }
    }
  };
  // With enough batch rows, one task per batch row computes its norms right before its
  // GEMM (the rows are still in cache); otherwise norms first, then row blocks of A.
  const bool per_batch = B >= 2 * at::get_num_threads() && Na * Nb <= (int64_t(1) << 20);
  if (!per_batch) parallel_for_cost(B * N, Dm, norms);

  // 1. best B partner of every A token
  std::vector<macc> node_max(B * Na);
  std::vector<int64_t> node_idx(B * Na);
  const int64_t rb = per_batch ? std::max<int64_t>(Na, 1) : kRowBlock;
  const int64_t nblk = (Na + rb - 1) / rb;
  const float eps2 = 2 * screen_eps(Dm);
  parallel_for_cost(B * nblk, rb * Nb * Dm, [&](int64_t t0, int64_t t1) {
    std::vector<macc> S;
    std::vector<at::BFloat16> Sh(screen ? rb * std::max<int64_t>(Nb, 1) : 0);
    std::vector<float> thr(screen ? rb : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, a0 = (t % nblk) * rb, m = std::min(rb, Na - a0);
      if (per_batch) norms(b * N, (b + 1) * N);
      const macc* base = mrows + b * mbs;
      const macc* ib = inv.data() + b * N;
      std::vector<macc> unit_rows, ones;
      if (huge[b].load(std::memory_order_relaxed)) {  // rare: score unit rows (inverse norms 1)
        unit_rows.resize(N * Dm);
        ones.assign(N, macc(1));
        for (int64_t i = 0; i < N; ++i)
          for (int64_t d = 0; d < Dm; ++d) unit_rows[i * Dm + d] = base[i * mld + d] * ib[i];
        base = unit_rows.data();
        ib = ones.data();
      }
      const int64_t row_ld = huge[b].load(std::memory_order_relaxed) ? Dm : mld;
      if (screen) {
        const at::BFloat16* ub = unit.get() + b * N * Dm;
        gemm_abt(ub + 2 * a0 * Dm, 2 * Dm, ub + Dm, 2 * Dm, Sh.data(), Nb, m, Nb, Dm);
        int64_t cand = 0;  // candidates in the tile: rescoring them must stay cheaper than the GEMM
        for (int64_t e = 0; e < m; ++e) {
          const at::BFloat16* sh = Sh.data() + e * Nb;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t c = pb; c < Nb; ++c) mx = std::max(mx, static_cast<float>(sh[c]));
          thr[e] = mx - eps2;
          for (int64_t c = pb; c < Nb; ++c) cand += static_cast<float>(sh[c]) >= thr[e];
        }
        if (cand * 8 <= m * Nb) {
          for (int64_t e = 0; e < m; ++e) {
            const int64_t a = a0 + e;
            ArgMax<macc> am;
            if (a >= pa) {
              const at::BFloat16* sh = Sh.data() + e * Nb;
              const macc* ar = base + 2 * a * row_ld;
              for (int64_t c = pb; c < Nb; ++c)
                if (static_cast<float>(sh[c]) >= thr[e]) am.push(dot(ar, base + (2 * c + 1) * row_ld, Dm) * ib[2 * c + 1], c);
            }
            node_max[b * Na + a] = am.index >= 0 ? am.value * ib[2 * a] : -std::numeric_limits<macc>::infinity();
            node_idx[b * Na + a] = std::max<int64_t>(am.index, 0);
          }
          continue;
        }
        // near-duplicate tokens everywhere: the float32 GEMM is cheaper than rescoring
      }
      S.resize(rb * std::max<int64_t>(Nb, 1));
      gemm_abt(base + 2 * a0 * row_ld, 2 * row_ld, base + row_ld, 2 * row_ld, S.data(), Nb, m, Nb, Dm);
      for (int64_t e = 0; e < m; ++e) {
        const int64_t a = a0 + e;
        ArgMax<macc> am;
        if (a >= pa) {
          const macc* s = S.data() + e * Nb;
          for (int64_t c = pb; c < Nb; ++c) am.push(s[c] * ib[2 * c + 1], c);
        }
        node_max[b * Na + a] = am.index >= 0 ? am.value * ib[2 * a] : -std::numeric_limits<macc>::infinity();
        node_idx[b * Na + a] = std::max<int64_t>(am.index, 0);
      }
    }
  });

  // 2. ranking, slots and slot members
  int64_t* srcp = source.data_ptr<int64_t>();
  std::vector<int64_t> offsets(B * (No + 1)), members(B * N);
  parallel_for_cost(B, 8 * N, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> rank(Na), slot_b(Nb), cnt(No + 1);
    for (int64_t b = b0; b < b1; ++b) {
      const macc* nm = node_max.data() + b * Na;
      std::iota(rank.begin(), rank.end(), 0);
      std::stable_sort(rank.begin(), rank.end(), [&](int64_t i, int64_t j) { return nm[i] > nm[j]; });
      int64_t* src = srcp + b * N;
      // rank[0:r] merge; rank[r:] stay
      if (tome_order) {
        // protected tokens (index order), unmerged A (index order when protect > 0, else
        // by descending score, as ToMe), then the unprotected B tokens
        std::vector<int64_t> unm(rank.begin() + r, rank.end());
        if (protect > 0) std::sort(unm.begin(), unm.end());
        int64_t next = protect;
        for (int64_t a : unm) src[2 * a] = a < pa ? 2 * a : next++;
        for (int64_t c = 0; c < Nb; ++c) slot_b[c] = c < pb ? 2 * c + 1 : next++;
      } else {
        std::vector<uint8_t> gone(N, 0);
        for (int64_t e = 0; e < r; ++e) gone[2 * rank[e]] = 1;
        int64_t next = 0;
        for (int64_t i = 0; i < N; ++i) {
          if (gone[i]) continue;
          if (i % 2 == 0) src[i] = next++;
          else slot_b[i / 2] = next++;
        }
      }
      for (int64_t c = 0; c < Nb; ++c) src[2 * c + 1] = slot_b[c];
      for (int64_t e = 0; e < r; ++e) {
        const int64_t a = rank[e];
        src[2 * a] = slot_b[node_idx[b * Na + a]];
      }
      // counting sort of tokens by slot (ascending token index inside a slot)
      int64_t* off = offsets.data() + b * (No + 1);
      std::fill(cnt.begin(), cnt.end(), 0);
      for (int64_t i = 0; i < N; ++i) ++cnt[src[i] + 1];
      off[0] = 0;
      for (int64_t s = 0; s < No; ++s) off[s + 1] = off[s] + cnt[s + 1];
      std::copy(off, off + No, cnt.begin());
      int64_t* mem = members.data() + b * N;
      for (int64_t i = 0; i < N; ++i) mem[cnt[src[i]]++] = i;
    }
  });

  // 3. size-weighted mean per slot
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = merged.data_ptr<scalar_t>();
  const auto* sp = size.data_ptr<acc>();
  auto* sop = size_out.data_ptr<acc>();
  parallel_for_cost(B * No, 2 * D * N / std::max<int64_t>(No, 1), [&](int64_t t0, int64_t t1) {
    std::vector<acc> row(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / No, s = t % No;
      const int64_t* off = offsets.data() + b * (No + 1);
      const int64_t* mem = members.data() + b * N;
      std::fill(row.begin(), row.end(), acc(0));
      acc total = 0;
      for (int64_t e = off[s]; e < off[s + 1]; ++e) {
        const int64_t i = mem[e];
        const acc w = sp[b * N + i];
        const scalar_t* xr = xp + b * x.stride(0) + i * x.stride(1);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) row[d] += w * static_cast<acc>(xr[d]);
        total += w;
      }
      sop[t] = total;
      const acc inv_total = acc(1) / total;
      scalar_t* o = op + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(row[d] * inv_total);
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

// recycle on the CPU: pruned (source) tokens join their most similar kept (target)
// token, or the slot given by `assign`, and each slot becomes the weighted mean of
// its target and its sources.
//
//  1. (b, block of sources) tasks (one block per batch row when B >= 2 x threads): gather
//     and normalise the sources' feature rows, a GEMM tile against the normalised targets,
//     arg-max per source (ties to the smaller target slot). For float features of width
//     >= kScreenMinDim against >= kScreenMinCols targets the tile is screened by a bfloat16
//     GEMM first and only the targets within a rigorous bound of the screened maximum are
//     rescored in float32 (bf16_screen.h), so the slot is that of the float32 scores.
//     Skipped when `assign` is given.
//  2. per batch row: counting sort of the sources by slot (ascending source position).
//  3. (b, slot) tasks: weighted mean of target and sources in a fixed order:
//     deterministic, no atomics.
#include <torch/library.h>

#include "../bipartite_merge/bf16_screen.h"
#include "../common/cpu_utils.h"
#include "recycle_checks.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "recycle";
constexpr int64_t kRowBlock = 64;
constexpr int64_t kScreenMinDim = 128;  // bf16 screening pays off from this feature width
constexpr int64_t kScreenMinCols = 32;  // ... and this many targets

// Ask for a row of n elements ahead of its use (the gathered rows are scattered in x: the
// hardware prefetcher only follows a row once it is being read).
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

// Normalised feature rows of `idx` (n positions of batch b) into dst [n, Df].
template <typename fscalar_t, typename acc>
void gather_normalised(const at::Tensor& f, int64_t b, const int64_t* idx, int64_t n, acc* dst,
                       const char* name) {
  const int64_t Df = f.size(2);
  const fscalar_t* fp = f.data_ptr<fscalar_t>() + b * f.stride(0);
  for (int64_t e = 0; e < n; ++e) {
    acc* d = dst + e * Df;
    if (e + 1 < n) prefetch_row(fp + idx[e + 1] * f.stride(1), Df);  // rows are scattered in x
    load_row(fp + idx[e] * f.stride(1), Df, d);
    bool finite;
    const acc iv = inv_norm_checked(d, Df, dot(d, d, Df), finite);
    TORCH_CHECK_VALUE(finite, "tokenreduce.recycle: ", name,
                      " has a non-finite value (NaN or Inf) in batch ", b, ", token ", idx[e]);
#pragma omp simd
    for (int64_t d2 = 0; d2 < Df; ++d2) d[d2] *= iv;
  }
}

template <typename fscalar_t>
void assign_by_similarity(const at::Tensor& feats, const at::Tensor& target, const at::Tensor& source,
                          at::Tensor& slot, const char* name) {
  using acc = acc_t<fscalar_t>;
  const int64_t B = target.size(0), T = target.size(1), S = source.size(1), Df = feats.size(2);
  const int64_t* tp = target.data_ptr<int64_t>();
  const int64_t* sp = source.data_ptr<int64_t>();
  int64_t* slp = slot.data_ptr<int64_t>();
  // bf16 screening (float features only; double keeps the plain float64 GEMM)
  const bool screen = std::is_same_v<acc, float> && Df >= kScreenMinDim && T >= kScreenMinCols;
  const float fp_err = screen::fp_err(Df);
  // normalised targets of every batch row (and their bf16 copies, rounding errors, the
  // largest rounding error per batch row)
  std::vector<acc> tf(std::max<int64_t>(B * T * Df, 1));
  std::vector<at::BFloat16> tfh(screen ? B * T * Df : 0);
  std::vector<float> terr(screen ? B : 0);
  parallel_for_cost(B, T * Df, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      acc* rows = tf.data() + b * T * Df;
      gather_normalised<fscalar_t, acc>(feats, b, tp + b * T, T, rows, name);
      if (!screen) continue;
      float eb = 0;
      for (int64_t c = 0; c < T; ++c)
        eb = std::max(eb, screen::to_bf16_scaled(rows + c * Df, Df, 1.0f, tfh.data() + (b * T + c) * Df));
      terr[b] = eb;
    }
  });
  // one task per batch row when there are enough of them (one GEMM call each), else blocks
  const int64_t rb = B >= 2 * at::get_num_threads() ? std::max<int64_t>(S, 1) : kRowBlock;
  const int64_t nblk = (S + rb - 1) / rb;
  parallel_for_cost(B * nblk, rb * T * Df, [&](int64_t t0, int64_t t1) {
    std::vector<acc> fs(rb * Df), sim;
    std::vector<at::BFloat16> fsh(screen ? rb * Df : 0), simh(screen ? rb * T : 0);
    std::vector<float> serr(screen ? rb : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, s0 = (t % nblk) * rb, m = std::min(rb, S - s0);
      gather_normalised<fscalar_t, acc>(feats, b, sp + b * S + s0, m, fs.data(), name);
      const acc* tb = tf.data() + b * T * Df;
      if (screen) {
        for (int64_t e = 0; e < m; ++e)
          serr[e] = screen::to_bf16_scaled(fs.data() + e * Df, Df, 1.0f, fsh.data() + e * Df);
        gemm_abt(fsh.data(), Df, tfh.data() + b * T * Df, Df, simh.data(), T, m, T, Df);
        // rescore the candidates in float32 while they stay cheaper than the float32 GEMM
        int64_t cand = 0;
        for (int64_t e = 0; e < m && cand * 8 <= m * T; ++e) {
          const at::BFloat16* sh = simh.data() + e * T;
          const float mx = screen::bf16_max(sh, 0, T);
          const float thr = mx - screen::screen_margin(mx, serr[e], terr[b], fp_err);
          ArgMax<acc> am;
          for (int64_t c = 0; c < T; ++c)
            if (screen::bf16_value(sh, c) >= thr) {
              am.push(dot(fs.data() + e * Df, tb + c * Df, Df), c);
              ++cand;
            }
          slp[b * S + s0 + e] = am.index;
        }
        if (cand * 8 <= m * T) continue;
        // near-duplicate tokens everywhere: the float32 GEMM is cheaper than rescoring
      }
      sim.resize(rb * T);
      gemm_abt(fs.data(), Df, tb, Df, sim.data(), T, m, T, Df);
      for (int64_t e = 0; e < m; ++e) {
        ArgMax<acc> am;
        for (int64_t c = 0; c < T; ++c) am.push(sim[e * T + c], c);
        slp[b * S + s0 + e] = am.index;
      }
    }
  });
}

template <typename scalar_t>
void aggregate(const at::Tensor& x, const at::Tensor& target, const at::Tensor& source,
               const at::Tensor& weight, const at::Tensor& slot, bool include_target, at::Tensor& out,
               at::Tensor& count, at::Tensor& wsum) {
  using acc = acc_t<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), T = target.size(1), S = source.size(1);
  const int64_t* tp = target.data_ptr<int64_t>();
  const int64_t* sp = source.data_ptr<int64_t>();
  const int64_t* slp = slot.data_ptr<int64_t>();
  const acc* wp = weight.defined() ? weight.data_ptr<acc>() : nullptr;
  // 2. sources grouped by slot
  std::vector<int64_t> offsets(B * (T + 1)), members(std::max<int64_t>(B * S, 1));
  parallel_for_cost(B, 4 * S, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cnt(T + 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* sl = slp + b * S;
      int64_t* off = offsets.data() + b * (T + 1);
      std::fill(cnt.begin(), cnt.end(), 0);
      for (int64_t e = 0; e < S; ++e)
        if (sl[e] >= 0) ++cnt[sl[e] + 1];
      off[0] = 0;
      for (int64_t c = 0; c < T; ++c) off[c + 1] = off[c] + cnt[c + 1];
      std::copy(off, off + T, cnt.begin());
      int64_t* mem = members.data() + b * S;
      for (int64_t e = 0; e < S; ++e)
        if (sl[e] >= 0) mem[cnt[sl[e]]++] = sp[b * S + e];
    }
  });
  // 3. weighted means
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  int64_t* cp = count.data_ptr<int64_t>();
  acc* wsp = wsum.data_ptr<acc>();
  parallel_for_cost(B * T, 2 * D * (S + T) / std::max<int64_t>(T, 1), [&](int64_t t0, int64_t t1) {
    std::vector<acc> row(D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / T, c = t % T;
      const int64_t* off = offsets.data() + b * (T + 1);
      const int64_t* mem = members.data() + b * S;
      std::fill(row.begin(), row.end(), acc(0));
      acc total = 0;
      auto add = [&](int64_t i) {
        const acc w = wp ? wp[b * N + i] : acc(1);
        const scalar_t* xr = xp + b * x.stride(0) + i * x.stride(1);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) row[d] += w * static_cast<acc>(xr[d]);
        total += w;
      };
      if (include_target) add(tp[t]);
      for (int64_t e = off[c]; e < off[c + 1]; ++e) {
        if (e + 1 < off[c + 1]) prefetch_row(xp + b * x.stride(0) + mem[e + 1] * x.stride(1), D);
        add(mem[e]);
      }
      cp[t] = (off[c + 1] - off[c]) + (include_target ? 1 : 0);
      wsp[t] = total;
      const acc inv = total != acc(0) ? acc(1) / total : acc(0);  // empty or zero-weight slot -> 0
      scalar_t* o = op + t * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(row[d] * inv);
    }
  });
}

void check_positions(const char* name, const at::Tensor& idx, int64_t N) {
  if (idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < N, "tokenreduce.recycle: ", name, " holds positions in [", lo,
                    ", ", hi, "], outside [0, N=", N, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recycle_cpu(
    const at::Tensor& x_in, const at::Tensor& target_in, const at::Tensor& source_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& assign_in,
    const std::optional<at::Tensor>& features_in, c10::string_view metric, bool include_target) {
  check_recycle_args(x_in, target_in, source_in, weight_in, assign_in, features_in, metric);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const int64_t T = target_in.size(1), S = source_in.size(1);
  const at::Tensor target = target_in.contiguous(), source = source_in.contiguous();
  check_positions("target", target, N);
  check_positions("source", source, N);
  const auto acc_dtype = at::toOpMathType(x_in.scalar_type());
  at::Tensor weight;
  if (weight_in.has_value()) weight = weight_in->to(acc_dtype).contiguous();
  at::Tensor slot;
  if (assign_in.has_value()) {
    slot = assign_in->contiguous().clone();
    if (slot.numel() > 0) {
      const int64_t lo = slot.min().item<int64_t>(), hi = slot.max().item<int64_t>();
      TORCH_CHECK_INDEX(lo >= -1 && hi < T, "tokenreduce.recycle: assign holds slots in [", lo, ", ",
                        hi, "], outside [-1, T=", T, ")");
    }
  } else {
    const at::Tensor feats = last_dim_contiguous(features_in.has_value() ? *features_in : x_in);
    slot = at::empty({B, S}, x_in.options().dtype(at::kLong));
    if (B * S > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "recycle_assign", [&] {
        assign_by_similarity<scalar_t>(feats, target, source, slot, features_in.has_value() ? "features" : "x");
      });
    }
  }
  const at::Tensor x = last_dim_contiguous(x_in);
  at::Tensor out = at::empty({B, T, D}, x.options());
  at::Tensor count = at::empty({B, T}, x.options().dtype(at::kLong));
  at::Tensor wsum = at::empty({B, T}, x.options().dtype(acc_dtype));
  if (B * T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recycle_cpu", [&] {
      aggregate<scalar_t>(x, target, source, weight, slot, include_target, out, count, wsum);
    });
  }
  return {out, count, slot, wsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CPU, m) { m.impl("recycle", &recycle_cpu); }

}  // namespace tokenreduce

// recycle on the CPU: pruned (source) tokens join their most similar kept (target)
// token, or the slot given by `assign`, and each slot becomes the weighted mean of
// its target and its sources.
//
// With B >= 2 x threads (no `assign`, features of x's dtype) one task per batch row runs
// steps 1-3 back to back (recycle_by_rows: one parallel region, no barrier between the steps,
// the row's tokens still in cache for its means; 4.9-5.1 against 5.7-6.1 ms for three
// parallel steps at the bench shape, B=8, 2 threads of an AMD EPYC, `tokenreduce bench --op
// recycle` alternated); otherwise each step runs over all batch rows in turn:
//  1. Assignment (skipped when `assign` is given), in (b, block of sources) tasks: the
//     block's feature rows are read once, a GEMM tile scores them against the normalised
//     targets, arg-max per source (ties to the
//     smaller target slot). For float features of width >= kScreenMinDim against >=
//     kScreenMinCols targets the tile is screened by a bfloat16 GEMM first: a source with
//     one target within the rigorous bound of its screened maximum takes it, the others
//     rescore those targets in float32 (bf16_screen.h), so the slot is that of the float32
//     scores. A source's norm scales all its scores alike, so its rows are scored as they
//     are in x (no normalised copy).
//  2. Per batch row: counting sort of the sources by slot (in their order in `source`).
//  3. (b, slot) tasks: weighted mean of target and sources in a fixed order:
//     deterministic, no atomics. (Adding each block's sources to their slots right after
//     its assignment, to reuse the rows in cache, measured ~15% slower, likely because the
//     [T, D] slot rows then cycle through L2 where one slot row at a time stays in L1.)
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the _mm512_undefined_*() inside its own AVX-512 intrinsics (a false positive)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <torch/library.h>

#include "../bipartite_merge/bf16_screen.h"
#include "../common/cpu_utils.h"
#include "recycle_checks.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "recycle";
constexpr int64_t kRowBlock = 64;       // sources per task when batch rows are split over tasks
constexpr int64_t kScreenMinDim = 128;  // bf16 screening pays off from this feature width
constexpr int64_t kScreenMinCols = 32;  // ... and this many targets
constexpr int64_t kPrefetchLines = 8;   // of the next gathered row (measured: a whole row's worth
                                        // of prefetches stalls on the line fill buffers)

// The first lines of a row about to be read (rows are scattered in x: the hardware
// prefetcher follows a row once it is being read).
template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t nb = std::min<int64_t>(n * static_cast<int64_t>(sizeof(T)), kPrefetchLines * 64);
  for (int64_t off = 0; off < nb; off += 64) __builtin_prefetch(p + off);
}

// First column of row[0:T) whose screened score is >= thr.
inline int64_t first_at_least(const at::BFloat16* row, int64_t T, float thr) {
  for (int64_t c = 0; c < T; ++c)
    if (screen::bf16_value(row, c) >= thr) return c;
  return -1;
}

// Normalised targets of every batch row, their bf16 copies and the largest bf16 rounding
// error per batch row (screening only).
template <typename acc>
struct Targets {
  std::unique_ptr<acc[]> unit;
  std::unique_ptr<at::BFloat16[]> unit16;
  std::vector<float> err;
};

template <typename acc>
Targets<acc> empty_targets(int64_t B, int64_t T, int64_t Df, bool screen) {
  return Targets<acc>{uninitialised<acc>(B * T * Df), uninitialised<at::BFloat16>(screen ? B * T * Df : 0),
                      std::vector<float>(screen ? B : 0)};
}

// The normalised targets of batch row b (and their bf16 copies and error) into tg.
template <typename fscalar_t, typename acc>
void fill_targets(const at::Tensor& feats, const at::Tensor& target, bool screen, const char* name,
                  Targets<acc>& tg, int64_t b) {
  const int64_t T = target.size(1), Df = feats.size(2);
  const int64_t* tp = target.data_ptr<int64_t>();
  const fscalar_t* fp = feats.data_ptr<fscalar_t>();
  float eb = 0;
  for (int64_t c = 0; c < T; ++c) {
    acc* d = tg.unit.get() + (b * T + c) * Df;
    if (c + 1 < T) prefetch_row(fp + b * feats.stride(0) + tp[b * T + c + 1] * feats.stride(1), Df);
    load_row(fp + b * feats.stride(0) + tp[b * T + c] * feats.stride(1), Df, d);
    bool finite;
    const acc iv = inv_norm_checked(d, Df, dot(d, d, Df), finite);
    TORCH_CHECK_VALUE(finite, "tokenreduce.recycle: ", name, " has a non-finite value (NaN or Inf) in batch ",
                      b, ", token ", tp[b * T + c]);
#pragma omp simd
    for (int64_t d2 = 0; d2 < Df; ++d2) d[d2] *= iv;
    if (screen) eb = std::max(eb, screen::to_bf16_scaled(d, Df, 1.0f, tg.unit16.get() + (b * T + c) * Df));
  }
  if (screen) tg.err[b] = eb;
}

// One task's scratch and the assignment of a block of up to `cap` sources of a batch row
// (one GEMM call per block: oneDNN's bf16 GEMM costs ~30 us per call here, so splitting a
// batch row's 448 sources into 128-row tiles measured ~20% slower overall).
template <typename fscalar_t>
struct BlockAssigner {
  using acc = acc_t<fscalar_t>;
  const at::Tensor& feats;
  const Targets<acc>& tg;
  const int64_t T, Df;
  const bool screen;
  const char* name;
  const float fp_err = screen::fp_err(Df);
  std::unique_ptr<acc[]> conv;  // rows converted to acc (features of another dtype)
  std::unique_ptr<acc[]> unit;  // normalised rows, for the float32 GEMM (made when needed)
  std::unique_ptr<at::BFloat16[]> h16, sim16;
  std::vector<const acc*> raw;  // the block's rows in acc, not normalised
  std::vector<acc> inv, sim;
  std::vector<float> err, thr;
  std::vector<int64_t> multi;

  BlockAssigner(const at::Tensor& f, const Targets<acc>& t, int64_t T_, bool scr, const char* nm, int64_t cap)
      : feats(f), tg(t), T(T_), Df(f.size(2)), screen(scr), name(nm),
        conv(uninitialised<acc>(std::is_same_v<fscalar_t, acc> ? 0 : cap * f.size(2))),
        h16(uninitialised<at::BFloat16>(scr ? cap * f.size(2) : 0)), sim16(uninitialised<at::BFloat16>(scr ? cap * T_ : 0)),
        raw(cap), inv(cap), err(scr ? cap : 0),
        thr(scr ? cap : 0) {
    multi.reserve(scr ? cap : 0);
  }

  // slots of the m sources idx[0:m) of batch row b into slot[0:m)
  void run(int64_t b, const int64_t* idx, int64_t m, int64_t* slot) {
    const fscalar_t* fp = feats.data_ptr<fscalar_t>() + b * feats.stride(0);
    for (int64_t e = 0; e < m; ++e) {
      const fscalar_t* xr = fp + idx[e] * feats.stride(1);
      if (e + 1 < m) prefetch_row(fp + idx[e + 1] * feats.stride(1), Df);
      if constexpr (std::is_same_v<fscalar_t, acc>) {
        raw[e] = xr;
      } else {
        load_row(xr, Df, conv.get() + e * Df);
        raw[e] = conv.get() + e * Df;
      }
      bool finite;
      inv[e] = inv_norm_checked(raw[e], Df, dot(raw[e], raw[e], Df), finite);
      TORCH_CHECK_VALUE(finite, "tokenreduce.recycle: ", name, " has a non-finite value (NaN or Inf) in batch ",
                        b, ", token ", idx[e]);
      if (screen) err[e] = screen::to_bf16_scaled(raw[e], Df, static_cast<float>(inv[e]), h16.get() + e * Df);
    }
    const acc* tb = tg.unit.get() + b * T * Df;
    if (screen) {
      gemm_abt(h16.get(), Df, tg.unit16.get() + b * T * Df, Df, sim16.get(), T, m, T, Df);
      // a lone candidate is the float32 maximum (the bound is rigorous); the sources with
      // several are rescored in float32 (their rows prefetched one ahead) unless that costs
      // more than the float32 GEMM
      int64_t cand = 0;
      multi.clear();
      for (int64_t e = 0; e < m; ++e) {
        const at::BFloat16* sh = sim16.get() + e * T;
        const float mx = screen::bf16_max(sh, 0, T);
        thr[e] = mx - screen::screen_margin(mx, err[e], tg.err[b], fp_err);
        const int64_t n = screen::bf16_count_at_least(sh, 0, T, thr[e]);
        if (n == 1) {
          slot[e] = first_at_least(sh, T, thr[e]);
        } else {
          multi.push_back(e);
          cand += n;
        }
      }
      if (cand * 8 <= m * T) {
        for (size_t j = 0; j < multi.size(); ++j) {
          const int64_t e = multi[j];
          if (j + 1 < multi.size()) prefetch_row(raw[multi[j + 1]], Df);
          const at::BFloat16* sh = sim16.get() + e * T;
          ArgMax<acc> am;  // the raw row: the source's norm scales all its scores alike
          for (int64_t c = 0; c < T; ++c)
            if (screen::bf16_value(sh, c) >= thr[e]) am.push(dot(raw[e], tb + c * Df, Df), c);
          slot[e] = am.index;
        }
        return;
      }
      // near-duplicate tokens everywhere: the float32 GEMM is cheaper than rescoring
    }
    if (!unit) unit = uninitialised<acc>(static_cast<int64_t>(raw.size()) * Df);
    for (int64_t e = 0; e < m; ++e) load_row_scaled(raw[e], Df, inv[e], unit.get() + e * Df);
    sim.resize(m * T);
    gemm_abt(unit.get(), Df, tb, Df, sim.data(), T, m, T, Df);
    for (int64_t e = 0; e < m; ++e) {
      ArgMax<acc> am;
      for (int64_t c = 0; c < T; ++c) am.push(sim[e * T + c], c);
      slot[e] = am.index;
    }
  }
};

// bf16 screening: float features only (double keeps the plain float64 GEMM), wide enough rows
// against enough targets, on a machine where the bf16 GEMM is the faster (screen::screen_pays)
template <typename fscalar_t>
bool use_screen(int64_t Df, int64_t T) {
  return std::is_same_v<acc_t<fscalar_t>, float> && Df >= kScreenMinDim && T >= kScreenMinCols &&
         screen::screen_pays();
}

// Slots of every source by similarity, in (b, block of sources) tasks (fewer batch rows than
// 2 x threads; the per-row path below takes the others).
template <typename fscalar_t>
void assign_by_similarity(const at::Tensor& feats, const at::Tensor& target, const at::Tensor& source,
                          at::Tensor& slot, const char* name) {
  using acc = acc_t<fscalar_t>;
  const int64_t B = target.size(0), T = target.size(1), S = source.size(1), Df = feats.size(2);
  const bool screen = use_screen<fscalar_t>(Df, T);
  Targets<acc> tg = empty_targets<acc>(B, T, Df, screen);
  parallel_for_cost(B, T * Df, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fill_targets<fscalar_t, acc>(feats, target, screen, name, tg, b);
  });
  const int64_t* sp = source.data_ptr<int64_t>();
  int64_t* slp = slot.data_ptr<int64_t>();
  const int64_t nblk = (S + kRowBlock - 1) / kRowBlock;
  parallel_for_cost(B * nblk, kRowBlock * T * Df, [&](int64_t t0, int64_t t1) {
    BlockAssigner<fscalar_t> as(feats, tg, T, screen, name, kRowBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nblk, s0 = (t % nblk) * kRowBlock;
      as.run(b, sp + b * S + s0, std::min(kRowBlock, S - s0), slp + b * S + s0);
    }
  });
}

// 2. the sources of batch row b grouped by slot (counting sort, in their order in `source`):
// off [T + 1], mem [S]; cnt: scratch of T + 1
inline void group_row(const int64_t* sl, const int64_t* sp, int64_t T, int64_t S, int64_t* off, int64_t* mem,
                      std::vector<int64_t>& cnt) {
  cnt.assign(T + 1, 0);
  for (int64_t e = 0; e < S; ++e)
    if (sl[e] >= 0) ++cnt[sl[e] + 1];
  off[0] = 0;
  for (int64_t c = 0; c < T; ++c) off[c + 1] = off[c] + cnt[c + 1];
  for (int64_t c = 0; c < T; ++c) cnt[c] = off[c];
  for (int64_t e = 0; e < S; ++e)
    if (sl[e] >= 0) mem[cnt[sl[e]]++] = sp[e];
}

// 3. the weighted means of batch row b's slots, one slot at a time, members in a fixed order
// (the target first when included, then the sources in `source` order): deterministic, no
// atomics. The row is summed in chunks of kMeanChunk values that stay in registers while every
// member's chunk is added (one load per value and member; a whole-row sum in L1 also loads and
// stores the sum for every member): 3-6 % of the op at the bench shape (B=8 N=576 D=1024 T=64
// S=448), `tokenreduce bench --op recycle`, builds alternated.
// Each value is summed over the members in the same order as a whole-row sum would.
template <typename scalar_t>
struct SlotMeans {
  using acc = acc_t<scalar_t>;
  static constexpr int64_t kMeanChunk = 1024 / static_cast<int64_t>(sizeof(acc));  // 16 zmm of floats
  const at::Tensor& x;
  const int64_t* tp;
  const acc* wp;
  const bool include_target;
  scalar_t* op;
  int64_t* cp;
  acc* wsp;
  std::vector<const scalar_t*> rows;  // the slot's member rows, in order
  std::vector<acc> ws;                // and their weights

  SlotMeans(const at::Tensor& x_, const at::Tensor& target, const at::Tensor& weight, bool inc, at::Tensor& out,
            at::Tensor& count, at::Tensor& wsum)
      : x(x_), tp(target.data_ptr<int64_t>()), wp(weight.defined() ? weight.data_ptr<acc>() : nullptr),
        include_target(inc), op(out.data_ptr<scalar_t>()), cp(count.data_ptr<int64_t>()),
        wsp(wsum.data_ptr<acc>()) {}

  // slot c of batch row b (flat slot t = b * T + c), members mem[off[c]:off[c + 1])
  void run(int64_t b, int64_t t, const int64_t* off, int64_t c, const int64_t* mem) {
    const int64_t N = x.size(1), D = x.size(2);
    const scalar_t* xb = x.data_ptr<scalar_t>() + b * x.stride(0);
    rows.clear();
    ws.clear();
    acc total = 0;
    auto member = [&](int64_t i) {
      const acc w = wp ? wp[b * N + i] : acc(1);
      rows.push_back(xb + i * x.stride(1));
      ws.push_back(w);
      total += w;
    };
    if (include_target) member(tp[t]);
    for (int64_t e = off[c]; e < off[c + 1]; ++e) member(mem[e]);
    cp[t] = (off[c + 1] - off[c]) + (include_target ? 1 : 0);
    wsp[t] = total;
    const acc inv = total != acc(0) ? acc(1) / total : acc(0);  // empty or zero-weight slot -> 0
    scalar_t* o = op + t * D;
    const int64_t m = static_cast<int64_t>(rows.size());
    for (int64_t d0 = 0; d0 < D; d0 += kMeanChunk) {
      const int64_t n = std::min(kMeanChunk, D - d0);
      acc sum[kMeanChunk];
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) sum[d] = acc(0);
      for (int64_t e = 0; e < m; ++e) {
        const scalar_t* xr = rows[e] + d0;
        const acc w = ws[e];
#pragma omp simd
        for (int64_t d = 0; d < n; ++d) sum[d] += w * static_cast<acc>(xr[d]);
      }
#pragma omp simd
      for (int64_t d = 0; d < n; ++d) o[d0 + d] = static_cast<scalar_t>(sum[d] * inv);
    }
  }
};

// Steps 2 and 3 over all batch rows (the slots known: `assign`, or the (b, block) assignment).
template <typename scalar_t>
void aggregate(const at::Tensor& x, const at::Tensor& target, const at::Tensor& source,
               const at::Tensor& weight, const at::Tensor& slot, bool include_target, at::Tensor& out,
               at::Tensor& count, at::Tensor& wsum) {
  const int64_t B = x.size(0), D = x.size(2), T = target.size(1), S = source.size(1);
  const int64_t* sp = source.data_ptr<int64_t>();
  const int64_t* slp = slot.data_ptr<int64_t>();
  std::vector<int64_t> offsets(B * (T + 1)), members(std::max<int64_t>(B * S, 1));
  parallel_for_cost(B, 4 * S, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cnt;
    for (int64_t b = b0; b < b1; ++b)
      group_row(slp + b * S, sp + b * S, T, S, offsets.data() + b * (T + 1), members.data() + b * S, cnt);
  });
  parallel_for_cost(B * T, 2 * D * (S + T) / std::max<int64_t>(T, 1), [&](int64_t t0, int64_t t1) {
    SlotMeans<scalar_t> means(x, target, weight, include_target, out, count, wsum);
    for (int64_t t = t0; t < t1; ++t)
      means.run(t / T, t, offsets.data() + (t / T) * (T + 1), t % T, members.data() + (t / T) * S);
  });
}

// The whole op for B >= 2 x threads: one task per batch row runs targets, assignment, grouping
// and means back to back (one parallel region: no barrier between the steps, the row's tokens
// still in cache for its means). x and the features share the dtype scalar_t.
template <typename scalar_t>
void recycle_by_rows(const at::Tensor& x, const at::Tensor& feats, const at::Tensor& target,
                     const at::Tensor& source, const at::Tensor& weight, bool include_target, at::Tensor& slot,
                     at::Tensor& out, at::Tensor& count, at::Tensor& wsum, const char* name) {
  using acc = acc_t<scalar_t>;
  const int64_t B = x.size(0), D = x.size(2), T = target.size(1), S = source.size(1), Df = feats.size(2);
  const bool screen = use_screen<scalar_t>(Df, T);
  Targets<acc> tg = empty_targets<acc>(B, T, Df, screen);
  const int64_t* sp = source.data_ptr<int64_t>();
  int64_t* slp = slot.data_ptr<int64_t>();
  parallel_for_cost(B, (S + T) * (T * Df + D), [&](int64_t b0, int64_t b1) {
    BlockAssigner<scalar_t> as(feats, tg, T, screen, name, std::max<int64_t>(S, 1));
    SlotMeans<scalar_t> means(x, target, weight, include_target, out, count, wsum);
    std::vector<int64_t> off(T + 1), mem(std::max<int64_t>(S, 1)), cnt;
    for (int64_t b = b0; b < b1; ++b) {
      fill_targets<scalar_t, acc>(feats, target, screen, name, tg, b);
      if (S > 0) as.run(b, sp + b * S, S, slp + b * S);
      group_row(slp + b * S, sp + b * S, T, S, off.data(), mem.data(), cnt);
      for (int64_t c = 0; c < T; ++c) means.run(b, b * T + c, off.data(), c, mem.data());
    }
  });
}

// the smallest and largest value of idx (one pass: at::aminmax)
std::pair<int64_t, int64_t> value_range(const at::Tensor& idx) {
  const auto mm = at::aminmax(idx);
  return {std::get<0>(mm).item<int64_t>(), std::get<1>(mm).item<int64_t>()};
}

void check_positions(const char* name, const at::Tensor& idx, int64_t N) {
  if (idx.numel() == 0) return;
  const auto [lo, hi] = value_range(idx);
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
  const at::Tensor x = last_dim_contiguous(x_in);
  at::Tensor out = at::empty({B, T, D}, x.options());
  at::Tensor count = at::empty({B, T}, x.options().dtype(at::kLong));
  at::Tensor wsum = at::empty({B, T}, x.options().dtype(acc_dtype));
  at::Tensor slot;
  if (assign_in.has_value()) {
    slot = assign_in->contiguous().clone();
    if (slot.numel() > 0) {
      const auto [lo, hi] = value_range(slot);
      TORCH_CHECK_INDEX(lo >= -1 && hi < T, "tokenreduce.recycle: assign holds slots in [", lo, ", ",
                        hi, "], outside [-1, T=", T, ")");
    }
  } else {
    const at::Tensor feats = features_in.has_value() ? last_dim_contiguous(*features_in) : x;
    const char* name = features_in.has_value() ? "features" : "x";
    slot = at::empty({B, S}, x_in.options().dtype(at::kLong));
    if (B >= 2 * at::get_num_threads() && feats.scalar_type() == x.scalar_type() && B * T > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "recycle_by_rows", [&] {
        recycle_by_rows<scalar_t>(x, feats, target, source, weight, include_target, slot, out, count, wsum, name);
      });
      return {out, count, slot, wsum};
    }
    if (B * S > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "recycle_assign", [&] {
        assign_by_similarity<scalar_t>(feats, target, source, slot, name);
      });
    }
  }
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

// C++ tests of the tokenreduce op library (libtokenreduce_ops), without Python.
//
// Every op is called through the dispatcher by its schema name, exactly as a
// TorchScript / AOTInductor consumer reaches it, and checked against a plain ATen
// (or plain loop) reference written here. Run by ctest; prints "N passed, N failed"
// and exits non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

using at::Tensor;
using OptT = std::optional<Tensor>;

// ---------------------------------------------------------------- tiny harness ----

namespace {

int g_checks_failed_in_case = 0;
std::vector<std::string> g_failures;

void fail(const std::string& what) {
  ++g_checks_failed_in_case;
  if (g_checks_failed_in_case <= 10) std::printf("    check failed: %s\n", what.c_str());
}

#define EXPECT(cond)                                                              \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::ostringstream os_;                                                     \
      os_ << __FILE__ << ":" << __LINE__ << ": " << #cond;                        \
      fail(os_.str());                                                            \
    }                                                                             \
  } while (0)

#define EXPECT_MSG(cond, msg)                                                     \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::ostringstream os_;                                                     \
      os_ << __FILE__ << ":" << __LINE__ << ": " << #cond << " -- " << msg;       \
      fail(os_.str());                                                            \
    }                                                                             \
  } while (0)

// allclose in double, reporting the worst element.
void expect_close(const Tensor& got, const Tensor& want, double atol, double rtol,
                  const std::string& what) {
  if (got.sizes() != want.sizes()) {
    std::ostringstream os;
    os << what << ": shape " << got.sizes() << " != expected " << want.sizes();
    fail(os.str());
    return;
  }
  if (got.numel() == 0) return;
  const Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  const Tensor err = (g - w).abs() - (atol + rtol * w.abs());
  const double worst = err.max().item<double>();
  if (!(worst <= 0.0)) {  // also catches NaN
    std::ostringstream os;
    os << what << ": max |got - want| = " << (g - w).abs().max().item<double>()
       << " exceeds atol " << atol << " + rtol " << rtol << " * |want|";
    fail(os.str());
  }
}

// The first (up to 24) values of t on one line.
std::string brief(const Tensor& t) {
  const Tensor f = t.flatten().to(at::kDouble);
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < std::min<int64_t>(f.numel(), 24); ++i)
    os << (i ? ", " : "") << f[i].item<double>();
  os << (f.numel() > 24 ? ", ...]" : "]");
  return os.str();
}

void expect_equal(const Tensor& got, const Tensor& want, const std::string& what) {
  if (got.sizes() != want.sizes() || got.scalar_type() != want.scalar_type() ||
      !at::equal(got, want)) {
    std::ostringstream os;
    os << what << ": got " << got.scalar_type() << got.sizes() << " " << brief(got) << ", want "
       << want.scalar_type() << want.sizes() << " " << brief(want);
    fail(os.str());
  }
}

struct Case {
  const char* name;
  std::function<void()> fn;
};

std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

#define TEST_CASE(name)                              \
  void name();                                       \
  const Register register_##name(#name, &name);      \
  void name()

// ------------------------------------------------------------- ops by schema ----

using AttentionFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double,
                                               bool, const OptT&, const OptT&);
using KcenterFn = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, c10::string_view, int64_t,
                                             const OptT&, bool, const OptT&);
using MergeFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, int64_t, const OptT&, const OptT&,
                                                   int64_t, c10::string_view);
using DppSelectFn = std::tuple<Tensor, Tensor>(const Tensor&, int64_t, const OptT&, const OptT&);
using RecycleFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                             const Tensor&, const OptT&, const OptT&,
                                                             const OptT&, c10::string_view, bool);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

std::tuple<Tensor, Tensor> attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                     bool causal, const OptT& bias = std::nullopt,
                                     const OptT& rows = std::nullopt) {
  static auto h = op<AttentionFn>("tokenreduce::attention_with_scores");
  return h.call(q, k, v, scale, causal, bias, rows);
}

std::tuple<Tensor, Tensor> kcenter(const Tensor& x, int64_t k, const std::string& metric,
                                   int64_t first = 0, const OptT& first_index = std::nullopt,
                                   bool isolated = false, const OptT& mask = std::nullopt) {
  static auto h = op<KcenterFn>("tokenreduce::kcenter");
  return h.call(x, k, metric, first, first_index, isolated, mask);
}

std::tuple<Tensor, Tensor> dpp_select(const Tensor& x, int64_t k, const OptT& relevance = std::nullopt,
                                      const OptT& mask = std::nullopt) {
  static auto h = op<DppSelectFn>("tokenreduce::dpp_select");
  return h.call(x, k, relevance, mask);
}

std::tuple<Tensor, Tensor, Tensor> bipartite_merge(const Tensor& x, int64_t r,
                                                   const OptT& metric = std::nullopt,
                                                   const OptT& size = std::nullopt,
                                                   int64_t protect = 0,
                                                   const std::string& order = "tome") {
  static auto h = op<MergeFn>("tokenreduce::bipartite_merge");
  return h.call(x, r, metric, size, protect, order);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> recycle(const Tensor& x, const Tensor& target,
                                                   const Tensor& source,
                                                   const OptT& weight = std::nullopt,
                                                   const OptT& assign = std::nullopt,
                                                   const OptT& features = std::nullopt,
                                                   bool include_target = true) {
  static auto h = op<RecycleFn>("tokenreduce::recycle");
  return h.call(x, target, source, weight, assign, features, "cosine", include_target);
}

// Runs fn, expects a c10::Error whose message contains every needle.
template <typename F>
void expect_error(F&& fn, std::initializer_list<const char*> needles, const std::string& what) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const char* n : needles)
      EXPECT_MSG(msg.find(n) != std::string::npos,
                 what << ": message lacks \"" << n << "\": " << msg);
    return;
  } catch (const std::exception& e) {
    fail(what + ": threw a non-c10 exception: " + e.what());
    return;
  }
  fail(what + ": did not throw");
}

// ------------------------------------------------------------------ references ----

// Softmax attention in double, with GQA, bottom-right causal mask and key bias.
// Returns out [B, H, Nq, Dv] and the probabilities [B, H, Nq, Nk] (rows with no
// admissible key are zero).
std::pair<Tensor, Tensor> attention_ref(const Tensor& q, const Tensor& k, const Tensor& v,
                                        double scale, bool causal, const OptT& bias) {
  const int64_t H = q.size(1), Hkv = k.size(1), Nq = q.size(2), Nk = k.size(2);
  Tensor qd = q.to(at::kDouble);
  Tensor kd = k.to(at::kDouble).repeat_interleave(H / Hkv, 1);
  Tensor vd = v.to(at::kDouble).repeat_interleave(H / Hkv, 1);
  Tensor s = at::matmul(qd, kd.transpose(-1, -2)) * scale;
  if (bias) s = s + bias->to(at::kDouble).unsqueeze(1).unsqueeze(1);
  if (causal) {
    // row i sees key j iff j <= i + (Nk - Nq)
    Tensor i = at::arange(Nq, at::kLong).unsqueeze(1);
    Tensor j = at::arange(Nk, at::kLong).unsqueeze(0);
    Tensor hidden = j > (i + (Nk - Nq));
    s = s.masked_fill(hidden, -std::numeric_limits<double>::infinity());
  }
  Tensor p = at::softmax(s, -1);
  p = at::nan_to_num(p, 0.0);  // fully masked rows -> 0
  return {at::matmul(p, vd), p};
}

// Pairwise distances [N, N] in double.
Tensor distances(const Tensor& x2d, bool cosine) {
  Tensor xd = x2d.to(at::kDouble);
  if (cosine) {
    Tensor n = xd / xd.norm(2, -1, true).clamp_min(1e-12);
    return 1.0 - at::matmul(n, n.t());
  }
  return at::cdist(xd, xd);
}

// Greedy max-min selection for one batch row; returns index [k] and mindist [N].
std::pair<std::vector<int64_t>, std::vector<double>> kcenter_ref(const Tensor& x2d, int64_t k,
                                                                 bool cosine, int64_t first,
                                                                 bool isolated,
                                                                 const std::vector<bool>& elig_in) {
  const int64_t N = x2d.size(0);
  const Tensor dist = distances(x2d, cosine).contiguous();
  auto d = dist.accessor<double, 2>();
  std::vector<bool> elig = elig_in;
  int64_t pick = first;
  if (isolated) {  // the eligible token whose nearest other token is farthest
    double best = -1;
    for (int64_t i = 0; i < N; ++i) {
      if (!elig[i]) continue;
      double nn = std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < N; ++j)
        if (j != i) nn = std::min(nn, d[i][j]);
      if (N == 1) nn = 0;
      if (nn > best) best = nn, pick = i;
    }
  }
  std::vector<int64_t> idx;
  std::vector<double> md(N, std::numeric_limits<double>::infinity());
  for (int64_t it = 0; it < k; ++it) {
    idx.push_back(pick);
    elig[pick] = false;
    for (int64_t j = 0; j < N; ++j) md[j] = std::min(md[j], d[pick][j]);
    int64_t next = -1;
    for (int64_t j = 0; j < N; ++j)
      if (elig[j] && (next < 0 || md[j] > md[next])) next = j;
    pick = next;
  }
  for (int64_t i : idx) md[i] = 0;
  return {idx, md};
}

// Size-weighted mean of the rows of x [B, N, D] grouped by slot [B, N] (values in
// [0, T) or -1 = left out), plus the weight sums [B, T] and member counts [B, T].
std::tuple<Tensor, Tensor, Tensor> grouped_mean(const Tensor& x, const Tensor& slot, const Tensor& w,
                                                int64_t T) {
  const int64_t B = x.size(0), D = x.size(2);
  Tensor xd = x.to(at::kDouble), wd = w.to(at::kDouble);
  Tensor keep = slot >= 0;
  Tensor s = slot.clamp_min(0);
  Tensor wk = wd * keep.to(at::kDouble);
  Tensor num = at::zeros({B, T, D}, at::kDouble).scatter_add(1, s.unsqueeze(-1).expand({B, s.size(1), D}),
                                                             xd * wk.unsqueeze(-1));
  Tensor den = at::zeros({B, T}, at::kDouble).scatter_add(1, s, wk);
  Tensor cnt = at::zeros({B, T}, at::kLong).scatter_add(1, s, keep.to(at::kLong));
  Tensor mean = at::where(den.unsqueeze(-1) != 0, num / den.unsqueeze(-1), at::zeros_like(num));
  return {mean, den, cnt};
}

// ----------------------------------------------------------------------- tests ----

TEST_CASE(ops_are_registered) {
  auto& d = c10::Dispatcher::singleton();
  for (const char* name : {"tokenreduce::attention_with_scores", "tokenreduce::kcenter",
                           "tokenreduce::bipartite_merge", "tokenreduce::recycle",
                           "tokenreduce::dpp_select"}) {
    auto h = d.findSchema({name, ""});
    EXPECT_MSG(h.has_value(), name << " has no schema (library not loaded?)");
    if (h) EXPECT_MSG(h->hasKernelForDispatchKey(c10::DispatchKey::CPU), name << " has no CPU kernel");
  }
}

TEST_CASE(attention_matches_softmax_reference) {
  at::manual_seed(0);
  const int64_t B = 2, H = 3, Nq = 7, Nk = 11, Dh = 8, Dv = 5;
  const double scale = 1.0 / std::sqrt(double(Dh));
  Tensor q = at::randn({B, H, Nq, Dh}), k = at::randn({B, H, Nk, Dh}), v = at::randn({B, H, Nk, Dv});
  auto [out, scores] = attention(q, k, v, scale, false);
  auto [out_ref, p] = attention_ref(q, k, v, scale, false, std::nullopt);
  EXPECT(out.scalar_type() == at::kFloat);
  EXPECT(scores.scalar_type() == at::kFloat);
  expect_close(out, out_ref, 1e-5, 1e-4, "out");
  expect_close(scores, p.mean({1, 2}), 1e-6, 1e-4, "scores = head/row mean of softmax");
  expect_close(scores.sum(-1), at::ones({B}), 1e-5, 0, "scores sum to 1");
}

TEST_CASE(attention_gqa_causal_bias_score_rows) {
  at::manual_seed(1);
  const int64_t B = 2, H = 4, Hkv = 2, Nq = 6, Nk = 9, Dh = 16, Dv = 8;
  const double scale = 0.3;
  Tensor q = at::randn({B, H, Nq, Dh}), k = at::randn({B, Hkv, Nk, Dh}),
         v = at::randn({B, Hkv, Nk, Dv}), bias = at::randn({B, Nk});
  Tensor rows = at::tensor(std::vector<int64_t>{0, -1, 3, 3}, at::kLong);  // -1 = last; 3 twice
  auto [out, scores] = attention(q, k, v, scale, true, bias, rows);
  auto [out_ref, p] = attention_ref(q, k, v, scale, true, bias);
  expect_close(out, out_ref, 1e-5, 1e-4, "out (gqa, causal, bias)");
  Tensor scores_ref = (p.select(2, 0) + p.select(2, Nq - 1) + 2 * p.select(2, 3)).mean(1) / 4.0;
  expect_close(scores, scores_ref, 1e-6, 1e-4, "scores over score_rows");
}

TEST_CASE(attention_float64_and_non_contiguous) {
  at::manual_seed(2);
  const int64_t B = 1, H = 2, Nq = 5, Nk = 5, Dh = 4;
  // [B, N, H, D] layout viewed as [B, H, N, D]: strided heads
  Tensor q = at::randn({B, Nq, H, Dh}, at::kDouble).transpose(1, 2);
  Tensor k = at::randn({B, Nk, H, Dh}, at::kDouble).transpose(1, 2);
  Tensor v = at::randn({B, Nk, H, Dh}, at::kDouble).transpose(1, 2);
  auto [out, scores] = attention(q, k, v, 0.5, true);
  auto [out_ref, p] = attention_ref(q, k, v, 0.5, true, std::nullopt);
  EXPECT(out.scalar_type() == at::kDouble);
  EXPECT(scores.scalar_type() == at::kDouble);
  expect_close(out, out_ref, 1e-10, 1e-9, "out float64");
  expect_close(scores, p.mean({1, 2}), 1e-12, 1e-9, "scores float64");
}

TEST_CASE(attention_long_keys_two_pass) {
  at::manual_seed(3);
  // Nk above the single-pass limit (4096 keys) takes the online-softmax path.
  const int64_t B = 1, H = 2, Nq = 3, Nk = 5000, Dh = 8, Dv = 4;
  Tensor q = at::randn({B, H, Nq, Dh}), k = at::randn({B, H, Nk, Dh}), v = at::randn({B, H, Nk, Dv});
  Tensor bias = at::randn({B, Nk});
  auto [out, scores] = attention(q, k, v, 0.35, false, bias);
  auto [out_ref, p] = attention_ref(q, k, v, 0.35, false, bias);
  expect_close(out, out_ref, 1e-5, 1e-4, "out (two-pass)");
  expect_close(scores, p.mean({1, 2}), 1e-7, 1e-3, "scores (two-pass)");
}

TEST_CASE(kcenter_matches_greedy_loop) {
  at::manual_seed(4);
  const int64_t B = 3, N = 40, D = 6, K = 9;
  for (const char* metric : {"cosine", "l2"}) {
    for (auto dtype : {at::kFloat, at::kDouble}) {
      Tensor x = at::randn({B, N, D}, dtype);
      Tensor first = at::tensor(std::vector<int64_t>{0, 17, -1}, at::kLong);
      for (int variant = 0; variant < 3; ++variant) {
        const bool isolated = variant == 2;
        Tensor index, mindist;
        if (variant == 0)
          std::tie(index, mindist) = kcenter(x, K, metric, 5);  // int first
        else
          std::tie(index, mindist) = kcenter(x, K, metric, 0, first, isolated);
        EXPECT(index.scalar_type() == at::kLong);
        EXPECT(index.sizes() == at::IntArrayRef({B, K}));
        EXPECT(mindist.sizes() == at::IntArrayRef({B, N}));
        for (int64_t b = 0; b < B; ++b) {
          int64_t f = variant == 0 ? 5 : first[b].item<int64_t>();
          if (f < 0) f += N;
          auto [idx_ref, md_ref] =
              kcenter_ref(x[b], K, std::string(metric) == "cosine", f, isolated, std::vector<bool>(N, true));
          const std::string tag = std::string(metric) + " " + c10::toString(dtype) + " variant " +
                                  std::to_string(variant) + " batch " + std::to_string(b);
          expect_equal(index[b], at::tensor(idx_ref, at::kLong), "index " + tag);
          expect_close(mindist[b], at::tensor(md_ref, at::kDouble), 1e-5, 1e-4, "mindist " + tag);
        }
      }
    }
  }
}

TEST_CASE(kcenter_mask) {
  at::manual_seed(5);
  const int64_t B = 2, N = 24, D = 5, K = 6;
  Tensor x = at::randn({B, N, D});
  Tensor mask = at::rand({B, N}) > 0.4;
  mask.select(1, 2).fill_(true);  // the first pick must be eligible
  const int64_t need = std::min(mask.sum(1).min().item<int64_t>(), K);
  auto [index, mindist] = kcenter(x, need, "cosine", 2, std::nullopt, false, mask);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<bool> elig(N);
    for (int64_t n = 0; n < N; ++n) elig[n] = mask[b][n].item<bool>();
    auto [idx_ref, md_ref] = kcenter_ref(x[b], need, true, 2, false, elig);
    expect_equal(index[b], at::tensor(idx_ref, at::kLong), "masked index batch " + std::to_string(b));
    EXPECT(mask[b].index_select(0, index[b]).all().item<bool>());
  }
  // isolated start restricted to eligible tokens
  auto [index2, md2] = kcenter(x, need, "l2", 0, std::nullopt, true, mask);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<bool> elig(N);
    for (int64_t n = 0; n < N; ++n) elig[n] = mask[b][n].item<bool>();
    auto [idx_ref, md_ref] = kcenter_ref(x[b], need, false, 0, true, elig);
    expect_equal(index2[b], at::tensor(idx_ref, at::kLong), "masked isolated index batch " + std::to_string(b));
  }
}

TEST_CASE(kcenter_bad_arguments_throw) {
  Tensor x = at::randn({2, 8, 4});
  expect_error([&] { kcenter(x, 9, "cosine"); }, {"tokenreduce.kcenter", "k=9"}, "k > N");
  expect_error([&] { kcenter(x, 3, "manhattan"); }, {"tokenreduce.kcenter", "metric"}, "bad metric");
  expect_error([&] { kcenter(x, 3, "l2", 8); }, {"tokenreduce.kcenter", "first=8"}, "first out of range");
  expect_error([&] { kcenter(x.select(2, 0), 3, "l2"); }, {"tokenreduce.kcenter", "[B, N, D]"}, "2-D x");
  Tensor mask = at::zeros({2, 8}, at::kBool);
  mask.slice(1, 0, 2).fill_(true);
  expect_error([&] { kcenter(x, 3, "l2", 0, std::nullopt, false, mask); },
               {"tokenreduce.kcenter", "eligible"}, "k > eligible tokens");
  // the value errors are c10::ValueError (Python ValueError)
  bool value_error = false;
  try {
    kcenter(x, 9, "cosine");
  } catch (const c10::ValueError&) {
    value_error = true;
  } catch (...) {
  }
  EXPECT(value_error);
}

// Checks one bipartite_merge result against the grouping it reports and, for ToMe's
// order without protection, against a reference bipartite matching.
void check_merge(const Tensor& x, int64_t r, const OptT& metric, const OptT& size_in,
                 const std::string& order, double atol, const std::string& tag) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), No = N - r;
  auto [merged, size, source] = bipartite_merge(x, r, metric, size_in, 0, order);
  EXPECT_MSG(merged.sizes() == at::IntArrayRef({B, No, D}), tag);
  EXPECT_MSG(size.sizes() == at::IntArrayRef({B, No}), tag);
  EXPECT_MSG(source.sizes() == at::IntArrayRef({B, N}) && source.scalar_type() == at::kLong, tag);
  EXPECT_MSG(merged.scalar_type() == x.scalar_type(), tag);
  EXPECT_MSG(source.min().item<int64_t>() >= 0 && source.max().item<int64_t>() < No, tag);
  Tensor w = size_in ? *size_in : at::ones({B, N});
  // every slot is used, sizes add up, merged rows are the size-weighted means
  auto [mean_ref, den_ref, cnt_ref] = grouped_mean(x, source, w, No);
  EXPECT_MSG((cnt_ref > 0).all().item<bool>(), tag << ": an output slot has no member");
  expect_close(size.sum(-1), w.to(at::kDouble).sum(-1), 1e-4, 1e-6, "size sums to N " + tag);
  expect_close(size, den_ref, 1e-5, 1e-6, "size per slot " + tag);
  expect_close(merged, mean_ref, atol, atol, "merged rows " + tag);
  if (!size_in) expect_close(size.sum(-1), at::full({B}, double(N), at::kDouble), 0, 0, "size == N " + tag);

  // reference matching: A = even tokens, B = odd tokens, cosine of the metric
  const Tensor m = (metric ? *metric : x).to(at::kDouble);
  const int64_t Na = (N + 1) / 2, Nb = N / 2;
  for (int64_t b = 0; b < B; ++b) {
    Tensor a = m[b].slice(0, 0, N, 2), bb = m[b].slice(0, 1, N, 2);
    a = a / a.norm(2, -1, true).clamp_min(1e-12);
    bb = bb / bb.norm(2, -1, true).clamp_min(1e-12);
    auto [best, partner] = at::matmul(a, bb.t()).max(-1);
    std::vector<int64_t> rank(Na);
    std::iota(rank.begin(), rank.end(), 0);
    std::vector<double> bv(Na);
    for (int64_t i = 0; i < Na; ++i) bv[i] = best[i].item<double>();
    std::stable_sort(rank.begin(), rank.end(), [&](int64_t i, int64_t j) { return bv[i] > bv[j]; });
    const Tensor src = source[b];
    for (int64_t e = 0; e < Na; ++e) {
      const int64_t ai = rank[e];
      const int64_t sa = src[2 * ai].item<int64_t>();
      if (e < r) {  // merged into its best B partner
        const int64_t sb = src[2 * partner[ai].item<int64_t>() + 1].item<int64_t>();
        EXPECT_MSG(sa == sb, tag << ": A token " << 2 * ai << " not merged into its partner");
      } else {  // alone in its slot
        EXPECT_MSG((src == sa).sum().item<int64_t>() == 1, tag << ": kept A token " << 2 * ai << " shares a slot");
        if (order == "tome") EXPECT_MSG(sa == e - r, tag << ": ToMe slot of A token " << 2 * ai);
      }
    }
    for (int64_t c = 0; c < Nb; ++c) {
      const int64_t sb = src[2 * c + 1].item<int64_t>();
      if (order == "tome") EXPECT_MSG(sb == Na - r + c, tag << ": ToMe slot of B token " << 2 * c + 1);
    }
    if (order == "spatial") {
      // every slot has one token that stays (a kept A token or a B token); slots
      // follow the positions of those tokens
      std::vector<bool> gone(N, false);
      for (int64_t e = 0; e < r; ++e) gone[2 * rank[e]] = true;
      int64_t next = 0;
      for (int64_t i = 0; i < N; ++i) {
        if (gone[i]) continue;
        EXPECT_MSG(src[i].item<int64_t>() == next, tag << ": spatial slot of token " << i);
        ++next;
      }
      EXPECT_MSG(next == No, tag << ": " << next << " staying tokens for " << No << " slots");
    }
  }
}

TEST_CASE(bipartite_merge_grouping_and_means) {
  at::manual_seed(6);
  Tensor x = at::randn({2, 16, 8});
  check_merge(x, 5, std::nullopt, std::nullopt, "tome", 1e-5, "tome r=5");
  check_merge(x, 8, std::nullopt, std::nullopt, "tome", 1e-5, "tome r=N/2");
  check_merge(x, 4, std::nullopt, std::nullopt, "spatial", 1e-5, "spatial r=4");
  Tensor x_odd = at::randn({3, 15, 4}, at::kDouble);
  check_merge(x_odd, 6, std::nullopt, std::nullopt, "tome", 1e-12, "odd N float64");
}

TEST_CASE(bipartite_merge_metric_and_size) {
  at::manual_seed(7);
  Tensor x = at::randn({2, 20, 6});
  Tensor metric = at::randn({2, 20, 3});
  Tensor size = at::rand({2, 20}) * 3 + 0.5;
  check_merge(x, 7, metric, size, "tome", 1e-5, "metric+size tome");
  check_merge(x, 7, metric, size, "spatial", 1e-5, "metric+size spatial");
  Tensor xh = x.to(at::kBFloat16);
  check_merge(xh, 3, metric, std::nullopt, "tome", 2e-2, "bfloat16 x");
}

TEST_CASE(bipartite_merge_r0_and_errors) {
  Tensor x = at::randn({1, 6, 3});
  auto [merged, size, source] = bipartite_merge(x, 0);
  expect_equal(merged, x, "r=0 merged");
  expect_equal(source, at::arange(6, at::kLong).unsqueeze(0), "r=0 source");
  expect_error([&] { bipartite_merge(x, 4); }, {"tokenreduce.bipartite_merge", "r=4"}, "r > N/2");
  expect_error([&] { bipartite_merge(x, 1, std::nullopt, std::nullopt, 0, "random"); },
               {"tokenreduce.bipartite_merge", "order"}, "bad order");
}

// Reference slot: the target with the highest cosine similarity (first on ties).
Tensor recycle_slot_ref(const Tensor& f, const Tensor& target, const Tensor& source) {
  const int64_t B = f.size(0);
  std::vector<Tensor> slots;
  for (int64_t b = 0; b < B; ++b) {
    Tensor fd = f[b].to(at::kDouble);
    fd = fd / fd.norm(2, -1, true).clamp_min(1e-12);
    Tensor sim = at::matmul(fd.index_select(0, source[b]), fd.index_select(0, target[b]).t());
    slots.push_back(std::get<1>(sim.max(-1)));
  }
  return at::stack(slots);
}

void check_recycle(const Tensor& x, const Tensor& target, const Tensor& source, const OptT& weight,
                   const OptT& assign, const OptT& features, bool include_target, double atol,
                   const std::string& tag) {
  const int64_t B = x.size(0), N = x.size(1), T = target.size(1), S = source.size(1);
  auto [out, count, slot, wsum] = recycle(x, target, source, weight, assign, features, include_target);
  EXPECT_MSG(out.sizes() == at::IntArrayRef({B, T, x.size(2)}) && out.scalar_type() == x.scalar_type(), tag);
  EXPECT_MSG(slot.sizes() == at::IntArrayRef({B, S}) && slot.scalar_type() == at::kLong, tag);
  const Tensor slot_ref = assign ? *assign : recycle_slot_ref(features ? *features : x, target, source);
  expect_equal(slot, slot_ref, "slot " + tag);
  // group every token of the row by its slot: targets (when included), sources by the
  // slot the op returned, everything else left out
  Tensor group = at::full({B, N}, -1, at::kLong);
  group.scatter_(1, source, slot);
  if (include_target) group.scatter_(1, target, at::arange(T, at::kLong).expand({B, T}).contiguous());
  const Tensor w = weight ? *weight : at::ones({B, N});
  auto [mean_ref, den_ref, cnt_ref] = grouped_mean(x, group, w, T);
  expect_close(out, mean_ref, atol, atol, "out " + tag);
  expect_close(wsum, den_ref, 1e-5, 1e-5, "weight_sum " + tag);
  expect_equal(count, cnt_ref, "count " + tag);
}

TEST_CASE(recycle_similarity_assignment) {
  at::manual_seed(8);
  const int64_t B = 2, N = 30, D = 7;
  Tensor x = at::randn({B, N, D});
  // disjoint targets / sources per row from a random permutation
  std::vector<Tensor> tg, sc;
  for (int64_t b = 0; b < B; ++b) {
    Tensor perm = at::randperm(N, at::kLong);
    tg.push_back(perm.slice(0, 0, 8));
    sc.push_back(perm.slice(0, 8, 20));  // 10 tokens dropped outright
  }
  Tensor target = at::stack(tg), source = at::stack(sc);
  check_recycle(x, target, source, std::nullopt, std::nullopt, std::nullopt, true, 1e-5, "plain");
  check_recycle(x, target, source, std::nullopt, std::nullopt, std::nullopt, false, 1e-5, "no target");
  Tensor weight = at::rand({B, N}) + 0.1;
  Tensor features = at::randn({B, N, 4});
  check_recycle(x, target, source, weight, std::nullopt, features, true, 1e-5, "weight+features");
  check_recycle(x.to(at::kDouble), target, source, weight, std::nullopt, std::nullopt, true, 1e-12, "float64");
}

TEST_CASE(recycle_explicit_assign) {
  at::manual_seed(9);
  const int64_t B = 2, N = 12, D = 3, T = 3, S = 6;
  Tensor x = at::randn({B, N, D});
  Tensor target = at::tensor(std::vector<int64_t>{0, 4, 8, 1, 2, 3}, at::kLong).view({B, T});
  Tensor source = at::tensor(std::vector<int64_t>{1, 2, 3, 5, 6, 7, 4, 5, 6, 7, 8, 9}, at::kLong).view({B, S});
  // slot -1 drops a source; slot 2 of row 1 receives nothing
  Tensor assign = at::tensor(std::vector<int64_t>{0, 0, 2, -1, 1, 1, 0, 1, 1, -1, 0, 0}, at::kLong).view({B, S});
  Tensor weight = at::rand({B, N}) + 0.5;
  check_recycle(x, target, source, weight, assign, std::nullopt, true, 1e-5, "assign");
  // without the target, row 1's slot 2 is empty: zero row, zero count
  check_recycle(x, target, source, std::nullopt, assign, std::nullopt, false, 1e-5, "assign, empty slot");
  auto [out, count, slot, wsum] = recycle(x, target, source, std::nullopt, assign, std::nullopt, false);
  EXPECT(count[1][2].item<int64_t>() == 0);
  EXPECT(out[1][2].abs().sum().item<double>() == 0.0);
  expect_error([&] { recycle(x, target, source + N); },
               {"tokenreduce.recycle", "source"}, "source out of range");
}

}  // namespace

// The greedy MAP of the DPP with kernel r_i cos_ij r_j by determinants of the picked
// submatrix (double, no Cholesky): each step the token whose addition gives the largest
// det ratio, ties to the smallest index.
std::vector<int64_t> dpp_ref(const Tensor& x2d, const Tensor& rel, int64_t k) {
  Tensor u = x2d.to(at::kDouble);
  u = u / u.norm(2, {1}, true);
  Tensor r = rel.to(at::kDouble);
  Tensor L = r.unsqueeze(1) * u.matmul(u.t()) * r.unsqueeze(0);
  const int64_t N = x2d.size(0);
  std::vector<int64_t> picks;
  double prev = 1.0;
  for (int64_t t = 0; t < k; ++t) {
    int64_t best = -1;
    double best_gain = -1.0;
    for (int64_t i = 0; i < N; ++i) {
      if (std::find(picks.begin(), picks.end(), i) != picks.end()) continue;
      std::vector<int64_t> y = picks;
      y.push_back(i);
      Tensor idx = at::tensor(y, at::kLong);
      const double det = at::linalg_det(L.index_select(0, idx).index_select(1, idx)).item<double>();
      if (det / prev > best_gain) {
        best_gain = det / prev;
        best = i;
      }
    }
    picks.push_back(best);
    Tensor idx = at::tensor(picks, at::kLong);
    prev = at::linalg_det(L.index_select(0, idx).index_select(1, idx)).item<double>();
  }
  return picks;
}

TEST_CASE(dpp_select_matches_determinant_greedy) {
  at::manual_seed(6);
  const int64_t B = 2, N = 30, D = 12, K = 6;
  for (auto dtype : {at::kFloat, at::kDouble}) {
    Tensor x = at::randn({B, N, D}, dtype);
    Tensor rel = at::rand({B, N}) + 0.2;
    auto [index, gains] = dpp_select(x, K, rel);
    EXPECT(index.scalar_type() == at::kLong && index.sizes() == at::IntArrayRef({B, K}));
    EXPECT(gains.scalar_type() == (dtype == at::kDouble ? at::kDouble : at::kFloat));
    for (int64_t b = 0; b < B; ++b)
      expect_equal(index[b], at::tensor(dpp_ref(x[b], rel[b], K), at::kLong),
                   "dpp index " + std::string(c10::toString(dtype)) + " batch " + std::to_string(b));
  }
  // duplicates: the gain reaches 0, then the fallback (largest r^2, smallest index), gain 0
  Tensor y = at::eye(2).repeat({2, 1}).unsqueeze(0);  // tokens 0..3: e0 e1 e0 e1
  auto [idx, g] = dpp_select(y, 4);
  expect_equal(idx[0], at::tensor(std::vector<int64_t>{0, 1, 2, 3}, at::kLong), "dpp duplicates");
  EXPECT(g[0][2].item<float>() == 0.0f && g[0][3].item<float>() == 0.0f);
}

TEST_CASE(dpp_select_bad_arguments_throw) {
  Tensor x = at::randn({2, 8, 4});
  expect_error([&] { dpp_select(x, 9); }, {"tokenreduce.dpp_select", "k=9"}, "k > N");
  expect_error([&] { dpp_select(x.select(2, 0), 3); }, {"tokenreduce.dpp_select", "[B, N, D]"}, "2-D features");
  expect_error([&] { dpp_select(x, 3, at::ones({2, 7})); }, {"tokenreduce.dpp_select", "relevance"}, "relevance shape");
  expect_error([&] { dpp_select(x, 3, std::nullopt, at::ones({2, 8})); }, {"tokenreduce.dpp_select", "mask"},
               "float mask");
}

int main() {
  int passed = 0, failed = 0;
  for (const Case& c : registry()) {
    g_checks_failed_in_case = 0;
    std::string error;
    try {
      c.fn();
    } catch (const c10::Error& e) {
      error = std::string("c10::Error: ") + e.what_without_backtrace();
    } catch (const std::exception& e) {
      error = std::string("exception: ") + e.what();
    }
    if (!error.empty()) std::printf("    %s\n", error.c_str());
    const bool ok = error.empty() && g_checks_failed_in_case == 0;
    std::printf("[%s] %s\n", ok ? "PASS" : "FAIL", c.name);
    std::fflush(stdout);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

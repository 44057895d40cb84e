// kcenter on the CPU: greedy max-min (Gonzalez) selection, DivPrune's k-center.
//
// One task per batch row (or, when the batch is smaller than the thread count, the
// token loop of each pick is split over threads). Per pick the kernel streams the
// tokens once: it computes each token's distance to the new pick, lowers its running
// min-distance, and tracks the arg-max of the eligible, not-yet-picked tokens in the
// same pass (ties to the smallest index). No N x N matrix is formed; the memory beyond
// the outputs is one float copy of the rows (only when they are not float already).
// "isolated" (DivPrune's first pick, the token farthest from its nearest neighbour)
// needs all pairwise distances: they are computed in row tiles with a GEMM.
#include <torch/library.h>

#include "../common/cpu_utils.h"
#include "kcenter_checks.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "kcenter";
constexpr int64_t kTile = 256;  // row tile of the nearest-neighbour GEMM

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
  for (int64_t n = 0; n < N; ++n) {
    const acc s = dot(R.ptr + n * R.ld, R.ptr + n * R.ld, D);
    TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(s)), "tokenreduce.kcenter: x has a non-finite value "
                      "(NaN or Inf) in batch ", b, ", token ", n);
    R.sq[n] = s;
    R.inv[n] = cosine ? inv_norm(s) : acc(1);
  }
}

template <typename acc>
inline acc distance(const Rows<acc>& R, int64_t i, int64_t j, int64_t D, bool cosine) {
  if (cosine) return acc(1) - dot(R.ptr + i * R.ld, R.ptr + j * R.ld, D) * R.inv[i] * R.inv[j];
  return std::sqrt(sqdist(R.ptr + i * R.ld, R.ptr + j * R.ld, D));
}

// DivPrune's start: the eligible token whose nearest other token is farthest.
template <typename acc>
int64_t isolated_start(const Rows<acc>& R, int64_t N, int64_t D, bool cosine, const bool* elig) {
  std::vector<acc> nn(N, std::numeric_limits<acc>::infinity());
  std::vector<acc> tile(kTile * std::min(N, kTile));
  for (int64_t i0 = 0; i0 < N; i0 += kTile) {
    const int64_t mi = std::min(kTile, N - i0);
    for (int64_t j0 = 0; j0 < N; j0 += kTile) {
      const int64_t mj = std::min(kTile, N - j0);
      gemm_abt(R.ptr + i0 * R.ld, R.ld, R.ptr + j0 * R.ld, R.ld, tile.data(), mj, mi, mj, D);
      for (int64_t a = 0; a < mi; ++a) {
        const int64_t i = i0 + a;
        acc best = nn[i];
        for (int64_t c = 0; c < mj; ++c) {
          const int64_t j = j0 + c;
          if (j == i) continue;
          const acc g = tile[a * mj + c];
          const acc d = cosine ? acc(1) - g * R.inv[i] * R.inv[j]
                               : std::sqrt(std::max(R.sq[i] + R.sq[j] - acc(2) * g, acc(0)));
          best = d < best ? d : best;
        }
        nn[i] = best;
      }
    }
  }
  ArgMax<acc> am;
  for (int64_t i = 0; i < N; ++i)
    if (elig[i]) am.push(N > 1 ? nn[i] : acc(0), i);
  return am.index;
}

template <typename scalar_t>
void kcenter_cpu_impl(const at::Tensor& x, int64_t k, bool cosine, const int64_t* first,
                      bool isolated, const bool* mask, at::Tensor& index, at::Tensor& mindist) {
  using acc = acc_t<scalar_t>;
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  int64_t* ip = index.data_ptr<int64_t>();
  auto* mp = mindist.data_ptr<acc>();
  const bool split_tokens = B < at::get_num_threads() && N * D >= kMinParallelWork;  // parallelise inside each pick

  auto run_one = [&](int64_t b) {
    Rows<acc> R;
    load_rows<scalar_t, acc>(R, xp + b * x.stride(0), x.stride(1), N, D, cosine, b);
    std::vector<uint8_t> elig(N, 1);
    if (mask) {
      for (int64_t n = 0; n < N; ++n) elig[n] = mask[b * N + n];
    }
    int64_t n_elig = 0;
    for (int64_t n = 0; n < N; ++n) n_elig += elig[n];
    TORCH_CHECK_VALUE(k <= n_elig, "tokenreduce.kcenter: k=", k, " exceeds the ", n_elig,
                      " eligible tokens of batch ", b);
    int64_t pick;
    if (isolated) {
      pick = isolated_start<acc>(R, N, D, cosine, reinterpret_cast<const bool*>(elig.data()));
    } else {
      pick = first[b];
      TORCH_CHECK_INDEX(pick >= -N && pick < N, "tokenreduce.kcenter: first=", pick,
                        " is out of range for N=", N, " (batch ", b, ")");
      if (pick < 0) pick += N;
      TORCH_CHECK_VALUE(elig[pick], "tokenreduce.kcenter: first=", pick,
                        " is masked out in batch ", b);
    }
    acc* md = mp + b * N;
    std::fill(md, md + N, std::numeric_limits<acc>::infinity());
    int64_t* idx = ip + b * k;
    for (int64_t i = 0; i < k; ++i) {
      idx[i] = pick;
      elig[pick] = 0;  // picked: never again
      const bool last = i + 1 == k;
      // one pass: lower the min-distances, track the farthest eligible token
      auto sweep = [&](int64_t j0, int64_t j1) {
        ArgMax<acc> am;
        for (int64_t j = j0; j < j1; ++j) {
          const acc d = distance(R, pick, j, D, cosine);
          md[j] = d < md[j] ? d : md[j];
          if (!last && elig[j]) am.push(md[j], j);
        }
        return am;
      };
      ArgMax<acc> best;
      if (split_tokens && N >= 64) {
        const int64_t nchunk = std::min<int64_t>(at::get_num_threads() * 4, (N + 15) / 16);
        std::vector<ArgMax<acc>> parts(nchunk);
        const int64_t step = (N + nchunk - 1) / nchunk;
        parallel_for_cost(nchunk, step * D, [&](int64_t c0, int64_t c1) {
          for (int64_t c = c0; c < c1; ++c) parts[c] = sweep(c * step, std::min(N, (c + 1) * step));
        });
        for (const auto& p : parts)  // chunks in index order: ties keep the smaller index
          if (p.index >= 0 && (best.index < 0 || p.value > best.value)) best = p;
      } else {
        best = sweep(0, N);
      }
      if (!last) pick = best.index;
    }
    for (int64_t i = 0; i < k; ++i) md[idx[i]] = acc(0);
  };

  if (split_tokens) {
    for (int64_t b = 0; b < B; ++b) run_one(b);
  } else {
    parallel_for_cost(B, k * N * D, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) run_one(b);
    });
  }
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

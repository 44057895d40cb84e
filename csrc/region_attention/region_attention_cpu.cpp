// region_attention on the CPU: TokenPacker's region-to-point injection. Query (i, j) of a
// grid_h x grid_w grid attends, per head, to the R = L * region^2 keys of its own
// region x region window (rows i*region .. i*region + region - 1, the same for columns) of
// every one of the L key levels, on a (region grid_h) x (region grid_w) key grid.
//
// One task per (batch row, query), run in parallel (the windows tile the key grid, so tasks
// share no output): the scaled query row is loaded once, the R x heads logits are taken
// straight from the key rows (no unfolded copy of k or v: only an R x heads buffer per
// task), a numerically stable softmax per head (max, exp, sum; lse = max + log sum is kept
// for the backward), then the value rows are accumulated with the weights. Accumulation in
// float32 (float64 for float64 inputs).
#include <torch/library.h>

#include "../common/cpu_utils.h"
#include "region_attention_checks.h"

namespace tokenreduce {
namespace {

// sum_d a[d] * b[d], a already in acc, b any storage type.
template <typename scalar_t, typename acc>
inline acc dot_mixed(const acc* a, const scalar_t* b, int64_t n) {
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<acc>(b[i]);
  return s;
}

template <typename scalar_t>
void region_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t grid_w,
                              int64_t region, int64_t heads, double scale, at::Tensor& out, at::Tensor& lse) {
  using acc = acc_t<scalar_t>;
  const int64_t B = q.size(0), M = q.size(1), C = q.size(2), L = k.size(1), Cv = v.size(3);
  const int64_t Dh = C / heads, Dv = Cv / heads, ss = region * region, R = L * ss, W = region * grid_w;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc* lp = lse.data_ptr<acc>();
  const int64_t qsb = q.stride(0), qsm = q.stride(1);
  const int64_t ksb = k.stride(0), ksl = k.stride(1), ksn = k.stride(2);
  const int64_t vsb = v.stride(0), vsl = v.stride(1), vsn = v.stride(2);
  const acc sc = static_cast<acc>(scale);
  parallel_for_cost(B * M, 2 * R * (C + Cv) + 8, [&](int64_t t0, int64_t t1) {
    std::vector<acc> qrow(std::max<int64_t>(C, 1)), orow(std::max<int64_t>(Cv, 1));
    std::vector<acc> logit(heads * R);       // [heads, R]: logits, then weights
    std::vector<int64_t> key_off(R), val_off(R);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / M, m = t % M, i = m / grid_w, j = m % grid_w;
      load_row_scaled(qp + b * qsb + m * qsm, C, sc, qrow.data());
      for (int64_t l = 0, r = 0; l < L; ++l)
        for (int64_t di = 0; di < region; ++di)
          for (int64_t dj = 0; dj < region; ++dj, ++r) {
            const int64_t n = (i * region + di) * W + j * region + dj;
            key_off[r] = b * ksb + l * ksl + n * ksn;
            val_off[r] = b * vsb + l * vsl + n * vsn;
          }
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* kr = kp + key_off[r];
        for (int64_t h = 0; h < heads; ++h) logit[h * R + r] = dot_mixed(qrow.data() + h * Dh, kr + h * Dh, Dh);
      }
      for (int64_t h = 0; h < heads; ++h) {
        acc* lg = logit.data() + h * R;
        acc mx = -std::numeric_limits<acc>::infinity();
        for (int64_t r = 0; r < R; ++r) mx = lg[r] > mx ? lg[r] : mx;
        acc sum = 0;
        for (int64_t r = 0; r < R; ++r) {
          lg[r] = fast_exp(lg[r] - mx);
          sum += lg[r];
        }
        const acc inv = acc(1) / sum;
        for (int64_t r = 0; r < R; ++r) lg[r] *= inv;
        lp[t * heads + h] = mx + std::log(sum);
      }
      std::fill(orow.begin(), orow.end(), acc(0));
      for (int64_t r = 0; r < R; ++r) {
        const scalar_t* vr = vp + val_off[r];
        for (int64_t h = 0; h < heads; ++h) {
          const acc w = logit[h * R + r];
          acc* o = orow.data() + h * Dv;
          const scalar_t* vh = vr + h * Dv;
#pragma omp simd
          for (int64_t d = 0; d < Dv; ++d) o[d] += w * static_cast<acc>(vh[d]);
        }
      }
      scalar_t* orow_out = op + t * Cv;
#pragma omp simd
      for (int64_t d = 0; d < Cv; ++d) orow_out[d] = static_cast<scalar_t>(orow[d]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> region_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, int64_t grid_h, int64_t grid_w,
                                                        int64_t region, int64_t heads, double scale) {
  check_region_attention_args(q_in, k_in, v_in, grid_h, grid_w, region, heads);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const int64_t B = q.size(0), M = q.size(1), Cv = v.size(3);
  at::Tensor out = at::empty({B, M, Cv}, q.options());
  at::Tensor lse = at::empty({B, M, heads}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (B * M == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "region_attention_cpu", [&] {
    region_attention_forward<scalar_t>(q, k, v, grid_w, region, heads, scale, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CPU, m) { m.impl("region_attention", &region_attention_cpu); }

}  // namespace tokenreduce

// kcenter on CUDA: torch glue (argument checks, outputs, workspaces, current stream).
// The kernels are in kcenter_kernels.cuh, their launcher in kcenter_launch.cu.
//
// CUDA behaviour on data-dependent errors: the CPU kernel raises for NaN/Inf in x, for k
// above a row's eligible count and for a masked-out or out-of-range `first` tensor entry.
// Raising would need a host sync, so on CUDA such a batch row is poisoned instead:
// index[b, :] = -1 and mindist[b, :] = NaN. Everything decidable from shapes (and an int
// `first`) raises here exactly as on the CPU.
#include <torch/library.h>

#include "../common/cpu_utils.h"
#include "../common/cuda_glue.h"
#include "kcenter_checks.h"
#include "kcenter_launch.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "kcenter";

std::tuple<at::Tensor, at::Tensor> kcenter_cuda(const at::Tensor& x_in, int64_t k,
                                                c10::string_view metric, int64_t first,
                                                const std::optional<at::Tensor>& first_index,
                                                bool isolated, const std::optional<at::Tensor>& mask) {
  check_kcenter_args(x_in, k, metric, first_index, mask);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  at::Tensor firsts;
  if (first_index.has_value()) {
    firsts = first_index->contiguous();
  } else if (!isolated && B > 0) {
    TR_CHECK_INDEX("kcenter", first >= -N && first < N, "first=", first, " is out of range for N=", N);
  }
  at::Tensor m;
  if (mask.has_value()) m = mask->contiguous();
  check_int_range(kOp, "N", N);
  check_int_range(kOp, "D", D);
  check_int_range(kOp, "B", B);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = last_dim_contiguous(x_in);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor index = at::empty({B, k}, x.options().dtype(at::kLong));
  at::Tensor mindist = at::empty({B, N}, x.options().dtype(acc_dtype));
  if (B == 0 || N == 0) return {index, mindist};
  if (k == 0) {
    mindist.fill_(std::numeric_limits<double>::infinity());
    return {index, mindist};
  }
  const cuda::DType dt = cuda_dtype(x);
  const cuda::KcenterPlan plan = cuda::make_kcenter_plan(B, N, D, cuda::acc_size(dt), isolated);
  const bool gram = plan.gram;
  const long long smem = plan.select.smem;
  const long long limit = max_shared_memory_optin(x);
  TR_CHECK_VALUE("kcenter", smem <= limit, "N=", N, " (D=", D, ") needs ", smem,
                 " bytes of shared memory per block on CUDA; this GPU allows ", limit);
  at::Tensor sq = at::empty({B, N}, x.options().dtype(acc_dtype));
  at::Tensor dist = gram ? at::empty({B, N, N}, x.options().dtype(acc_dtype)) : at::Tensor();
  cuda::KcenterArgs a{};
  a.x = x.data_ptr();
  a.sb = x.stride(0);
  a.sn = x.stride(1);
  a.B = int(B);
  a.N = int(N);
  a.D = int(D);
  a.cosine = metric == "cosine" ? 1 : 0;
  a.k = int(k);
  a.first_int = first;
  a.first_index = firsts.defined() ? i64_ptr(firsts) : nullptr;
  a.isolated = isolated ? 1 : 0;
  a.mask = m.defined() ? m.data_ptr<bool>() : nullptr;
  a.sq = sq.data_ptr();
  a.dist = gram ? dist.data_ptr() : nullptr;
  a.index = i64_ptr(index);
  a.mindist = mindist.data_ptr();
  TR_CUDA_CHECK("kcenter", cuda::kcenter_launch(dt, a, c10::cuda::getCurrentCUDAStream().stream()));
  return {index, mindist};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CUDA, m) { m.impl("kcenter", &kcenter_cuda); }

}  // namespace tokenreduce

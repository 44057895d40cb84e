// dpp_select on CUDA: torch glue (argument checks, outputs, workspaces, current stream).
// The kernels are in dpp_select_kernels.cuh, their launcher in dpp_select_launch.cu.
//
// CUDA behaviour on data-dependent errors: the CPU kernel raises for NaN/Inf in features or
// relevance. Raising would need a host sync, so on CUDA a NaN gain never wins (the row ends
// in fallback picks of gain 0). Everything decidable from shapes raises here as on the CPU.
#include <torch/library.h>

#include "../common/cpu_utils.h"
#include "../common/cuda_glue.h"
#include "dpp_select_checks.h"
#include "dpp_select_launch.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "dpp_select";

std::tuple<at::Tensor, at::Tensor> dpp_select_cuda(const at::Tensor& features, int64_t k,
                                                   const std::optional<at::Tensor>& relevance,
                                                   const std::optional<at::Tensor>& mask) {
  check_dpp_select_args(features, k, relevance, mask);
  const int64_t B = features.size(0), N = features.size(1), D = features.size(2);
  check_int_range(kOp, "N", N);
  check_int_range(kOp, "D", D);
  check_int_range(kOp, "B", B);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor x = last_dim_contiguous(features);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor index = at::empty({B, k}, x.options().dtype(at::kLong));
  at::Tensor gains = at::empty({B, k}, x.options().dtype(acc_dtype));
  if (B == 0 || N == 0 || k == 0) return {index, gains};
  const cuda::DType dt = cuda_dtype(x);
  const cuda::DppSelectPlan plan = cuda::make_dpp_select_plan(B, N, D, k, cuda::acc_size(dt));
  const long long limit = max_shared_memory_optin(x);
  TR_CHECK_VALUE("dpp_select", plan.greedy.smem <= limit, "N=", N, " (D=", D, ", k=", k, ") needs ",
                 plan.greedy.smem, " bytes of shared memory per block on CUDA; this GPU allows ", limit);
  const at::Tensor rel = relevance.has_value() ? relevance->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  at::Tensor inv = at::empty({B, N}, x.options().dtype(acc_dtype));
  at::Tensor diag = at::empty({B, N}, x.options().dtype(acc_dtype));
  at::Tensor chol = at::empty({B, k, N}, x.options().dtype(acc_dtype));
  cuda::DppSelectArgs a{};
  a.features = x.data_ptr();
  a.sb = x.stride(0);
  a.sn = x.stride(1);
  a.B = int(B);
  a.N = int(N);
  a.D = int(D);
  a.k = int(k);
  a.relevance = rel.defined() ? rel.data_ptr() : nullptr;
  a.mask = m.defined() ? m.data_ptr<bool>() : nullptr;
  a.inv = inv.data_ptr();
  a.diag = diag.data_ptr();
  a.chol = chol.data_ptr();
  a.index = i64_ptr(index);
  a.gains = gains.data_ptr();
  TR_CUDA_CHECK("dpp_select", cuda::dpp_select_launch(dt, a, c10::cuda::getCurrentCUDAStream().stream()));
  return {index, gains};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CUDA, m) { m.impl("dpp_select", &dpp_select_cuda); }

}  // namespace tokenreduce

// recycle on CUDA: torch glue (argument checks, outputs, workspaces, current stream).
// Kernels: recycle_kernels.cuh; launcher: recycle_launch.cu.
//
// CUDA behaviour on data-dependent errors (the CPU raises: a target/source position outside
// [0, N), an assign slot outside [-1, T), non-finite compared features): checking on the
// host would need a sync, so the batch row is poisoned instead: out[b] and weight_sum[b]
// are NaN, count[b] is 0 and slot[b] is -1. Invalid positions are never dereferenced.
#include <torch/library.h>

#include "../common/cpu_utils.h"
#include "../common/cuda_glue.h"
#include "recycle_checks.h"
#include "recycle_launch.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "recycle";

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recycle_cuda(
    const at::Tensor& x_in, const at::Tensor& target_in, const at::Tensor& source_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& assign_in,
    const std::optional<at::Tensor>& features_in, c10::string_view metric, bool include_target) {
  check_recycle_args(x_in, target_in, source_in, weight_in, assign_in, features_in, metric);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const int64_t T = target_in.size(1), S = source_in.size(1);
  const auto acc_dtype = at::toOpMathType(x_in.scalar_type());
  at::Tensor feats;
  if (!assign_in.has_value()) {
    feats = features_in.has_value() ? *features_in : x_in;
    check_int_range(kOp, "Df", feats.size(2));
  }
  check_int_range(kOp, "N", N);
  check_int_range(kOp, "D", D);
  check_int_range(kOp, "T", T);
  check_int_range(kOp, "S", S);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor target = target_in.contiguous(), source = source_in.contiguous();
  at::Tensor weight;
  if (weight_in.has_value()) weight = weight_in->to(acc_dtype).contiguous();
  at::Tensor slot = assign_in.has_value() ? assign_in->contiguous().clone()
                                          : at::empty({B, S}, x_in.options().dtype(at::kLong));
  const at::Tensor x = last_dim_contiguous(x_in);
  at::Tensor out = at::empty({B, T, D}, x.options());
  at::Tensor count = at::empty({B, T}, x.options().dtype(at::kLong));
  at::Tensor wsum = at::empty({B, T}, x.options().dtype(acc_dtype));
  if (B == 0) return {out, count, slot, wsum};
  const long long smem = cuda::recycle_plan_smem(int(T));
  const long long limit = max_shared_memory_optin(x);
  TR_CHECK_VALUE("recycle", smem <= limit, "T=", T, " needs ", smem,
                 " bytes of shared memory per block on CUDA; this GPU allows ", limit);
  cuda::DType fdt = cuda::DType::kFloat32;
  at::Tensor inv;
  if (feats.defined()) {
    feats = last_dim_contiguous(feats);
    fdt = cuda_dtype(feats);
    inv = at::empty({B, N}, feats.options().dtype(at::toOpMathType(feats.scalar_type())));
  }
  at::Tensor ints = at::empty({B * ((T + 1) + std::max<int64_t>(S, 1) + 1)}, x.options().dtype(at::kInt));
  cuda::RecycleArgs a{};
  a.x = x.data_ptr();
  a.xsb = x.stride(0);
  a.xsn = x.stride(1);
  a.feats = feats.defined() ? feats.data_ptr() : nullptr;
  a.fsb = feats.defined() ? feats.stride(0) : 0;
  a.fsn = feats.defined() ? feats.stride(1) : 0;
  a.B = int(B);
  a.N = int(N);
  a.D = int(D);
  a.Df = feats.defined() ? int(feats.size(2)) : 0;
  a.T = int(T);
  a.S = int(S);
  a.include_target = include_target ? 1 : 0;
  a.target = i64_ptr(target);
  a.source = i64_ptr(source);
  a.weight = weight.defined() ? weight.data_ptr() : nullptr;
  a.slot = i64_ptr(slot);
  a.inv = inv.defined() ? inv.data_ptr() : nullptr;
  a.off = ints.data_ptr<int>();
  a.mem = a.off + B * (T + 1);
  a.bad = a.mem + B * std::max<int64_t>(S, 1);
  a.out = out.data_ptr();
  a.count = i64_ptr(count);
  a.wsum = wsum.data_ptr();
  TR_CUDA_CHECK("recycle", cuda::recycle_launch(cuda_dtype(x), fdt, a, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, count, slot, wsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CUDA, m) { m.impl("recycle", &recycle_cuda); }

}  // namespace tokenreduce

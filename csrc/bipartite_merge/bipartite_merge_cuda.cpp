// bipartite_merge on CUDA: torch glue (argument checks, outputs, workspaces, current stream).
// Kernels: bipartite_merge_kernels.cuh; launcher: bipartite_merge_launch.cu.
//
// CUDA behaviour on a non-finite metric row (the CPU raises): the batch row is poisoned,
// merged[b] and size[b] are NaN (source[b] stays a valid slot map). Shape and argument
// errors raise as on the CPU.
#include <torch/library.h>

#include "../common/cpu_utils.h"
#include "../common/cuda_glue.h"
#include "bipartite_merge_checks.h"
#include "bipartite_merge_launch.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "bipartite_merge";

std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_merge_cuda(
    const at::Tensor& x_in, int64_t r, const std::optional<at::Tensor>& metric_in,
    const std::optional<at::Tensor>& size_in, int64_t protect, c10::string_view order) {
  check_bipartite_merge_args(x_in, r, metric_in, size_in, protect, order);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2);
  const auto acc_dtype = at::toOpMathType(x_in.scalar_type());
  at::Tensor metric = metric_in.has_value() ? *metric_in : x_in;
  at::Tensor size;
  check_int_range(kOp, "N", N);
  check_int_range(kOp, "D", D);
  check_int_range(kOp, "Dm", metric.size(2));
  const c10::cuda::CUDAGuard guard(x_in.device());
  size = size_in.has_value() ? size_in->to(acc_dtype).contiguous()
                             : at::ones({B, N}, x_in.options().dtype(acc_dtype));
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
  if (B == 0) return {merged, size_out, source};
  const cuda::DType xdt = cuda_dtype(x), mdt = cuda_dtype(metric);
  const long long smem = cuda::bipartite_merge_plan_smem(int(N), mdt);
  const long long limit = max_shared_memory_optin(x);
  TR_CHECK_VALUE("bipartite_merge", smem <= limit, "N=", N, " needs ", smem,
                 " bytes of shared memory per block on CUDA; this GPU allows ", limit);
  const int64_t Na = (N + 1) / 2, Nb = N / 2, No = N - r, R = std::max<int64_t>(r, 1);
  const auto macc = at::toOpMathType(metric.scalar_type());
  at::Tensor inv = at::empty({B, N}, metric.options().dtype(macc));
  at::Tensor node_max = at::empty({B, Na}, metric.options().dtype(macc));
  at::Tensor ints = at::empty({B * (Na + No + (Nb + 1) + R + 1)}, x.options().dtype(at::kInt));
  int* ip = ints.data_ptr<int>();
  cuda::BipartiteMergeArgs a{};
  a.x = x.data_ptr();
  a.xsb = x.stride(0);
  a.xsn = x.stride(1);
  a.metric = metric.data_ptr();
  a.msb = metric.stride(0);
  a.msn = metric.stride(1);
  a.B = int(B);
  a.N = int(N);
  a.D = int(D);
  a.Dm = int(metric.size(2));
  a.r = int(r);
  a.protect = int(protect);
  a.tome = order == "tome" ? 1 : 0;
  a.size = size.data_ptr();
  a.inv = inv.data_ptr();
  a.node_max = node_max.data_ptr();
  a.node_idx = ip;
  a.owner = ip + B * Na;
  a.off = a.owner + B * No;
  a.mem = a.off + B * (Nb + 1);
  a.bad = a.mem + B * R;
  a.merged = merged.data_ptr();
  a.size_out = size_out.data_ptr();
  a.source = i64_ptr(source);
  TR_CUDA_CHECK("bipartite_merge",
                cuda::bipartite_merge_launch(xdt, mdt, a, c10::cuda::getCurrentCUDAStream().stream()));
  return {merged, size_out, source};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CUDA, m) { m.impl("bipartite_merge", &bipartite_merge_cuda); }

}  // namespace tokenreduce

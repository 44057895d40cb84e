// region_attention on CUDA: torch glue (argument checks, outputs, current stream).
// Kernel: region_attention_kernels.cuh; launcher: region_attention_launch.cu. No
// data-dependent checks: the kernel has no host sync.
#include <torch/library.h>

#include "../common/cpu_utils.h"
#include "../common/cuda_glue.h"
#include "region_attention_checks.h"
#include "region_attention_launch.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "region_attention";

std::tuple<at::Tensor, at::Tensor> region_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, int64_t grid_h, int64_t grid_w,
                                                         int64_t region, int64_t heads, double scale) {
  check_region_attention_args(q_in, k_in, v_in, grid_h, grid_w, region, heads);
  const int64_t B = q_in.size(0), M = q_in.size(1), C = q_in.size(2), L = k_in.size(1), Cv = v_in.size(3);
  check_int_range(kOp, "B", B);
  check_int_range(kOp, "M", M);
  check_int_range(kOp, "C", C);
  check_int_range(kOp, "Cv", Cv);
  check_int_range(kOp, "L * region^2", L * region * region);
  check_int_range(kOp, "region * grid_w", region * grid_w);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  at::Tensor out = at::empty({B, M, Cv}, q.options());
  at::Tensor lse = at::empty({B, M, heads}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (B * M == 0) return {out, lse};
  const cuda::DType dt = cuda_dtype(q);
  const long long smem = cuda::region_attention_plan_smem(int(L), int(region), dt);
  const long long limit = max_shared_memory_optin(q);
  TR_CHECK_VALUE("region_attention", smem <= limit, "L * region^2 = ", L * region * region, " keys need ", smem,
                 " bytes of shared memory per block on CUDA; this GPU allows ", limit);
  cuda::RegionAttentionArgs a{};
  a.q = q.data_ptr();
  a.qsb = q.stride(0);
  a.qsm = q.stride(1);
  a.k = k.data_ptr();
  a.ksb = k.stride(0);
  a.ksl = k.stride(1);
  a.ksn = k.stride(2);
  a.v = v.data_ptr();
  a.vsb = v.stride(0);
  a.vsl = v.stride(1);
  a.vsn = v.stride(2);
  a.B = int(B);
  a.M = int(M);
  a.grid_w = int(grid_w);
  a.region = int(region);
  a.L = int(L);
  a.heads = int(heads);
  a.Dh = int(C / heads);
  a.Dv = int(Cv / heads);
  a.scale = scale;
  a.out = out.data_ptr();
  a.lse = lse.data_ptr();
  TR_CUDA_CHECK("region_attention",
                cuda::region_attention_launch(dt, a, c10::cuda::getCurrentCUDAStream().stream()));
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CUDA, m) { m.impl("region_attention", &region_attention_cuda); }

}  // namespace tokenreduce

// Torch-free host launcher of the region_attention CUDA kernel (region_attention_kernels.cuh);
// the geometry comes from make_region_attention_plan (region_attention_plan.h).
#include "region_attention_kernels.cuh"
#include "region_attention_launch.h"

namespace tokenreduce {
namespace cuda {

static_assert(kRaThreads == 256, "ra_forward's __launch_bounds__(256)");

long long region_attention_plan_smem(int L, int region, DType dtype) {
  return region_attention_smem_bytes(L, region, acc_size(dtype));
}

template <typename scalar_t>
cudaError_t ra_forward_t(const RegionAttentionArgs& a, const RegionAttentionPlan& p, cudaStream_t st) {
  typedef acc_t<scalar_t> acc;
  return launch_planned(p.forward, st, region_attention::ra_forward<scalar_t>, static_cast<const scalar_t*>(a.q),
                        a.qsb, a.qsm, static_cast<const scalar_t*>(a.k), a.ksb, a.ksl, a.ksn,
                        static_cast<const scalar_t*>(a.v), a.vsb, a.vsl, a.vsn, a.B, a.M, a.grid_w, a.region, a.L,
                        a.heads, a.Dh, a.Dv, static_cast<acc>(a.scale), static_cast<scalar_t*>(a.out),
                        static_cast<acc*>(a.lse));
}

cudaError_t region_attention_launch(DType dtype, const RegionAttentionArgs& a, cudaStream_t st) {
  const RegionAttentionPlan p = make_region_attention_plan(a.B, a.M, a.heads, a.L, a.region, acc_size(dtype));
  switch (dtype) {
    case DType::kFloat32: return ra_forward_t<float>(a, p, st);
    case DType::kFloat16: return ra_forward_t<__half>(a, p, st);
    case DType::kBFloat16: return ra_forward_t<__nv_bfloat16>(a, p, st);
    case DType::kFloat64: return ra_forward_t<double>(a, p, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tokenreduce

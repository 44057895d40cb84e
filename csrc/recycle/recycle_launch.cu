// Torch-free host launchers of the recycle CUDA kernels (recycle_kernels.cuh); the geometry
// comes from make_recycle_plan (recycle_plan.h).
#include "recycle_kernels.cuh"
#include "recycle_launch.h"

namespace tokenreduce {
namespace cuda {

static_assert(kTileRows == kTileM && kTileBlock == kTileThreads, "launch_plan.h tiles = cuda_common.cuh tiles");

long long recycle_plan_smem(int T) { return recycle_plan_smem_bytes(T); }

template <typename fscalar_t>
cudaError_t rc_assign_t(const RecycleArgs& a, const RecyclePlan& p, cudaStream_t st) {
  typedef acc_t<fscalar_t> facc;
  const fscalar_t* f = static_cast<const fscalar_t*>(a.feats);
  facc* inv = static_cast<facc*>(a.inv);
  // N == 0: no launch (every position is invalid: the plan kernel poisons the rows)
  TR_CUDA_TRY(launch_planned(p.inv_norm, st, recycle::rc_inv_norm<fscalar_t>, f, a.fsb, a.fsn, a.N, a.Df, inv));
  return launch_planned(p.assign, st, recycle::rc_assign<fscalar_t>, f, a.fsb, a.fsn, a.N, a.Df, (const facc*)inv,
                        a.target, a.T, a.source, a.S, a.slot);
}

template <typename scalar_t>
cudaError_t rc_aggregate_t(const RecycleArgs& a, const RecyclePlan& p, cudaStream_t st) {
  typedef acc_t<scalar_t> acc;
  constexpr int V = VecWidth<scalar_t>::value;
  const bool vec = vector_ok(a.x, a.xsb, a.xsn, a.D, sizeof(scalar_t)) && vector_ok(a.out, 0, a.D, a.D, sizeof(scalar_t));
  auto kern = vec ? recycle::rc_aggregate<scalar_t, V> : recycle::rc_aggregate<scalar_t, 1>;
  return launch_planned(p.aggregate, st, kern, static_cast<const scalar_t*>(a.x), a.xsb, a.xsn, a.N, a.D, a.T, a.S,
                        a.target, static_cast<const acc*>(a.weight), (const int*)a.off, (const int*)a.mem,
                        (const int*)a.bad, a.include_target, static_cast<scalar_t*>(a.out),
                        static_cast<acc*>(a.wsum));
}

cudaError_t recycle_launch(DType x_dtype, DType feats_dtype, const RecycleArgs& a, cudaStream_t st) {
  if (a.B == 0) return cudaSuccess;
  const RecyclePlan p = make_recycle_plan(a.B, a.N, a.T, a.S, a.feats != nullptr);
  if (a.feats != nullptr) {
    switch (feats_dtype) {
      case DType::kFloat32: TR_CUDA_TRY(rc_assign_t<float>(a, p, st)); break;
      case DType::kFloat16: TR_CUDA_TRY(rc_assign_t<__half>(a, p, st)); break;
      case DType::kBFloat16: TR_CUDA_TRY(rc_assign_t<__nv_bfloat16>(a, p, st)); break;
      case DType::kFloat64: TR_CUDA_TRY(rc_assign_t<double>(a, p, st)); break;
      default: return cudaErrorInvalidValue;
    }
  }
  const bool fd = feats_dtype == DType::kFloat64;
  const float* inv_f = (a.feats != nullptr && !fd) ? static_cast<const float*>(a.inv) : nullptr;
  const double* inv_d = (a.feats != nullptr && fd) ? static_cast<const double*>(a.inv) : nullptr;
  TR_CUDA_TRY(launch_planned(p.plan, st, recycle::rc_plan, a.target, a.source, a.slot, inv_f, inv_d, a.N, a.T, a.S,
                             a.include_target, a.count, a.off, a.mem, a.bad));
  switch (x_dtype) {
    case DType::kFloat32: return rc_aggregate_t<float>(a, p, st);
    case DType::kFloat16: return rc_aggregate_t<__half>(a, p, st);
    case DType::kBFloat16: return rc_aggregate_t<__nv_bfloat16>(a, p, st);
    case DType::kFloat64: return rc_aggregate_t<double>(a, p, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tokenreduce

// Torch-free host launchers of the bipartite_merge CUDA kernels (bipartite_merge_kernels.cuh);
// the geometry comes from make_bipartite_merge_plan (bipartite_merge_plan.h).
#include "bipartite_merge_kernels.cuh"
#include "bipartite_merge_launch.h"

namespace tokenreduce {
namespace cuda {

static_assert(kTileRows == kTileM && kTileBlock == kTileThreads, "launch_plan.h tiles = cuda_common.cuh tiles");

long long bipartite_merge_plan_smem(int N, DType metric_dtype) {
  return bipartite_merge_plan_smem_bytes(N, acc_size(metric_dtype));
}

// matching and planning: depend on the metric dtype only
template <typename mscalar_t>
cudaError_t bm_match_plan_t(const BipartiteMergeArgs& a, const BipartiteMergePlan& p, cudaStream_t st) {
  typedef acc_t<mscalar_t> macc;
  const mscalar_t* m = static_cast<const mscalar_t*>(a.metric);
  macc* inv = static_cast<macc*>(a.inv);
  macc* node_max = static_cast<macc*>(a.node_max);
  TR_CUDA_TRY(launch_planned(p.inv_norm, st, bipartite_merge::bm_inv_norm<mscalar_t>, m, a.msb, a.msn, a.N, a.Dm,
                             inv));
  TR_CUDA_TRY(launch_planned(p.match, st, bipartite_merge::bm_match<mscalar_t>, m, a.msb, a.msn, a.N, a.Dm,
                             (const macc*)inv, (a.protect + 1) / 2, a.protect / 2, node_max, a.node_idx));
  return launch_planned(p.plan, st, bipartite_merge::bm_plan<macc>, (const macc*)node_max, (const int*)a.node_idx,
                        (const macc*)inv, a.N, a.r, a.protect, a.tome, a.source, a.owner, a.off, a.mem, a.bad);
}

template <typename scalar_t>
cudaError_t bm_merge_t(const BipartiteMergeArgs& a, const BipartiteMergePlan& p, cudaStream_t st) {
  typedef acc_t<scalar_t> acc;
  constexpr int V = VecWidth<scalar_t>::value;
  const bool vec = vector_ok(a.x, a.xsb, a.xsn, a.D, sizeof(scalar_t)) && vector_ok(a.merged, 0, a.D, a.D, sizeof(scalar_t));
  auto kern = vec ? bipartite_merge::bm_merge<scalar_t, V> : bipartite_merge::bm_merge<scalar_t, 1>;
  return launch_planned(p.merge, st, kern, static_cast<const scalar_t*>(a.x), a.xsb, a.xsn, a.N, a.D, a.r,
                        static_cast<const acc*>(a.size), (const int*)a.owner, (const int*)a.off, (const int*)a.mem,
                        (const int*)a.bad, static_cast<scalar_t*>(a.merged), static_cast<acc*>(a.size_out));
}

cudaError_t bipartite_merge_launch(DType x_dtype, DType metric_dtype, const BipartiteMergeArgs& a,
                                   cudaStream_t st) {
  if (a.B == 0 || a.r <= 0) return cudaSuccess;
  const BipartiteMergePlan p = make_bipartite_merge_plan(a.B, a.N, a.r, acc_size(metric_dtype));
  switch (metric_dtype) {
    case DType::kFloat32: TR_CUDA_TRY(bm_match_plan_t<float>(a, p, st)); break;
    case DType::kFloat16: TR_CUDA_TRY(bm_match_plan_t<__half>(a, p, st)); break;
    case DType::kBFloat16: TR_CUDA_TRY(bm_match_plan_t<__nv_bfloat16>(a, p, st)); break;
    case DType::kFloat64: TR_CUDA_TRY(bm_match_plan_t<double>(a, p, st)); break;
    default: return cudaErrorInvalidValue;
  }
  switch (x_dtype) {
    case DType::kFloat32: return bm_merge_t<float>(a, p, st);
    case DType::kFloat16: return bm_merge_t<__half>(a, p, st);
    case DType::kBFloat16: return bm_merge_t<__nv_bfloat16>(a, p, st);
    case DType::kFloat64: return bm_merge_t<double>(a, p, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tokenreduce

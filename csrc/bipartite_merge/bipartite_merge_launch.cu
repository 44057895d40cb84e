// Torch-free host launchers of the bipartite_merge CUDA kernels (bipartite_merge_kernels.cuh).
#include "bipartite_merge_kernels.cuh"
#include "bipartite_merge_launch.h"

namespace tokenreduce {
namespace cuda {

long long bipartite_merge_plan_smem(int N, DType metric_dtype) {
  return bipartite_merge::plan_smem_bytes(N, acc_size(metric_dtype));
}

// matching and planning: depend on the metric dtype only
template <typename mscalar_t>
cudaError_t bm_match_plan_t(const BipartiteMergeArgs& a, cudaStream_t st) {
  typedef acc_t<mscalar_t> macc;
  const mscalar_t* m = static_cast<const mscalar_t*>(a.metric);
  macc* inv = static_cast<macc*>(a.inv);
  macc* node_max = static_cast<macc*>(a.node_max);
  const int Na = (a.N + 1) / 2;
  bipartite_merge::bm_inv_norm<mscalar_t><<<dim3(ceil_div(a.N, 8), a.B), 256, 0, st>>>(
      m, a.msb, a.msn, a.N, a.Dm, inv);
  TR_CUDA_TRY(cudaGetLastError());
  bipartite_merge::bm_match<mscalar_t><<<dim3(ceil_div(Na, kTileM), a.B), kTileThreads, 0, st>>>(
      m, a.msb, a.msn, a.N, a.Dm, inv, (a.protect + 1) / 2, a.protect / 2, node_max, a.node_idx);
  TR_CUDA_TRY(cudaGetLastError());
  const long long smem = bipartite_merge::plan_smem_bytes(a.N, sizeof(macc));
  auto plan = bipartite_merge::bm_plan<macc>;
  TR_CUDA_TRY(allow_dynamic_smem(plan, smem));
  plan<<<a.B, 512, smem, st>>>(node_max, a.node_idx, inv, a.N, a.r, a.protect, a.tome, a.source,
                               a.owner, a.off, a.mem, a.bad);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t bm_merge_t(const BipartiteMergeArgs& a, cudaStream_t st) {
  typedef acc_t<scalar_t> acc;
  constexpr int V = VecWidth<scalar_t>::value;
  const bool vec = vector_ok(a.x, a.xsb, a.xsn, a.D, sizeof(scalar_t)) && vector_ok(a.merged, 0, a.D, a.D, sizeof(scalar_t));
  auto kern = vec ? bipartite_merge::bm_merge<scalar_t, V> : bipartite_merge::bm_merge<scalar_t, 1>;
  kern<<<dim3(a.N - a.r, a.B), 128, 0, st>>>(
      static_cast<const scalar_t*>(a.x), a.xsb, a.xsn, a.N, a.D, a.r, static_cast<const acc*>(a.size),
      a.owner, a.off, a.mem, a.bad, static_cast<scalar_t*>(a.merged), static_cast<acc*>(a.size_out));
  return cudaGetLastError();
}

template cudaError_t bm_match_plan_t<float>(const BipartiteMergeArgs&, cudaStream_t);
template cudaError_t bm_match_plan_t<__half>(const BipartiteMergeArgs&, cudaStream_t);
template cudaError_t bm_match_plan_t<__nv_bfloat16>(const BipartiteMergeArgs&, cudaStream_t);
template cudaError_t bm_match_plan_t<double>(const BipartiteMergeArgs&, cudaStream_t);
template cudaError_t bm_merge_t<float>(const BipartiteMergeArgs&, cudaStream_t);
template cudaError_t bm_merge_t<__half>(const BipartiteMergeArgs&, cudaStream_t);
template cudaError_t bm_merge_t<__nv_bfloat16>(const BipartiteMergeArgs&, cudaStream_t);
template cudaError_t bm_merge_t<double>(const BipartiteMergeArgs&, cudaStream_t);

cudaError_t bipartite_merge_launch(DType x_dtype, DType metric_dtype, const BipartiteMergeArgs& a,
                                   cudaStream_t st) {
  if (a.B == 0 || a.r <= 0) return cudaSuccess;
  switch (metric_dtype) {
    case DType::kFloat32: TR_CUDA_TRY(bm_match_plan_t<float>(a, st)); break;
    case DType::kFloat16: TR_CUDA_TRY(bm_match_plan_t<__half>(a, st)); break;
    case DType::kBFloat16: TR_CUDA_TRY(bm_match_plan_t<__nv_bfloat16>(a, st)); break;
    case DType::kFloat64: TR_CUDA_TRY(bm_match_plan_t<double>(a, st)); break;
    default: return cudaErrorInvalidValue;
  }
  switch (x_dtype) {
    case DType::kFloat32: return bm_merge_t<float>(a, st);
    case DType::kFloat16: return bm_merge_t<__half>(a, st);
    case DType::kBFloat16: return bm_merge_t<__nv_bfloat16>(a, st);
    case DType::kFloat64: return bm_merge_t<double>(a, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tokenreduce

// Torch-free host launchers of the recycle CUDA kernels (recycle_kernels.cuh).
#include "recycle_kernels.cuh"
#include "recycle_launch.h"

namespace tokenreduce {
namespace cuda {

long long recycle_plan_smem(int T) { return recycle::plan_smem_bytes(T); }

template <typename fscalar_t>
cudaError_t rc_assign_t(const RecycleArgs& a, cudaStream_t st) {
  typedef acc_t<fscalar_t> facc;
  const fscalar_t* f = static_cast<const fscalar_t*>(a.feats);
  facc* inv = static_cast<facc*>(a.inv);
  if (a.N == 0) return cudaSuccess;  // every position is invalid: the plan poisons the rows
  recycle::rc_inv_norm<fscalar_t><<<dim3(ceil_div(a.N, 8), a.B), 256, 0, st>>>(f, a.fsb, a.fsn, a.N,
                                                                               a.Df, inv);
  TR_CUDA_TRY(cudaGetLastError());
  if (a.S > 0) {
    recycle::rc_assign<fscalar_t><<<dim3(ceil_div(a.S, kTileM), a.B), kTileThreads, 0, st>>>(
        f, a.fsb, a.fsn, a.N, a.Df, inv, a.target, a.T, a.source, a.S, a.slot);
    TR_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename scalar_t>
cudaError_t rc_aggregate_t(const RecycleArgs& a, cudaStream_t st) {
  typedef acc_t<scalar_t> acc;
  constexpr int V = VecWidth<scalar_t>::value;
  const bool vec = vector_ok(a.x, a.xsb, a.xsn, a.D, sizeof(scalar_t)) && vector_ok(a.out, 0, a.D, a.D, sizeof(scalar_t));
  auto kern = vec ? recycle::rc_aggregate<scalar_t, V> : recycle::rc_aggregate<scalar_t, 1>;
  kern<<<dim3(a.T, a.B), 128, 0, st>>>(
      static_cast<const scalar_t*>(a.x), a.xsb, a.xsn, a.N, a.D, a.T, a.S, a.target,
      static_cast<const acc*>(a.weight), a.off, a.mem, a.bad, a.include_target,
      static_cast<scalar_t*>(a.out), static_cast<acc*>(a.wsum));
  return cudaGetLastError();
}

template cudaError_t rc_assign_t<float>(const RecycleArgs&, cudaStream_t);
template cudaError_t rc_assign_t<__half>(const RecycleArgs&, cudaStream_t);
template cudaError_t rc_assign_t<__nv_bfloat16>(const RecycleArgs&, cudaStream_t);
template cudaError_t rc_assign_t<double>(const RecycleArgs&, cudaStream_t);
template cudaError_t rc_aggregate_t<float>(const RecycleArgs&, cudaStream_t);
template cudaError_t rc_aggregate_t<__half>(const RecycleArgs&, cudaStream_t);
template cudaError_t rc_aggregate_t<__nv_bfloat16>(const RecycleArgs&, cudaStream_t);
template cudaError_t rc_aggregate_t<double>(const RecycleArgs&, cudaStream_t);

cudaError_t recycle_launch(DType x_dtype, DType feats_dtype, const RecycleArgs& a, cudaStream_t st) {
  if (a.B == 0) return cudaSuccess;
  if (a.feats != nullptr) {
    switch (feats_dtype) {
      case DType::kFloat32: TR_CUDA_TRY(rc_assign_t<float>(a, st)); break;
      case DType::kFloat16: TR_CUDA_TRY(rc_assign_t<__half>(a, st)); break;
      case DType::kBFloat16: TR_CUDA_TRY(rc_assign_t<__nv_bfloat16>(a, st)); break;
      case DType::kFloat64: TR_CUDA_TRY(rc_assign_t<double>(a, st)); break;
      default: return cudaErrorInvalidValue;
    }
  }
  const bool fd = feats_dtype == DType::kFloat64;
  const float* inv_f = (a.feats != nullptr && !fd) ? static_cast<const float*>(a.inv) : nullptr;
  const double* inv_d = (a.feats != nullptr && fd) ? static_cast<const double*>(a.inv) : nullptr;
  const long long smem = recycle::plan_smem_bytes(a.T);
  TR_CUDA_TRY(allow_dynamic_smem(recycle::rc_plan, smem));
  recycle::rc_plan<<<a.B, 512, smem, st>>>(a.target, a.source, a.slot, inv_f, inv_d, a.N, a.T, a.S,
                                           a.include_target, a.count, a.off, a.mem, a.bad);
  TR_CUDA_TRY(cudaGetLastError());
  if (a.T == 0) return cudaSuccess;
  switch (x_dtype) {
    case DType::kFloat32: return rc_aggregate_t<float>(a, st);
    case DType::kFloat16: return rc_aggregate_t<__half>(a, st);
    case DType::kBFloat16: return rc_aggregate_t<__nv_bfloat16>(a, st);
    case DType::kFloat64: return rc_aggregate_t<double>(a, st);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tokenreduce

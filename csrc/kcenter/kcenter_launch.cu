// Torch-free host launchers of the kcenter CUDA kernels (see kcenter_kernels.cuh); the
// geometry comes from make_kcenter_plan (kcenter_plan.h).
#include "kcenter_kernels.cuh"
#include "kcenter_launch.h"

namespace tokenreduce {
namespace cuda {

static_assert(kTileRows == kTileM && kTileBlock == kTileThreads, "launch_plan.h tiles = cuda_common.cuh tiles");

template <typename scalar_t>
cudaError_t kcenter_launch_t(const KcenterArgs& a, cudaStream_t st) {
  typedef acc_t<scalar_t> acc;
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  acc* sq = static_cast<acc*>(a.sq);
  acc* dist = static_cast<acc*>(a.dist);
  acc* mindist = static_cast<acc*>(a.mindist);
  if (a.B == 0 || a.N == 0 || a.k == 0) return cudaSuccess;
  const KcenterPlan p = make_kcenter_plan(a.B, a.N, a.D, sizeof(acc), a.isolated != 0);
  if (p.gram != (dist != nullptr)) return cudaErrorInvalidValue;
  TR_CUDA_TRY(launch_planned(p.sqnorm, st, kcenter::kcenter_sqnorm<scalar_t>, x, a.sb, a.sn, a.N, a.D, sq));
  if (p.gram) {
    TR_CUDA_TRY(launch_planned(p.tiles, st, kcenter::kcenter_gram<scalar_t>, x, a.sb, a.sn, a.N, a.D,
                               (const acc*)sq, a.cosine, dist));
    TR_CUDA_TRY(launch_planned(p.nn, st, kcenter::kcenter_nn_gram<acc>, (const acc*)dist, a.N, mindist));
    return launch_planned(p.select, st, kcenter::kcenter_select<scalar_t, false>, x, a.sb, a.sn, a.N, a.D,
                          (const acc*)sq, a.cosine, (const acc*)dist, a.k, a.first_int, a.first_index,
                          a.isolated, (const acc*)mindist, a.mask, a.index, mindist);
  }
  TR_CUDA_TRY(launch_planned(p.nn, st, kcenter::kcenter_nn_stream<scalar_t>, x, a.sb, a.sn, a.N, a.D,
                             (const acc*)sq, a.cosine, mindist));
  return launch_planned(p.select, st, kcenter::kcenter_select<scalar_t, true>, x, a.sb, a.sn, a.N, a.D,
                        (const acc*)sq, a.cosine, (const acc*)dist, a.k, a.first_int, a.first_index, a.isolated,
                        (const acc*)mindist, a.mask, a.index, mindist);
}

template cudaError_t kcenter_launch_t<float>(const KcenterArgs&, cudaStream_t);
template cudaError_t kcenter_launch_t<__half>(const KcenterArgs&, cudaStream_t);
template cudaError_t kcenter_launch_t<__nv_bfloat16>(const KcenterArgs&, cudaStream_t);
template cudaError_t kcenter_launch_t<double>(const KcenterArgs&, cudaStream_t);

cudaError_t kcenter_launch(DType dtype, const KcenterArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return kcenter_launch_t<float>(args, stream);
    case DType::kFloat16: return kcenter_launch_t<__half>(args, stream);
    case DType::kBFloat16: return kcenter_launch_t<__nv_bfloat16>(args, stream);
    case DType::kFloat64: return kcenter_launch_t<double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tokenreduce

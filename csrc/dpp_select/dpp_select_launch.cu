// Torch-free host launchers of the dpp_select CUDA kernels (see dpp_select_kernels.cuh); the
// geometry comes from make_dpp_select_plan (dpp_select_plan.h).
#include "dpp_select_kernels.cuh"
#include "dpp_select_launch.h"

namespace tokenreduce {
namespace cuda {

static_assert(kDppGreedyThreads == 512 && kDppGreedyThreads % 32 == 0, "dpp_greedy __launch_bounds__(512)");

template <typename scalar_t>
cudaError_t dpp_select_launch_t(const DppSelectArgs& a, cudaStream_t st) {
  typedef acc_t<scalar_t> acc;
  if (a.B == 0 || a.N == 0 || a.k == 0) return cudaSuccess;
  const scalar_t* x = static_cast<const scalar_t*>(a.features);
  const acc* rel = static_cast<const acc*>(a.relevance);
  acc* inv = static_cast<acc*>(a.inv);
  acc* diag = static_cast<acc*>(a.diag);
  const DppSelectPlan p = make_dpp_select_plan(a.B, a.N, a.D, a.k, sizeof(acc));
  TR_CUDA_TRY(launch_planned(p.norms, st, dpp::dpp_norms<scalar_t>, x, a.sb, a.sn, a.N, a.D, rel, inv, diag));
  return launch_planned(p.greedy, st, dpp::dpp_greedy<scalar_t>, x, a.sb, a.sn, a.N, a.D, a.k, rel, a.mask,
                        (const acc*)inv, (const acc*)diag, static_cast<acc*>(a.chol), a.index,
                        static_cast<acc*>(a.gains));
}

template cudaError_t dpp_select_launch_t<float>(const DppSelectArgs&, cudaStream_t);
template cudaError_t dpp_select_launch_t<__half>(const DppSelectArgs&, cudaStream_t);
template cudaError_t dpp_select_launch_t<__nv_bfloat16>(const DppSelectArgs&, cudaStream_t);
template cudaError_t dpp_select_launch_t<double>(const DppSelectArgs&, cudaStream_t);

cudaError_t dpp_select_launch(DType dtype, const DppSelectArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return dpp_select_launch_t<float>(args, stream);
    case DType::kFloat16: return dpp_select_launch_t<__half>(args, stream);
    case DType::kBFloat16: return dpp_select_launch_t<__nv_bfloat16>(args, stream);
    case DType::kFloat64: return dpp_select_launch_t<double>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace tokenreduce

// Torch-free host launchers of the kcenter CUDA kernels (see kcenter_kernels.cuh).
#include "kcenter_kernels.cuh"
#include "kcenter_launch.h"

namespace tokenreduce {
namespace cuda {

static int select_threads(int N, bool stream) {
  if (stream) return 1024;
  const int t = ((N + 31) / 32) * 32;
  return t < 64 ? 64 : (t > 1024 ? 1024 : t);
}

long long kcenter_select_smem(int N, int D, DType dtype, bool stream) {
  return kcenter::select_smem_bytes(N, D, acc_size(dtype), stream);
}

template <typename scalar_t>
cudaError_t kcenter_launch_t(const KcenterArgs& a, cudaStream_t st) {
  typedef acc_t<scalar_t> acc;
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  acc* sq = static_cast<acc*>(a.sq);
  acc* dist = static_cast<acc*>(a.dist);
  acc* mindist = static_cast<acc*>(a.mindist);
  const bool stream = dist == nullptr;
  if (a.B == 0 || a.N == 0 || a.k == 0) return cudaSuccess;
  const dim3 rows_grid(ceil_div(a.N, 8), a.B);
  kcenter::kcenter_sqnorm<scalar_t><<<rows_grid, 256, 0, st>>>(x, a.sb, a.sn, a.N, a.D, sq);
  TR_CUDA_TRY(cudaGetLastError());
  if (!stream) {
    const dim3 g(ceil_div(a.N, kTileM), ceil_div(a.N, kTileM), a.B);
    kcenter::kcenter_gram<scalar_t><<<g, kTileThreads, 0, st>>>(x, a.sb, a.sn, a.N, a.D, sq, a.cosine, dist);
    TR_CUDA_TRY(cudaGetLastError());
    if (a.isolated) {
      kcenter::kcenter_nn_gram<acc><<<rows_grid, 256, 0, st>>>(dist, a.N, mindist);
      TR_CUDA_TRY(cudaGetLastError());
    }
  } else if (a.isolated) {
    kcenter::kcenter_nn_stream<scalar_t><<<rows_grid, 256, 0, st>>>(x, a.sb, a.sn, a.N, a.D, sq,
                                                                   a.cosine, mindist);
    TR_CUDA_TRY(cudaGetLastError());
  }
  const long long smem = kcenter::select_smem_bytes(a.N, a.D, sizeof(acc), stream);
  const int threads = select_threads(a.N, stream);
  if (stream) {
    auto kern = kcenter::kcenter_select<scalar_t, true>;
    TR_CUDA_TRY(allow_dynamic_smem(kern, smem));
    kern<<<a.B, threads, smem, st>>>(x, a.sb, a.sn, a.N, a.D, sq, a.cosine, dist, a.k, a.first_int,
                                     a.first_index, a.isolated, mindist, a.mask, a.index, mindist);
  } else {
    auto kern = kcenter::kcenter_select<scalar_t, false>;
    TR_CUDA_TRY(allow_dynamic_smem(kern, smem));
    kern<<<a.B, threads, smem, st>>>(x, a.sb, a.sn, a.N, a.D, sq, a.cosine, dist, a.k, a.first_int,
                                     a.first_index, a.isolated, mindist, a.mask, a.index, mindist);
  }
  return cudaGetLastError();
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

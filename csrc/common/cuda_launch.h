// Host-side declarations shared by the torch-free CUDA launchers (csrc/<op>/<op>_launch.cu)
// and the torch glue (csrc/<op>/<op>_cuda.cpp). Only the CUDA runtime API; no torch.
#pragma once

#include <cuda_runtime_api.h>

#include "launch_plan.h"

namespace tokenreduce {
namespace cuda {

// Storage type of a floating tensor (the glue maps at::ScalarType to this).
enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline int acc_size(DType t) { return t == DType::kFloat64 ? 8 : 4; }

// Return the first CUDA error of `expr` from the enclosing launcher.
#define TR_CUDA_TRY(expr)                         \
  do {                                            \
    const cudaError_t tr_err_ = (expr);           \
    if (tr_err_ != cudaSuccess) return tr_err_;   \
  } while (0)

// Dynamic shared memory above the default 48 KiB needs an opt-in per kernel.
template <typename K>
inline cudaError_t allow_dynamic_smem(K kernel, long long bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Rows of D elements of `elem` bytes at base + b * sb + n * sn (element strides) can be read
// as 16-byte vectors: base aligned, both strides and D whole vectors.
inline bool vector_ok(const void* base, long long sb, long long sn, long long D, int elem) {
  const long long v = 16 / elem;
  return reinterpret_cast<unsigned long long>(base) % 16 == 0 && sb % v == 0 && sn % v == 0 && D % v == 0;
}

// The grid of a planned launch (csrc/common/launch_plan.h).
inline dim3 grid_of(const KernelLaunch& l) {
  return dim3(static_cast<unsigned>(l.grid_x), static_cast<unsigned>(l.grid_y), static_cast<unsigned>(l.grid_z));
}

#ifdef __CUDACC__
// Launch `kernel` with a planned geometry on `stream` (opting in to its shared memory) and
// return the launch error. A launch with grid_x == 0 is skipped.
template <typename K, typename... Args>
inline cudaError_t launch_planned(const KernelLaunch& l, cudaStream_t stream, K kernel, Args... args) {
  if (l.grid_x <= 0) return cudaSuccess;
  TR_CUDA_TRY(allow_dynamic_smem(kernel, l.smem));
  kernel<<<grid_of(l), l.block, l.smem, stream>>>(args...);
  return cudaGetLastError();
}
#endif

}  // namespace cuda
}  // namespace tokenreduce

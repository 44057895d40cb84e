// Helpers of the torch glue of the CUDA kernels (csrc/<op>/<op>_cuda.cpp): dtype mapping,
// CUDA error reporting with op-named messages, the device's shared-memory limit.
// Only compiled against a CUDA build of torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda_launch.h"

namespace tokenreduce {

inline cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kDouble: return cuda::DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "tokenreduce: unsupported dtype ", t.scalar_type());
  }
}

#define TR_CUDA_CHECK(op, expr)                                                         \
  do {                                                                                  \
    const cudaError_t tr_err_ = (expr);                                                 \
    TORCH_CHECK(tr_err_ == cudaSuccess, "tokenreduce." op ": CUDA kernel launch failed: ", \
                cudaGetErrorString(tr_err_));                                           \
  } while (0)

// Largest dynamic shared memory one block may opt in to on the tensor's device.
inline long long max_shared_memory_optin(const at::Tensor& t) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, t.get_device()) != cudaSuccess)
    return 48 * 1024;
  return v;
}

// int64 data as the kernels' `long long` (int64_t is `long` on LP64 Linux).
inline long long* i64_ptr(const at::Tensor& t) {
  static_assert(sizeof(long long) == sizeof(int64_t), "int64 size");
  return reinterpret_cast<long long*>(t.data_ptr<int64_t>());
}

// Sizes the kernels index with int.
inline void check_int_range(const char* op, const char* what, int64_t v) {
  TORCH_CHECK_VALUE(v >= 0 && v < (int64_t(1) << 31), "tokenreduce.", op, ": ", what, "=", v,
                    " is too large for the CUDA kernels");
}

}  // namespace tokenreduce

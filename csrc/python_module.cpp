// The Python module `tokenreduce._C`. Importing it loads the op library (the
// TORCH_LIBRARY registrations in registration.cpp and the kernels), and it
// exposes how the library was built.
#include <torch/extension.h>

namespace {
pybind11::dict build_info() {
  pybind11::dict info;
#if defined(_OPENMP)
  info["openmp"] = _OPENMP;
#else
  info["openmp"] = 0;
#endif
#if defined(__AVX512F__)
  info["simd"] = "avx512";
#elif defined(__AVX2__)
  info["simd"] = "avx2";
#elif defined(__ARM_NEON)
  info["simd"] = "neon";
#else
  info["simd"] = "baseline";
#endif
#if defined(TOKENREDUCE_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["compiler"] = __VERSION__;
  return info;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tokenreduce native ops (registered as torch.ops.tokenreduce.*)";
  m.def("build_info", &build_info, "How the native library was compiled.");
}

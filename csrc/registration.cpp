// Op schemas of the tokenreduce library (no Python here: the CMake build links
// this file and the kernels into a plain C++ library).
//
// Each op's kernels live in their own folder (csrc/<op>/<op>_cpu.cpp, and for CUDA
// <op>_cuda.cpp with the torch-free <op>_launch.cu) and register themselves for their
// dispatch key with TORCH_LIBRARY_IMPL, so a new backend is added beside the CPU one
// without touching callers. Fake (meta) kernels and autograd are registered in Python
// (tokenreduce/ops/<op>.py); tokenreduce/ops/registry.py lists the same ops (OPS, checked
// against this library by tests/test_registration.py).
#include <torch/library.h>

TORCH_LIBRARY(tokenreduce, m) {
  // out [B, H, Nq, Dv] (dtype of q), scores [B, Nk] (float32; float64 for float64 q)
  m.def(
      "attention_with_scores(Tensor q, Tensor k, Tensor v, float scale, bool causal, "
      "Tensor? key_bias, Tensor? score_rows) -> (Tensor out, Tensor scores)");
  // index [B, k] int64, mindist [B, N] float32
  m.def(
      "kcenter(Tensor x, int k, str metric, int first, Tensor? first_index, bool isolated, "
      "Tensor? mask) -> (Tensor index, Tensor mindist)");
  // merged [B, N - r, D], size [B, N - r] float32, source [B, N] int64
  m.def(
      "bipartite_merge(Tensor x, int r, Tensor? metric, Tensor? size, int protect, str order) "
      "-> (Tensor merged, Tensor size, Tensor source)");
  // out [B, T, D], count [B, T] int64, slot [B, S] int64 (the slot each source joined,
  // -1 = dropped), weight_sum [B, T] float32 (the denominators; used by the backward)
  m.def(
      "recycle(Tensor x, Tensor target, Tensor source, Tensor? weight, Tensor? assign, "
      "Tensor? features, str metric, bool include_target) "
      "-> (Tensor out, Tensor count, Tensor slot, Tensor weight_sum)");
  // out [B, M, Cv] (dtype of q), lse [B, M, heads] (float32; float64 for float64 q): every
  // query of a grid_h x grid_w grid attends to its own region x region window of each of
  // the L key levels (k [B, L, N, C], N = (region grid_h) (region grid_w)).
  m.def(
      "region_attention(Tensor q, Tensor k, Tensor v, int grid_h, int grid_w, int region, int heads, "
      "float scale) -> (Tensor out, Tensor lse)");
  // index [B, k] int64, gains [B, k] float32 (float64 for float64 features)
  m.def("dpp_select(Tensor features, int k, Tensor? relevance, Tensor? mask) -> (Tensor index, Tensor gains)");
}


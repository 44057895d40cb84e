// The Python module `tokenreduce._C`. Importing it loads the op library (the
// TORCH_LIBRARY registrations in registration.cpp and the kernels), and it exposes how
// the library was built and, in `_C.plans`, the CUDA launch plans of the ops.
//
// The plans come from the torch-free, CUDA-free plan headers (csrc/<op>/<op>_plan.h) that
// the CUDA launchers (csrc/<op>/<op>_launch.cu) launch from, so they compile in the
// CPU-only build too; the NVRTC fallback (tokenreduce/nvrtc) launches from them instead of
// re-deriving grids, blocks and shared memory in Python.
#include <torch/extension.h>

#include "attention_with_scores/attention_with_scores_plan.h"
#include "bipartite_merge/bf16_screen.h"
#include "bipartite_merge/bipartite_merge_plan.h"
#include "common/launch_plan.h"
#include "dpp_select/dpp_select_plan.h"
#include "kcenter/kcenter_plan.h"
#include "recycle/recycle_plan.h"
#include "region_attention/region_attention_plan.h"

namespace py = pybind11;

namespace {
py::dict build_info() {
  py::dict info;
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

// The CPU ops' bf16 screen on this machine (csrc/bipartite_merge/bf16_screen.h): the measured
// bf16 / float32 GEMM speedup (measured on the first call), the threshold, and the choice now.
py::dict bf16_screen() {
  using namespace tokenreduce::screen;
  py::dict d;
  d["speedup"] = bf16_speedup();
  d["min_speedup"] = kMinBf16Speedup;
  d["on"] = screen_pays();
  return d;
}

// Constants of the plan headers, per op (names without the leading k).
py::dict constants() {
  using namespace tokenreduce;
  py::dict common, kcenter, bipartite_merge, recycle, region_attention, attention, dpp_select, out;
  common["RowThreads"] = cuda::kRowThreads;
  common["RowsPerBlock"] = cuda::kRowsPerBlock;
  common["TileRows"] = cuda::kTileRows;
  common["TileBlock"] = cuda::kTileBlock;
  kcenter["KcenterGramBudget"] = cuda::kKcenterGramBudget;
  kcenter["KcenterSelectMaxThreads"] = cuda::kKcenterSelectMaxThreads;
  bipartite_merge["BmPlanThreads"] = cuda::kBmPlanThreads;
  bipartite_merge["BmMergeThreads"] = cuda::kBmMergeThreads;
  recycle["RcPlanThreads"] = cuda::kRcPlanThreads;
  recycle["RcAggregateThreads"] = cuda::kRcAggregateThreads;
  region_attention["RaThreads"] = cuda::kRaThreads;
  region_attention["RaWarps"] = cuda::kRaWarps;
  dpp_select["DppGreedyThreads"] = cuda::kDppGreedyThreads;
  attention["BQ"] = attn::kBQ;
  attention["BK"] = attn::kBK;
  attention["DvChunk"] = attn::kDvChunk;
  attention["Threads"] = attn::kThreads;
  attention["ScalarDChunk"] = attn::kScalarDChunk;
  attention["MaxHeadDim"] = attn::kMaxHeadDim;
  attention["RowPathMaxRows"] = attn::kRowPathMaxRows;
  attention["MaxGridYZ"] = attn::kMaxGridYZ;
  out["common"] = common;
  out["kcenter"] = kcenter;
  out["bipartite_merge"] = bipartite_merge;
  out["recycle"] = recycle;
  out["region_attention"] = region_attention;
  out["attention_with_scores"] = attention;
  out["dpp_select"] = dpp_select;
  return out;
}

void bind_plans(py::module_& m) {
  using namespace tokenreduce;
  py::class_<cuda::KernelLaunch>(m, "KernelLaunch", "One kernel launch: grid, block, dynamic shared memory.")
      .def_property_readonly("grid", [](const cuda::KernelLaunch& l) {
        return py::make_tuple(l.grid_x, l.grid_y, l.grid_z);
      }, "(x, y, z); x == 0: the step is not launched")
      .def_readonly("block", &cuda::KernelLaunch::block, "threads per block")
      .def_readonly("smem", &cuda::KernelLaunch::smem, "dynamic shared memory (bytes)")
      .def_property_readonly("launched", [](const cuda::KernelLaunch& l) { return l.grid_x > 0; })
      .def("__repr__", [](const cuda::KernelLaunch& l) {
        return "KernelLaunch(grid=(" + std::to_string(l.grid_x) + ", " + std::to_string(l.grid_y) + ", " +
               std::to_string(l.grid_z) + "), block=" + std::to_string(l.block) +
               ", smem=" + std::to_string(l.smem) + ")";
      });

  py::class_<cuda::KcenterPlan>(m, "KcenterPlan")
      .def_readonly("gram", &cuda::KcenterPlan::gram)
      .def_readonly("sqnorm", &cuda::KcenterPlan::sqnorm)
      .def_readonly("tiles", &cuda::KcenterPlan::tiles)
      .def_readonly("nn", &cuda::KcenterPlan::nn)
      .def_readonly("select", &cuda::KcenterPlan::select);
  m.def("kcenter", &cuda::make_kcenter_plan, py::arg("B"), py::arg("N"), py::arg("D"), py::arg("acc_size"),
        py::arg("isolated"), py::arg("gram_budget") = cuda::kKcenterGramBudget,
        "make_kcenter_plan (csrc/kcenter/kcenter_plan.h)");

  py::class_<cuda::BipartiteMergePlan>(m, "BipartiteMergePlan")
      .def_readonly("na", &cuda::BipartiteMergePlan::na)
      .def_readonly("nb", &cuda::BipartiteMergePlan::nb)
      .def_readonly("no", &cuda::BipartiteMergePlan::no)
      .def_readonly("members", &cuda::BipartiteMergePlan::members)
      .def_readonly("inv_norm", &cuda::BipartiteMergePlan::inv_norm)
      .def_readonly("match", &cuda::BipartiteMergePlan::match)
      .def_readonly("plan", &cuda::BipartiteMergePlan::plan)
      .def_readonly("merge", &cuda::BipartiteMergePlan::merge);
  m.def("bipartite_merge", &cuda::make_bipartite_merge_plan, py::arg("B"), py::arg("N"), py::arg("r"),
        py::arg("metric_acc_size"), "make_bipartite_merge_plan (csrc/bipartite_merge/bipartite_merge_plan.h)");

  py::class_<cuda::RecyclePlan>(m, "RecyclePlan")
      .def_readonly("members", &cuda::RecyclePlan::members)
      .def_readonly("inv_norm", &cuda::RecyclePlan::inv_norm)
      .def_readonly("assign", &cuda::RecyclePlan::assign)
      .def_readonly("plan", &cuda::RecyclePlan::plan)
      .def_readonly("aggregate", &cuda::RecyclePlan::aggregate);
  m.def("recycle", &cuda::make_recycle_plan, py::arg("B"), py::arg("N"), py::arg("T"), py::arg("S"),
        py::arg("similarity"), "make_recycle_plan (csrc/recycle/recycle_plan.h)");

  py::class_<cuda::RegionAttentionPlan>(m, "RegionAttentionPlan")
      .def_readonly("keys", &cuda::RegionAttentionPlan::keys)
      .def_readonly("forward", &cuda::RegionAttentionPlan::forward);
  m.def("region_attention", &cuda::make_region_attention_plan, py::arg("B"), py::arg("M"), py::arg("heads"),
        py::arg("L"), py::arg("region"), py::arg("acc_size"),
        "make_region_attention_plan (csrc/region_attention/region_attention_plan.h)");
  py::class_<cuda::DppSelectPlan>(m, "DppSelectPlan")
      .def_readonly("norms", &cuda::DppSelectPlan::norms)
      .def_readonly("greedy", &cuda::DppSelectPlan::greedy);
  m.def("dpp_select", &cuda::make_dpp_select_plan, py::arg("B"), py::arg("N"), py::arg("D"), py::arg("k"),
        py::arg("acc_size"), "make_dpp_select_plan (csrc/dpp_select/dpp_select_plan.h)");

  py::class_<attn::Plan>(m, "AttentionPlan")
      .def_readonly("kc", &attn::Plan::kc)
      .def_readonly("nqb", &attn::Plan::nqb)
      .def_readonly("nkt", &attn::Plan::nkt)
      .def_readonly("multi_chunk", &attn::Plan::multi_chunk)
      .def_readonly("scores_in_fwd", &attn::Plan::scores_in_fwd)
      .def_readonly("colscore", &attn::Plan::colscore)
      .def_readonly("fwd_smem", &attn::Plan::fwd_smem)
      .def_readonly("colscore_smem", &attn::Plan::colscore_smem)
      .def_readonly("partial_rows", &attn::Plan::partial_rows)
      .def_readonly("need_lse", &attn::Plan::need_lse)
      .def_readonly("need_oacc", &attn::Plan::need_oacc)
      .def_readonly("ok", &attn::Plan::ok)
      .def_readonly("threads", &attn::Plan::threads)
      .def_readonly("reduce_blocks", &attn::Plan::reduce_blocks);
  m.def("attention_with_scores", &attn::make_plan, py::arg("dtype"), py::arg("H"), py::arg("Nq"), py::arg("Nk"),
        py::arg("Dh"), py::arg("Dv"), py::arg("R"), py::arg("smem_optin"),
        "make_plan (csrc/attention_with_scores/attention_with_scores_plan.h); dtype: a DTYPE_CODES value, "
        "R: the number of score rows (-1: every row)");

  py::dict codes;
  codes["float32"] = (int)attn::kFloat32;
  codes["float16"] = (int)attn::kFloat16;
  codes["bfloat16"] = (int)attn::kBFloat16;
  codes["float64"] = (int)attn::kFloat64;
  m.attr("DTYPE_CODES") = codes;
  m.def("constants", &constants, "The constants of the plan headers, per op.");
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tokenreduce native ops (registered as torch.ops.tokenreduce.*)";
  m.def("build_info", &build_info, "How the native library was compiled.");
  m.def("bf16_screen", &bf16_screen,
        "The CPU ops' bf16 screen: measured bf16/float32 GEMM speedup, threshold, whether it is on.");
  py::module_ plans = m.def_submodule("plans", "CUDA launch plans of the ops (csrc/<op>/<op>_plan.h).");
  bind_plans(plans);
}

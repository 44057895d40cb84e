// attention_with_scores on CUDA: torch glue around the torch-free launcher
// (attention_with_scores_launch.cu, kernels in attention_with_scores_kernels.cuh).
//
// Same checks and messages as the CPU kernel. No host sync: score_rows is only read on
// the device. Difference from the CPU op: an out-of-range score_rows entry cannot raise
// IndexError without a device-to-host copy, so the CUDA kernels ignore it (it adds
// nothing to the scores and still counts in the 1 / (H * R) denominator).
// Never allocates [B, H, Nq, Nk]: workspaces are the partial column sums [B, P, Nk]
// (P = H * ceil(Nq / 64) or H), the LSE [B, H, Nq] and, for long keys only, an fp32 copy
// of the output [B, H, Nq, Dv].
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/cpu_utils.h"
#include "../common/cuda_glue.h"
#include "attention_with_scores_checks.h"
#include "attention_with_scores_launch.h"

namespace tokenreduce {
namespace {

constexpr const char* kOp = "attention_with_scores";

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return attn::kFloat32;
    case at::kHalf: return attn::kFloat16;
    case at::kBFloat16: return attn::kBFloat16;
    case at::kDouble: return attn::kFloat64;
    default: return -1;
  }
}

std::tuple<at::Tensor, at::Tensor> attention_with_scores_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
    bool causal, const std::optional<at::Tensor>& key_bias,
    const std::optional<at::Tensor>& score_rows) {
  const AttentionShape sh = check_attention_args(q_in, k_in, v_in, key_bias, score_rows);
  const int64_t B = sh.B, H = sh.H, Nq = sh.Nq, Dh = sh.Dh, Hkv = sh.Hkv, Nk = sh.Nk, Dv = sh.Dv;
  // limits of the CUDA kernels
  TR_CHECK_VALUE("attention_with_scores", Dh >= 1 && Dh <= attn::kMaxHeadDim && Dv >= 1 &&
                     Dv <= attn::kMaxHeadDim,
                 "the CUDA kernel supports head dims 1..", attn::kMaxHeadDim, ", got Dh = ", Dh,
                 " and Dv = ", Dv);
  TR_CHECK_VALUE("attention_with_scores", B <= attn::kMaxGridYZ && H <= attn::kMaxGridYZ,
                 "the CUDA kernel supports at most ", attn::kMaxGridYZ, " batch rows and heads, got B = ",
                 B, ", H = ", H);
  TR_CHECK_VALUE("attention_with_scores", Nq < (int64_t(1) << 31) && Nk < (int64_t(1) << 31),
                 "sequence lengths must be below 2^31, got Nq = ", Nq, ", Nk = ", Nk);
  const int dtype = dtype_code(q_in.scalar_type());
  TR_CHECK_TYPE("attention_with_scores", dtype >= 0, "unsupported dtype ", q_in.scalar_type());

  const auto acc_dtype = at::toOpMathType(q_in.scalar_type());
  at::Tensor bias;
  if (key_bias.has_value()) {
    bias = key_bias->to(acc_dtype).contiguous();
  }
  at::Tensor rows;
  int64_t R = -1;  // -1: every row is scored
  if (score_rows.has_value()) {
    check_device(kOp, "score_rows", *score_rows, q_in);
    TR_CHECK_VALUE("attention_with_scores", score_rows->numel() < (int64_t(1) << 31),
                   "score_rows is too long (", score_rows->numel(), " entries)");
    rows = score_rows->contiguous();
    R = rows.numel();
  }

  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
                   v = last_dim_contiguous(v_in);
  at::Tensor out = at::empty({B, H, Nq, Dv}, q.options());
  if (B * H * Nq == 0) return {out, at::zeros({B, Nk}, q.options().dtype(acc_dtype))};
  at::Tensor scores = at::empty({B, Nk}, q.options().dtype(acc_dtype));

  const long long smem_optin = max_shared_memory_optin(q_in);
  const attn::Plan plan = attn::make_plan(dtype, (int)H, (int)Nq, (int)Nk, (int)Dh, (int)Dv, R, smem_optin);
  TR_CHECK_VALUE("attention_with_scores", plan.ok, "head dims Dh = ", Dh, ", Dv = ", Dv,
                 " do not fit in this GPU's shared memory (", smem_optin, " bytes per block)");
  at::Tensor partial = at::empty({B, plan.partial_rows, Nk}, q.options().dtype(acc_dtype));
  at::Tensor lse, oacc;
  if (plan.need_lse) lse = at::empty({B, H, Nq}, q.options().dtype(acc_dtype));
  if (plan.need_oacc) oacc = at::empty({B, H, Nq, Dv}, q.options().dtype(acc_dtype));

  const long long qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const long long ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const long long vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const cudaError_t err = attn::launch(
      dtype, plan, q.data_ptr(), k.data_ptr(), v.data_ptr(), qs, ks, vs,
      bias.defined() ? bias.data_ptr() : nullptr,
      rows.defined() ? reinterpret_cast<const long long*>(rows.data_ptr<int64_t>()) : nullptr, R < 0 ? 0 : R, (int)B, (int)H, (int)Hkv, (int)Nq,
      (int)Nk, (int)Dh, (int)Dv, scale, causal, out.data_ptr(), scores.data_ptr(), partial.data_ptr(),
      lse.defined() ? lse.data_ptr() : nullptr, oacc.defined() ? oacc.data_ptr() : nullptr,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "tokenreduce.attention_with_scores: CUDA launch failed: ",
              cudaGetErrorString(err));
  return {out, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenreduce, CUDA, m) {
  m.impl("attention_with_scores", &attention_with_scores_cuda);
}

}  // namespace tokenreduce

// Argument checks of attention_with_scores shared by the CPU and CUDA kernels (same
// messages on every device). Device-specific limits stay in the kernels' files.
#pragma once

#include <optional>

#include "../common/cpu_utils.h"

namespace tokenreduce {

struct AttentionShape {
  int64_t B, H, Nq, Dh, Hkv, Nk, Dv;
};

// q [B, H, Nq, Dh], k [B, Hkv, Nk, Dh], v [B, Hkv, Nk, Dv] (one dtype, one device, H % Hkv == 0,
// Nk > 0), key_bias [B, Nk] float, score_rows a non-empty 1-D int64 tensor.
inline AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& key_bias,
                                           const std::optional<at::Tensor>& score_rows) {
  constexpr const char* op = "attention_with_scores";
  check_dim(op, "q", q, 4, "[B, H, Nq, Dh]");
  check_dim(op, "k", k, 4, "[B, Hkv, Nk, Dh]");
  check_dim(op, "v", v, 4, "[B, Hkv, Nk, Dv]");
  check_float(op, "q", q);
  TR_CHECK_TYPE("attention_with_scores",
                k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                "q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ",
                v.scalar_type());
  check_device(op, "k", k, q);
  check_device(op, "v", v, q);
  const AttentionShape s{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2), v.size(3)};
  TR_CHECK_VALUE("attention_with_scores", k.size(0) == s.B && v.size(0) == s.B,
                 "batch sizes differ: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TR_CHECK_VALUE("attention_with_scores", k.size(3) == s.Dh, "k's head dim ", k.size(3),
                 " differs from q's ", s.Dh);
  TR_CHECK_VALUE("attention_with_scores", v.size(1) == s.Hkv && v.size(2) == s.Nk,
                 "v ", v.sizes(), " must match k ", k.sizes(), " in heads and keys");
  TR_CHECK_VALUE("attention_with_scores", s.Hkv > 0 && s.H % s.Hkv == 0, "q's heads (", s.H,
                 ") must be a multiple of k's heads (", s.Hkv, ")");
  TR_CHECK_VALUE("attention_with_scores", s.Nk > 0, "k must hold at least one key");
  if (key_bias.has_value()) {
    check_float(op, "key_bias", *key_bias);
    check_device(op, "key_bias", *key_bias, q);
    TR_CHECK_VALUE("attention_with_scores",
                   key_bias->dim() == 2 && key_bias->size(0) == s.B && key_bias->size(1) == s.Nk,
                   "key_bias must have shape [B, Nk] = [", s.B, ", ", s.Nk, "], got ", key_bias->sizes());
  }
  if (score_rows.has_value()) {
    check_long(op, "score_rows", *score_rows);
    TR_CHECK_VALUE("attention_with_scores", score_rows->dim() == 1 && score_rows->numel() > 0,
                   "score_rows must be a non-empty 1-D tensor of query positions, got shape ",
                   score_rows->sizes());
  }
  return s;
}

}  // namespace tokenreduce

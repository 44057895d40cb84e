"""The "tokenreduce" attention implementation against sdpa (outputs) and eager (scores)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenreduce.models import attention


class _Mod(nn.Module):
    def __init__(self, causal, groups):
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups
        self._tokenreduce_part, self._tokenreduce_layer = "llm", 3


def _eager(q, k, v, causal, bias):
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, 1)
    v = v.repeat_interleave(H // Hkv, 1)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    Nq, Nk = logits.shape[-2:]
    if causal:
        logits = logits.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq).logical_not(), float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2), p


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad", [False, True])
def test_outputs_match_sdpa_and_scores_match_eager(gen, causal, pad):
    B, H, Hkv, N, Dh = 2, 4, 2, 13, 8
    q, k, v = (torch.randn(B, h, N, Dh, generator=gen) for h in (H, Hkv, Hkv))
    m = _Mod(causal, H // Hkv)
    mask = None
    bias = None
    if pad:   # left padding of 3 tokens in row 1, as transformers builds it with the tokenreduce mask fn
        valid = torch.ones(B, N, dtype=torch.bool)
        valid[1, :3] = False
        mask = attention.tokenreduce_mask(B, N, N,
                                          mask_function=__import__("transformers").masking_utils.causal_mask_function,
                                          attention_mask=valid)
        assert mask.shape == (B, 1, 1, N)
        bias = torch.zeros(B, N).masked_fill(~valid, float("-inf"))
    rec = attention.ScoreRecorder()
    rec.request("llm", 3, attention.KINDS)
    with attention.recording(rec):
        out, w = attention.tokenreduce_attention(m, q, k, v, mask)
    assert w is None and rec.calls["fused"] == 1 and not rec.fallbacks
    ref_out, p = _eager(q, k, v, causal, bias)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    recv = p.mean(1).sum(1) / N                           # mean over heads and rows
    cls = p[:, :, 0].mean(1)
    last = p[:, :, -1].mean(1)
    torch.testing.assert_close(rec.get("cls", "llm", 3), cls, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(rec.get("query", "llm", 3), last, atol=2e-5, rtol=1e-4)
    if not pad:   # every row admissible: the mean over rows is the plain mean
        torch.testing.assert_close(rec.get("received", "llm", 3), recv, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(rec.get("keys", "llm", 3), k.mean(1))
    torch.testing.assert_close(rec.get("values", "llm", 3), v.transpose(1, 2).reshape(B, N, -1))
    # nothing requested: the sdpa path, same output
    with attention.recording(attention.ScoreRecorder()) as r2:
        out2, _ = attention.tokenreduce_attention(m, q, k, v, mask)
    assert r2.calls["sdpa"] == 1
    torch.testing.assert_close(out2, ref_out, atol=2e-5, rtol=1e-4)


def test_key_bias_from_recorder_and_inexpressible_mask_fallback(gen):
    B, H, N, Dh = 2, 2, 9, 8
    q, k, v = (torch.randn(B, H, N, Dh, generator=gen) for _ in range(3))
    m = _Mod(False, 1)
    m._tokenreduce_part, m._tokenreduce_layer = "vision", 0
    size = torch.randint(1, 4, (B, N), generator=gen).float()
    rec = attention.ScoreRecorder()
    rec.request("vision", 0, ["cls"])
    rec.key_bias["vision"] = size.log()
    with attention.recording(rec):
        out, _ = attention.tokenreduce_attention(m, q, k, v, None)
    ref, p = _eager(q, k, v, False, size.log())
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(rec.get("cls", "vision", 0), p[:, :, 0].mean(1), atol=2e-5, rtol=1e-4)
    # a full [B, 1, N, N] mask cannot be a key bias: sdpa output, plain-torch row scores, counted
    full = torch.rand(B, 1, N, N, generator=gen) > 0.3
    full[..., 0] = True
    rec = attention.ScoreRecorder()
    rec.request("vision", 0, ["cls"])
    with attention.recording(rec):
        out, _ = attention.tokenreduce_attention(m, q, k, v, full)
    assert rec.fallbacks and rec.calls["sdpa"] == 1
    logits = (q @ k.transpose(-1, -2)) * Dh ** -0.5
    p = torch.softmax(logits.masked_fill(~full, float("-inf")), -1)
    torch.testing.assert_close(out, (p @ v).transpose(1, 2), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(rec.get("cls", "vision", 0), p[:, :, 0].mean(1), atol=2e-5, rtol=1e-4)


def test_training_falls_back_to_sdpa_and_says_so(gen):
    B, H, N, Dh = 1, 2, 5, 4
    q, k, v = (torch.randn(B, H, N, Dh, generator=gen, requires_grad=True) for _ in range(3))
    m = _Mod(False, 1)
    rec = attention.ScoreRecorder()
    rec.request("llm", 3, ["received"])
    with attention.recording(rec):
        out, _ = attention.tokenreduce_attention(m, q, k, v, None)
    out.sum().backward()
    assert q.grad is not None
    assert any("training" in r for r in rec.fallbacks)
    assert rec.get("received", "llm", 3).shape == (B, N)


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown score kind"):
        attention.ScoreRecorder().request("llm", 0, ["nope"])

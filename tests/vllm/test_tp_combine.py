"""Tensor parallel: statistics from head-sharded attention combined across ranks equal the
statistics of the whole layer. The ranks are simulated (the q/k/v heads split as vLLM's
QKVParallelLinear splits them, the all-reduce a sum over the ranks), so this runs without vLLM
(and in the main suite); tests/vllm/test_tp.py runs tensor_parallel_size=2 in vLLM itself."""
import pytest
import torch

from tokenreduce.models import attention
from tokenreduce.ops import attention_with_scores
from tokenreduce.vllm.tower import ScoredEncoderAttention, combine_head_shards


def shards(t, tp):
    """[B, H, N, D] -> tp tensors of the contiguous head ranges each rank holds."""
    return list(t.chunk(tp, dim=1))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("rows", [[0], None])
def test_weighted_all_reduce_of_partial_head_means_is_the_full_head_mean(tp, rows):
    g = torch.Generator().manual_seed(tp)
    B, H, N, Dh = 2, 8, 37, 16
    q, k, v = (torch.randn(B, H, N, Dh, generator=g) for _ in range(3))
    _, full = attention_with_scores(q, k, v, score_rows=rows)
    partial = [attention_with_scores(qs, ks, vs, score_rows=rows)[1]
               for qs, ks, vs in zip(shards(q, tp), shards(k, tp), shards(v, tp))]
    # what each rank sends into the all-reduce, then the sum the all-reduce returns
    sent = []
    combine_head_shards(partial[0], H // tp, H, all_reduce=lambda x: sent.append(x) or x)
    for p in partial[1:]:
        combine_head_shards(p, H // tp, H, all_reduce=lambda x: sent.append(x) or x)
    combined = torch.stack(sent).sum(0)
    torch.testing.assert_close(combined, full, rtol=1e-5, atol=1e-6)
    keys_full = k.float().mean(dim=1)
    keys = torch.stack([combine_head_shards(ks.float().mean(dim=1), H // tp, H, all_reduce=lambda x: x)
                        for ks in shards(k, tp)]).sum(0)
    torch.testing.assert_close(keys, keys_full, rtol=1e-5, atol=1e-6)


def test_one_rank_holding_every_head_is_left_alone():
    s = torch.rand(2, 5)
    assert combine_head_shards(s, 4, 4, all_reduce=lambda x: 1 / 0) is s


class _Inner(torch.nn.Module):
    def __init__(self, heads, dh):
        super().__init__()
        self.num_heads, self.head_size, self.scale = heads, dh, dh ** -0.5

    def forward(self, q, k, v):
        B, N, _ = q.shape
        qh, kh, vh = (t.reshape(B, N, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(B, N, -1)


def test_scored_attention_on_head_shards_records_the_full_layer_statistics(monkeypatch):
    """Two simulated ranks, each a ScoredEncoderAttention over its half of the heads; the
    all-reduce sums what the ranks send: the recorded cls / keys equal the unsharded layer's."""
    import tokenreduce.vllm.tower as tower
    g = torch.Generator().manual_seed(0)
    B, H, N, Dh, tp = 2, 4, 17, 8, 2
    q, k, v = (torch.randn(B, N, H * Dh, generator=g) for _ in range(3))

    def record(mod, qq, kk, vv):
        rec = attention.ScoreRecorder()
        rec.request("vision", 0, ["cls", "keys"])
        mod._tokenreduce_part, mod._tokenreduce_layer = "vision", 0
        with attention.recording(rec):
            out = mod(qq, kk, vv)
        return out, rec

    out_full, rec_full = record(ScoredEncoderAttention(_Inner(H, Dh), H), q, k, v)
    sent = {"cls": [], "keys": []}
    outs = []
    monkeypatch.setattr(tower, "combine_head_shards",   # keys are [B, N, Dh], scores [B, N]
                        lambda p, lh, th: sent["keys" if p.dim() == 3 else "cls"].append(p * lh / th) or p)
    for r in range(tp):
        sl = slice(r * H // tp * Dh, (r + 1) * H // tp * Dh)
        o, _ = record(ScoredEncoderAttention(_Inner(H // tp, Dh), H), q[..., sl], k[..., sl], v[..., sl])
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=-1), out_full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(sent["cls"]), rec_full.get("cls", "vision", 0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(sent["keys"]), rec_full.get("keys", "vision", 0), rtol=1e-5, atol=1e-6)

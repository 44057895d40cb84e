import os
import sys
import pytest
import torch

from tokenreduce import methods
from tokenreduce.testing.authors.feather import feather_ours, feather_stage1_authors, feather_stage2_authors
from tokenreduce.testing.synthetic import drop_image_tokens, llm_inputs
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # method_checks, whatever the import mode
from method_checks import LOW, check_errors, check_reduction, overlap


def grid_free_inputs(B, seed, D=256, H=8, Dh=32):
    """Inputs whose top int(0.3 N) no-RoPE attention avoids the stride-3 grid (tie-free), so the
    authors' union has the static size the method keeps."""
    d = llm_inputs(B, 576, D=D, H=H, Dh=Dh, seed=seed)
    g = torch.arange(576)
    grid = ((g // 24) % 3 == 0) & ((g % 24) % 3 == 0)
    st = d["start"]
    k = d["k"].clone()
    # push grid keys away from the last query: their attention becomes the smallest
    q_last = d["q"][:, :, -1:, :]
    k[:, :, st:st + 576][:, :, grid] -= 3.0 * q_last / q_last.norm(dim=-1, keepdim=True)
    d["k"] = k
    return d


@pytest.mark.parametrize("B", [1, 3])
def test_matches_authors_both_stages(B):
    d = grid_free_inputs(B, seed=30 + B)
    m = methods.build("feather")
    state: dict = {}
    red1 = feather_ours(d, 8, m, state)
    auth1 = feather_stage1_authors(d["q"], d["k"], d["start"], 576)
    assert all(a.numel() == 172 + 64 for a in auth1)
    check_reduction(red1, B, 576, 236, 256)
    assert torch.equal(red1.index, torch.stack(auth1))
    d2 = drop_image_tokens(d, red1.index, seed=77)
    red2 = feather_ours(d2, 16, m, state)
    auth2 = feather_stage2_authors(d2["q"], d2["k"], d2["start"], 236)
    assert red2.index.shape == (B, int(236 * 0.09)) and torch.equal(red2.index, auth2)


def test_grid_overlap_keeps_static_count():
    d = llm_inputs(2, 576, seed=4)                      # top tokens may fall on the grid
    red = feather_ours(d, 8, methods.build("feather"), {})
    auth = feather_stage1_authors(d["q"], d["k"], d["start"], 576)
    assert red.index.shape[1] == 236
    for b in range(2):                                  # the authors' set is contained in ours
        assert set(auth[b].tolist()) <= set(red.index[b].tolist())


def test_batch_equals_per_sample():
    d = grid_free_inputs(3, seed=6, D=64, H=4, Dh=16)
    full = feather_ours(d, 8, methods.build("feather"), {})
    for b in range(3):
        one = feather_ours({k: (v[b:b + 1] if torch.is_tensor(v) else v) for k, v in d.items()}, 8, methods.build("feather"), {})
        assert torch.equal(one.index, full.index[b:b + 1])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision(dtype):
    d = grid_free_inputs(2, seed=7, D=64, H=4, Dh=32)
    ref = feather_ours(d, 8, methods.build("feather"), {})
    lo = {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in d.items()}
    red = feather_ours(lo, 8, methods.build("feather"), {})
    assert red.tokens.dtype == dtype and overlap(red.index, ref.index) >= 0.9


def test_declarations():
    m = methods.build("feather")
    assert m.reduce_layers(32) == [7, 15] and m.attention_layers(32) == [8, 16]
    assert m.stage_counts(576) == [236, 21] and m.keep_tokens(576) == 21
    assert {methods.Need.QUERY_ATTN_NOROPE, methods.Need.LOOKAHEAD} <= m.needs
    assert methods.build("feather", keep=192).stage_counts(576)[0] == 192 + 64
    with pytest.raises(ValueError, match="feather"):
        methods.build("feather", layers=(8,))


def test_errors():
    x = torch.randn(1, 576, 16)
    check_errors("feather", lambda: methods.Context(x=x, layer=7, state={}))
    with pytest.raises(ValueError, match="feather"):
        methods.build("feather")(methods.Context(x=x[:, :236], query_attn_norope={16: torch.rand(1, 236)}, layer=15, state={}))

"""Issue 14 audit: each method's budget as the authors' entry point states it maps to the
tokens their code hands the LLM (docs/FAITHFULNESS.md). One pin per audited method whose
budget arithmetic is not already pinned by its own test file."""
import pytest
import torch

from tokenreduce.methods import Context, build
from tokenreduce.testing.authors.divprune import divprune_entry
from tokenreduce.testing.synthetic import clip_like


@pytest.mark.parametrize("ratio", [0.098, 0.111, 0.222, 0.333])
def test_divprune_subset_ratio(ratio):
    """DivPrune: SUBSET_RATIO=r keeps int(round(r * 576)) projected features, spatial order."""
    x = clip_like(1, 576, 64, seed=3, layers=()).x[:, 1:]
    m = build("divprune", ratio=ratio)
    assert m.keep_tokens(576) == int(round(ratio * 576))
    torch.testing.assert_close(m(Context(x=x)).tokens, divprune_entry(x, ratio), rtol=0, atol=0)


def test_fastv_attention_rank_and_layer():
    """FastV (modeling_llama.py inplace): fast_v_agg_layer=K prunes before layer K with layer
    K-1's attention, fast_v_attention_rank=keep tokens stay; R drops round(N R) (the paper)."""
    m = build("fastv", keep=288)
    assert m.reduce_layers(32) == [1] and m.attention_layers(32) == [1] and m.keep_tokens(576) == 288
    assert build("fastv", R=0.75).keep_tokens(576) == 144


def test_pdrop_stage_counts():
    """PyramidDrop: layer_list [8,16,24], image_token_ratio_list [0.5,0.25,0.125]: int(576 * ratio)."""
    m = build("pdrop")
    assert m.stage_counts(576) == [288, 144, 72]
    assert m.reduce_layers(32) == [7, 15, 23] and m.attention_layers(32) == [8, 16, 24]


@pytest.mark.parametrize("name", ["fastervlm", "vispruner", "holov"])
def test_patch_select_methods_drop_cls(name):
    """FasterVLM / VisPruner / HoloV use feature_select 'patch' ([CLS] dropped): the LLM gets keep tokens."""
    m = build(name, keep=64)
    assert not m.projects_cls and m.keep_tokens(576) == 64


def test_prumerge_plus_counts_the_extra_token():
    """PruMerge+: the tower returns kept tokens + one extra token, no [CLS]: keep counts the extra."""
    m = build("prumerge+", keep=64)
    assert not m.projects_cls and m.keep_tokens(576) == 64


def test_visionzip_counts_cls():
    """VisionZip: visionzip(model, 54, 10) -> [CLS] + 53 + 10 into the projector (issue 14)."""
    m = build("visionzip", keep=64)
    assert m.projects_cls and m.keep_tokens(576) == 63


def test_tome_parse_r_constant():
    """ToMe: apply_patch + model.r = r -> parse_r(len(blocks), r) = [r] * L, each block merging
    min(r, (t - protected) // 2) with [CLS] protected."""
    m = build("tome", r=16)
    assert m.keep_tokens(576) == 576 - 24 * 16
    n = 576
    for _ in range(24):
        n -= min(200, n // 2)
    assert build("tome", r=200).keep_tokens(576) == n

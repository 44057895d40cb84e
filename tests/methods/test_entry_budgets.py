"""Issue 14 audit: each method's budget as the authors' entry point states it maps to the
tokens their code hands the LLM (docs/FAITHFULNESS.md). One pin per audited method whose
budget arithmetic is not already pinned by its own test file."""
import pytest
import torch

from tokenreduce.methods import Context, build, get
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


def test_hiprune_retention_is_per_batch():
    """HiPrune (llava_arch.py encode_images): HIPRUNE_RETENTION=R over the B concatenated rows
    keeps int(R / B) per row; keep=K here is per row, so keep=int(R / B) gives the authors' tokens
    (LLaVA-1.5: B = 1, keep = R; LLaVA-NeXT: pass R // crops)."""
    from tokenreduce.testing.authors.eager_attention import eager_vit_probs
    from tokenreduce.testing.authors.hiprune import hiprune_entry, hiprune_ours
    from tokenreduce.testing.synthetic import vit_layer_qkv
    B, N, R = 3, 65, 48
    x = torch.randn(B, N, 32, generator=torch.Generator().manual_seed(4))
    sh, dp = vit_layer_qkv(B, N, 4, 8, 5), vit_layer_qkv(B, N, 4, 8, 6)
    auth = hiprune_entry(x[:, 1:], eager_vit_probs(*sh[:2]), eager_vit_probs(*dp[:2]), R)
    red = hiprune_ours(x, sh, dp, R // B)
    assert auth.shape == (B, R // B) and torch.equal(red.index[:, 1:] - 1, auth)
    assert build("hiprune", keep=192).keep_tokens(576) == 192 and "int(R / B)" in get("hiprune").deviations


def test_flowcut_target_counts_cls():
    """FlowCut (flowcut/main.py): flowcut(model, target_num=K) hands the encoder target K + 1
    ([CLS] kept inside the ViT, dropped by feature_select 'patch'): keep=K image tokens."""
    from tokenreduce.testing.authors.flowcut import flowcut_entry_target
    for k in (192, 128, 64):
        assert flowcut_entry_target(k) - 1 == k == build("flowcut", keep=k).schedule(576, 24)[-1]
    assert flowcut_entry_target(128, anyres=True) == 65 and "anyres" in get("flowcut").deviations


def test_dart_token_topk_counts():
    """DART (get_retained_image_token; scripts/v1_5/eval/<bench>.sh R M): TOKEN_TOPK =
    ceil((M or N (1 - R)) // 8) neighbours per pivot, 4 image pivots kept: `0.778 128` hands on
    4 + 8 * 16 = 132 image tokens; keep=132 gives every pivot the same 16."""
    from tokenreduce.methods.dart import pivot_quota
    from tokenreduce.testing.authors.dart import dart_entry_keep, dart_token_topk
    assert dart_token_topk(576, 0.778, 128) == 16 and dart_entry_keep(576, 0.778, 128) == 132
    assert [dart_entry_keep(576, r) for r in (0.667, 0.778, 0.889)] == [188, 124, 60]
    assert pivot_quota(132, 4, 4) == (4, [16] * 8)
    assert build("dart", keep=132).keep_tokens(576) == 132 and "132" in get("dart").deviations


def test_feather_fastv_ratio_counts():
    """FEATHER (FastVLlamaModel, fastv_ratio=0.7, no_rope_s=3, fastv_k=[8, 16]): kept share
    1 - 0.7, stage 1 = top int(576 * 0.3) + the 8 x 8 grid (when disjoint), stage 2 int(n1 0.09)."""
    from tokenreduce.testing.authors.feather import feather_entry_counts
    assert build("feather").stage_counts(576) == list(feather_entry_counts(576)) == [236, 21]


def test_vflowopt_illava_counts():
    """VFlowOpt (llava_qwen_training_free.py): reduce = round(N (1 - illava_vit_r)), merged =
    int(N / m^2); the 10 % preset (r=0.1166, m=17.387) on SigLIP's 27 x 27 recycles 644 + 2."""
    from tokenreduce.testing.authors.vflowopt import vflowopt_entry_counts
    r, a = 0.11661529508161146, 17.386981849158786
    red, merged = vflowopt_entry_counts(729, r, a)
    kept, L, cells = build("vflowopt", ratio=r, a=a).counts(729, 27, 27)
    assert (red + merged, kept) == (L, 729 - L) and (red, merged, cells) == (644, 2, 4)
    assert "base + crops" in get("vflowopt").deviations


def test_visiondrop_after_visionzip_42_6():
    """VisionDrop (scripts/v1_5/visiondrop_eval/*.sh): visionzip(model, dominant=42, contextual=6)
    ([CLS] + 41 + 6 = 48 into the LLM, num_LLM = 42 + 6), then [[30,5],[22,4],[16,3]] at [8,16,24]."""
    vz = build("visionzip", dominant=42, contextual=6)
    assert vz.projects_cls and vz.keep_tokens(576) + 1 == 48
    vd = build("visiondrop")
    assert vd.layers == (8, 16, 24) and vd.schedule(48) == [(30, 5), (22, 4), (16, 3)]
    assert vd.keep_tokens(48) == 19

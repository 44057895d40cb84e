"""Vision encoders: the runner equals the model, VIT / PROJECTOR hooks, sizes, un-merge."""
import pytest
import torch

from tokenreduce.models import attention, compat, fidelity, presets, vit

from _methods import PairMergeVit, TopClsProjector, TopClsVit, TopNormProjector

TINY = ["tiny-clip", "tiny-siglip", "tiny-dinov2"]


@pytest.fixture(scope="module")
def models():
    return {n: presets.build(n) for n in TINY}


@pytest.mark.parametrize("name", TINY)
def test_runner_equals_model_with_scores_everywhere(models, name):
    m = models[name]
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(px)
    vit.prepare(m)
    rec = attention.ScoreRecorder()
    for l in range(len(vit.vision_parts(m).layers)):
        rec.request("vision", l, ["cls", "received", "keys", "values"])
    out = vit.run_vision(m, px, recorder=rec)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=1e-4)
    assert rec.calls["fused"] == len(vit.vision_parts(m).layers) and not rec.fallbacks
    # recorded [CLS] attention equals an eager computation of the last layer
    m.set_attn_implementation("eager")
    with torch.no_grad():
        eager = m(px, output_attentions=True)
    L = len(eager.attentions)
    torch.testing.assert_close(rec.get("cls", "vision", L - 1), eager.attentions[-1][:, :, 0].mean(1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rec.get("received", "vision", 0), eager.attentions[0].mean((1, 2)), atol=1e-5, rtol=1e-4)
    m.set_attn_implementation("sdpa")


def test_vit_stage_topk_matches_manual(models):
    m = models["tiny-dinov2"]
    vit.prepare(m)
    px = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    out = vit.run_vision(m, px, TopClsVit(keep=5, at=1))
    assert out.last_hidden_state.shape == (3, 6, 64) and out.steps[0]["tokens_out"] == 6
    # manual: eager attention, gather by [CLS] attention after layer 1, continue
    m.set_attn_implementation("eager")
    with torch.no_grad():
        h = m.embeddings(px)
        for i, layer in enumerate(m.encoder.layer):
            if i == 1:
                a = layer.attention
                x = layer.norm1(h)
                B, N, _ = x.shape
                q_proj, k_proj, _, _ = compat.attention_projections(a)   # transformers 5.17 / 5.24 names
                q = q_proj(x).view(B, N, 4, 16).transpose(1, 2)
                k = k_proj(x).view(B, N, 4, 16).transpose(1, 2)
                cls = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / 4, -1)[:, :, 0].mean(1)
            h = layer(h)
            if i == 1:
                idx = cls[:, 1:].sort(dim=1, descending=True, stable=True).indices[:, :5].sort(dim=1).values + 1
                idx = torch.cat([torch.zeros(3, 1, dtype=torch.long), idx], 1)
                h = h.gather(1, idx[..., None].expand(-1, -1, 64))
        ref = m.layernorm(h)
    m.set_attn_implementation("sdpa")
    torch.testing.assert_close(out.last_hidden_state, ref, atol=1e-5, rtol=1e-4)
    # the tracker maps the 5 kept patches (and only them) to their slots
    assert (out.tracker.kept.sum(1) == 5).all()
    un = out.tracker.unmerge(out.last_hidden_state[:, 1:])
    kept_pos = idx[:, 1:] - 1
    torch.testing.assert_close(un.gather(1, kept_pos[..., None].expand(-1, -1, 64)), ref[:, 1:])


def test_merge_sizes_give_proportional_attention(models):
    m = models["tiny-clip"]
    vit.prepare(m)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    out = vit.run_vision(m, px, PairMergeVit(keep=8))
    assert out.last_hidden_state.shape[1] == 1 + 8
    assert (out.tracker.size[:, :] == 2).all()               # patch slots stand for 2 patches
    # manual: merge after layer 0, then attention with log(size) bias in every later layer
    parts = vit.vision_parts(m)
    with torch.no_grad():
        h = parts.layers[0](parts.embed(px), None)
        h = torch.cat([h[:, :1], h[:, 1:].view(2, 8, 2, 64).mean(2)], 1)
        bias = torch.cat([torch.zeros(2, 1), torch.full((2, 8), 2.0).log()], 1)
        for layer in parts.layers[1:]:
            h = layer(h, bias[:, None, None, :])               # CLIP layers take an additive 4D mask
    torch.testing.assert_close(out.last_hidden_state, h, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_projector_stage_and_fidelity(models, name):
    m = models[name]
    vit.prepare(m)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    full = vit.run_vision(m, px)
    meth = TopNormProjector(keep=4) if name == "tiny-siglip" else TopClsProjector(keep=4)
    red = vit.run_vision(m, px, meth)
    c = int(vit.vision_parts(m).has_cls)
    assert red.last_hidden_state.shape[1] == 4 + c
    f = fidelity.encoder_fidelity(full, red)
    assert torch.allclose(f["pooled_cos"], torch.ones(2), atol=1e-5)   # PROJECTOR keeps the pooled output
    torch.testing.assert_close(f["patch_cos_kept"], torch.ones(2), atol=1e-5, rtol=0)
    assert torch.allclose(f["kept_fraction"], torch.full((2,), 4 / 16))
    same = fidelity.encoder_fidelity(full, full)
    assert torch.allclose(same["patch_cos"], torch.ones(2), atol=1e-5)


def test_method_needing_scores_without_prepare_is_refused():
    m = presets.build("tiny-dinov2")
    with pytest.raises(RuntimeError, match="prepare"):
        vit.run_vision(m, torch.randn(1, 3, 56, 56), TopClsVit(keep=3))


def test_llava_feature_layer_skips_the_unused_last_layer(models):
    m = models["tiny-clip"]
    px = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = m(px, output_hidden_states=True).hidden_states[-2]
    out = vit.run_vision(m, px, feature_layer=-2)
    torch.testing.assert_close(out.features, ref)

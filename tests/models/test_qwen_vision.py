"""Qwen2-VL / Qwen2.5-VL vision statistics (tiny random configs built locally, no hub):
the fused statistics over the packed windows equal an eager computation on the same windows,
the tower's output is unchanged, reduced M-RoPE positions are the kept tokens' original
ones, score-needing methods run through `VLMRunner` with greedy generation on batches of
different image sizes, and the tower path has no host <-> device traffic."""
import os
import sys

import pytest
import torch

import tokenreduce.methods as methods
from tokenreduce.models import attention, presets, qwen_vision, vlm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from host_traffic import DEVICE, no_host_traffic  # noqa: E402
from _qwen_inputs import eager_statistics, pixels, prompt_batch  # noqa: E402
from _vlm_inputs import models  # noqa: E402,F401 (a fixture)

ARCHS = ["tiny-qwen2.5-vl", "tiny-qwen2-vl"]
GRIDS = [(1, 8, 12), (1, 4, 4), (1, 12, 8)]        # 96, 16, 96 patches; several 8 x 8 windows
PATCH = 3 * 2 * 14 * 14


def _batch(grids, lengths, seed=0):
    return prompt_batch(grids, lengths, PATCH, seed)


@pytest.mark.parametrize("grids", [GRIDS, [(2, 8, 8), (1, 16, 4)]], ids=["images", "frames"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_statistics_equal_eager_on_the_same_windows(models, arch, grids):
    visual = models(arch).model.visual
    px = pixels(grids, PATCH)
    with torch.no_grad():
        ref = visual(px, grid_thw=torch.tensor(grids)).pooler_output          # transformers' sdpa path
    feats, eager = eager_statistics(visual, grids, px)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)
    qwen_vision.install(visual)
    layout = qwen_vision.WindowLayout.build(torch.tensor(grids), visual.config).to("cpu")
    if arch == "tiny-qwen2.5-vl":       # windowed and full blocks differ
        assert len(layout.window.lengths) > len(grids) and layout.full_layers == {1, 3}
    rec = attention.ScoreRecorder()
    for layer in range(len(visual.blocks)):
        rec.request("vision", layer, ["received", "cls", "keys", "values"])
    with torch.no_grad(), attention.recording(rec):
        out = visual(px, grid_thw=torch.tensor(grids), **qwen_vision.vision_kwargs(layout)).pooler_output
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert rec.calls["fused"] == len(visual.blocks) and not rec.fallbacks
    counts = [t * h * w for t, h, w in grids]
    for layer, (received, keys, values) in eager.items():
        got = rec.get("received", "vision", layer)
        torch.testing.assert_close(got[0], received, atol=1e-6, rtol=1e-4)
        assert torch.equal(rec.get("cls", "vision", layer), got)                # the [CLS] substitute
        torch.testing.assert_close(rec.get("keys", "vision", layer)[0], keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rec.get("values", "vision", layer)[0], values, atol=1e-5, rtol=1e-4)
        for part, (t, _, _) in zip(qwen_vision.split_images(got, counts), grids):
            torch.testing.assert_close(part.sum(), torch.tensor(float(t)), atol=1e-5, rtol=0)   # 1 per frame
        merged = qwen_vision.merge_groups(got, "received")
        torch.testing.assert_close(merged[0], received.view(-1, 4).sum(1), atol=1e-6, rtol=1e-4)
        mk = qwen_vision.merge_groups(rec.get("keys", "vision", layer), "keys")
        torch.testing.assert_close(mk[0], keys.view(-1, 4, keys.shape[-1]).mean(1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("budget", [dict(keep=6), dict(ratio=1 / 3)], ids=["keep", "ratio"])
def test_reduced_positions_are_the_kept_tokens_original_positions(models, budget):
    m = models("tiny-qwen2.5-vl")
    grids = [(1, 8, 12), (1, 8, 8)]                                  # 24 and 16 merged tokens
    batch = _batch(grids, [40, 36])
    full = vlm.VLMRunner(m, None)
    full.next_token_logits(**batch)
    full_pos = full.last.position_ids
    r = vlm.VLMRunner(m, methods.build("visionzip", **budget))
    r.next_token_logits(**batch)
    p, info = r.last, r.last.vision
    want = [6, 6] if "keep" in budget else [8, 5]
    assert info.tokens_out == want and p.is_img.sum(1).tolist() == want
    sel = info.kept_positions
    live = p.attention_mask.bool()
    gathered = full_pos.gather(2, sel[None].expand(3, -1, -1))
    assert torch.equal(p.position_ids[:, live], gathered[:, live])
    ids = batch["input_ids"]
    for b, (t, h, w) in enumerate(grids):
        first = int((ids[b] == 300).nonzero()[0])
        base = full_pos[:, b, first]
        kept = sel[b][p.is_img[b]] - first                            # merged-token index in the image
        wm = w // 2
        expect = torch.stack([base[0].expand_as(kept), base[1] + kept // wm, base[2] + kept % wm])
        assert torch.equal(p.position_ids[:, b][:, p.is_img[b]], expect)
    torch.testing.assert_close(p.next_position, full_pos.amax(dim=(0, 2)) + 1)
    assert r.generate(**batch, max_new_tokens=3).shape == (2, 3)


SCORE_METHODS = [("visionzip", dict(keep=6)), ("fastervlm", dict(keep=6)), ("prumerge+", dict(keep=6)),
                 ("vtc-cls", dict(keep=6)), ("holov", dict(keep=6)), ("hiprune", dict(ratio=0.25)),
                 ("visionzip", dict(ratio=2 / 9)), ("divprune", dict(ratio=1 / 9))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,budget", SCORE_METHODS, ids=[f"{n}-{list(b)[0]}" for n, b in SCORE_METHODS])
def test_score_methods_run_and_generate_on_batches_of_different_sizes(models, arch, name, budget):
    m = models(arch)
    meth = methods.build(name, **budget)
    batch = _batch([(1, 8, 12), (1, 8, 8), (1, 12, 8)], [40, 30, 38], seed=2)
    r = vlm.VLMRunner(m, meth)
    ids = r.generate(**batch, max_new_tokens=3)
    assert ids.shape == (3, 3)
    info = r.last.vision
    counts = [24, 16, 24]
    assert info.tokens_in == counts
    cls = int(meth.projects_cls)      # VisionZip: keep=K counts a [CLS]; Qwen has none, all K are image tokens
    assert info.tokens_out == [meth.keep_tokens(n) + cls for n in counts]
    assert r.last.is_img.sum(1).tolist() == info.tokens_out
    rec = info.recorder
    assert not rec.fallbacks
    if meth.needs & {methods.Need.CLS_ATTN, methods.Need.ATTN_RECEIVED}:
        assert rec.calls["fused"] > 0
        assert (info.cls_substitute is not None) == (methods.Need.CLS_ATTN in meth.needs)
    # the same rows one at a time: the batch of different sizes changes nothing
    one = _batch([(1, 8, 8)], [30], seed=2)
    one["pixel_values"] = batch["pixel_values"][96:96 + 64]
    one["input_ids"] = batch["input_ids"][1:2, -30:]
    one["attention_mask"] = batch["attention_mask"][1:2, -30:]
    lg1 = vlm.VLMRunner(m, meth).next_token_logits(**one)
    lg = r.next_token_logits(**batch)
    torch.testing.assert_close(lg[1:2], lg1, atol=1e-4, rtol=1e-4)


def test_pixels_and_vit_methods_are_refused_clearly(models):
    m = models("tiny-qwen2.5-vl")
    with pytest.raises(ValueError, match="vflowopt needs pixels.*flattened patches"):
        vlm.VLMRunner(m, methods.build("vflowopt", keep=6))
    with pytest.raises(NotImplementedError, match="windowed vision tower"):
        vlm.VLMRunner(m, methods.build("tome", r=2))


def test_keep_larger_than_an_image_is_an_error(models):
    m = models("tiny-qwen2.5-vl")
    batch = _batch([(1, 8, 12), (1, 4, 4)], [40, 30])
    with pytest.raises(ValueError, match="exceeds the 4 image tokens"):
        vlm.VLMRunner(m, methods.build("fastervlm", keep=6)).next_token_logits(**batch)


def test_vision_tower_statistics_have_no_host_traffic():
    m = presets.build("tiny-qwen2.5-vl")
    visual = qwen_vision.install(m.model.visual).to(DEVICE)
    layout = qwen_vision.WindowLayout.build(GRIDS, visual.config).to(DEVICE)      # host grid, moved once
    px = torch.randn(sum(t * h * w for t, h, w in GRIDS), PATCH, device=DEVICE)
    grid = torch.empty(len(GRIDS), 3, dtype=torch.long, device=DEVICE)
    rec = attention.ScoreRecorder()
    for layer in range(len(visual.blocks)):
        rec.request("vision", layer, ["received", "keys", "values"])
    kw = qwen_vision.vision_kwargs(layout)
    with torch.no_grad(), attention.recording(rec), no_host_traffic():
        out = visual(px, grid_thw=grid, **kw).pooler_output
        merged = qwen_vision.merge_groups(rec.get("received", "vision", 0), "received")
        parts = qwen_vision.split_images(merged, layout.merged_counts)
    assert out.device == DEVICE and out.shape[0] == sum(layout.merged_counts)
    assert [p.shape[0] for p in parts] == layout.merged_counts and rec.calls["fused"] == len(visual.blocks)


@pytest.mark.parametrize("arch", ARCHS)
def test_rope_positions_equal_get_rope_index(models, arch):
    from tokenreduce.models.adapters.qwen2_vl import rope_positions
    m = models(arch)
    for grids, lengths in [([(1, 8, 12), (1, 4, 4), (1, 12, 8)], [40, 30, 38]), ([(1, 8, 8)] * 2, [26, 26]),
                           ([(2, 4, 8), (1, 16, 4)], [20, 30])]:
        b = _batch(grids, lengths, seed=3)
        is_img = b["input_ids"] == 300
        ref, _ = m.model.get_rope_index(b["input_ids"], image_grid_thw=b["image_grid_thw"], video_grid_thw=None,
                                        attention_mask=b["attention_mask"], mm_token_type_ids=is_img.int())
        got = rope_positions(is_img, b["attention_mask"], b["image_grid_thw"], 2)
        assert torch.equal(got, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_path_with_different_image_sizes_equals_the_model(models, arch):
    m = models(arch)
    b = _batch([(1, 8, 12), (1, 4, 4), (1, 12, 8)], [40, 30, 38], seed=4)
    mm = (b["input_ids"] == 300).int()
    with torch.no_grad():
        ref = m(**b, mm_token_type_ids=mm).logits[:, -1]
    r = vlm.VLMRunner(m, None)
    torch.testing.assert_close(r.next_token_logits(**b), ref, atol=1e-5, rtol=1e-4)
    r = vlm.VLMRunner(m, methods.build("visionzip", ratio=1.0))      # keeps every token
    torch.testing.assert_close(r.next_token_logits(**b), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,budget", [("visionzip", dict(keep=6)), ("hiprune", dict(ratio=1 / 3)), (None, {})],
                         ids=["visionzip-keep", "hiprune-ratio", "full"])
def test_prepare_has_no_host_traffic(name, budget):
    m = presets.build("tiny-qwen2.5-vl")
    grids = [(1, 8, 12), (1, 8, 8)]
    b = _batch(grids, [40, 36])
    r = vlm.VLMRunner(m, methods.build(name, **budget) if name else None)
    m.to(DEVICE)
    layout = r.adapter.window_layout(grids, DEVICE)                     # host metadata, moved once
    d = {k: v.to(DEVICE) for k, v in b.items()}
    with torch.no_grad(), no_host_traffic():
        p = r.adapter.prepare(d["input_ids"], d["attention_mask"], d["pixel_values"],
                              image_grid_thw=d["image_grid_thw"], layout=layout)
    assert p.inputs_embeds.device == DEVICE and p.position_ids.shape[:2] == (3, 2)
    if name:
        meth = methods.build(name, **budget)
        assert p.vision.tokens_out == [meth.keep_tokens(n) + int(meth.projects_cls) for n in (24, 16)]

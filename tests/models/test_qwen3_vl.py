"""Qwen3-VL (tiny random config built locally, no hub): `tokenreduce.patch` + HF ``generate``
unreduced equals the unpatched model exactly; reduced equals the runner path token for token;
the kept tokens' DeepStack features are their own (checked against transformers' own forward
given the kept features); reduced M-RoPE positions are the kept tokens' original ones; the
tower statistics equal an eager computation; refusals name method and model."""
import pytest
import torch

import tokenreduce
from tokenreduce import methods
from tokenreduce.models import attention, presets, qwen_vision, vlm

from _methods import TopNormProjector, TopQueryLLM
from _qwen_inputs import eager_statistics, prompt_batch

pytest.importorskip("transformers.models.qwen3_vl")

PATCH = 3 * 2 * 16 * 16
NEW = 4
N = 16                      # an 8 x 8 patch grid: 16 merged tokens


@pytest.fixture(scope="module")
def model():
    return presets.build("tiny-qwen3-vl")


def _batch(grids, lengths, seed=0):
    return prompt_batch(grids, lengths, PATCH, seed, token_types=True)


SAME = dict(grids=[(1, 8, 8), (1, 8, 8)], lengths=[26, 23])
RAGGED = dict(grids=[(1, 8, 12), (1, 8, 8), (1, 12, 8)], lengths=[40, 30, 38])


def _generate(m, meth, batch, **kw):
    with tokenreduce.patched(m, meth, **kw) as h:
        out = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[:, -NEW:], h


def _runner(m, meth, batch):
    """tokenreduce's runner path: the adapter's prepared inputs, then the M-RoPE greedy loop
    with the adapter's LLM context (the kept DeepStack features on the prefill)."""
    r = vlm.VLMRunner(m, meth)
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    p = r.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], **extra)
    with r.llm_context(p):
        out = vlm.greedy_generate(m, p.inputs_embeds, p.attention_mask, NEW, position_ids=p.position_ids,
                                  next_position=p.next_position)
    m.set_attn_implementation("sdpa")
    return out, p


def test_unreduced_patch_equals_unpatched_generate(model):
    batch = _batch(**SAME)
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    for meth in (None, "none", TopNormProjector(keep=N), methods.build("divprune", keep=N)):
        got, h = _generate(model, meth, batch)
        assert torch.equal(got, ref[:, -NEW:]), meth
        assert h.kind == "qwen3-vl" and h.stats[-1].tokens_out == [N, N]
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model)


REDUCED = [("divprune", dict(keep=5)), ("random", dict(keep=5)), ("pool", dict(keep=4)),
           ("visionzip", dict(keep=6)), ("fastervlm", dict(ratio=1 / 3)), (TopNormProjector(keep=5), {})]


@pytest.mark.parametrize("shape", [SAME, RAGGED], ids=["same", "ragged"])
@pytest.mark.parametrize("name,budget", REDUCED, ids=[n if isinstance(n, str) else n.name for n, _ in REDUCED])
def test_reduced_generate_equals_the_runner_token_for_token(model, shape, name, budget):
    batch = _batch(**shape, seed=1)
    meth = methods.build(name, **budget) if isinstance(name, str) else name
    got, h = _generate(model, meth, batch)
    ref, p = _runner(model, meth, batch)
    assert torch.equal(got, ref)
    st = h.stats[-1]
    counts = [t * (hh // 2) * (w // 2) for t, hh, w in shape["grids"]]
    assert st.tokens_in == counts and st.tokens_out == p.vision.tokens_out
    assert not st.fallbacks and not p.vision.recorder.fallbacks
    n_vis = int(p.is_img.sum())
    assert [e.shape for e in p.vision.deepstack_embeds] == [(n_vis, 64)] * 2        # two DeepStack layers


def test_llm_stage_after_the_deepstack_layers(model):
    """DeepStack adds after LLM layers 0 and 1: a reduction after layer 2 runs (patch + generate
    equals the runner path; at its full budget it equals the unpatched model)."""
    batch = _batch(**SAME, seed=3)
    with torch.no_grad():
        ref = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got, h = _generate(model, TopQueryLLM(keep=N, at=2), batch)
    assert torch.equal(got, ref[:, -NEW:])
    meth = TopQueryLLM(keep=5, at=2)
    got, h = _generate(model, meth, batch)
    assert h.stats[-1].tokens_out == [5, 5] and h.stats[-1].steps[-1]["stage"] == "llm"
    assert torch.equal(got, _runner(model, meth, batch)[0])
    assert model.config._attn_implementation == "sdpa"


def test_beams_and_sampling_run(model):
    batch = _batch(**RAGGED, seed=4)
    with tokenreduce.patched(model, "divprune", keep=4) as h:
        beams = model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=2, do_sample=False,
                               pad_token_id=0)
        outs = []
        for _ in range(2):
            torch.manual_seed(0)
            outs.append(model.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=5,
                                       pad_token_id=0))
    assert beams.shape == (3, batch["input_ids"].shape[1] + NEW)
    assert h.stats[0].tokens_in == [24, 24, 16, 16, 24, 24] and h.stats[0].tokens_out == [4] * 6
    assert torch.equal(outs[0], outs[1])


def test_kept_deepstack_features_are_the_kept_tokens_own(model):
    """Independent of the adapter's hook: transformers' own forward on the cut prompt, given the
    kept features and the kept tokens' DeepStack features (``mm_encoder_outputs``) and the
    reduced positions, equals the patched forward."""
    import inspect

    from transformers.models.qwen3_vl import modeling_qwen3_vl
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers' Qwen3-VL forward takes no mm_encoder_outputs (the independent reference "
                    "needs it; the patched path is checked against the runner in the other tests)")
    BaseModelOutputWithDeepstackFeatures = modeling_qwen3_vl.BaseModelOutputWithDeepstackFeatures
    batch = _batch(**SAME, seed=2)
    with tokenreduce.patched(model, "divprune", keep=5) as h, torch.no_grad():
        got = model(**batch).logits
    p, info = h.last, h.last.vision
    sel = info.kept_positions
    ids = batch["input_ids"].gather(1, sel)
    first = [int((batch["input_ids"][b] == 300).nonzero()[0]) for b in range(2)]
    kept = [sel[b][p.is_img[b]] - first[b] for b in range(2)]             # merged-token index in each image
    with torch.no_grad():
        out = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    feats = torch.split(out.pooler_output, [N, N])
    deep = [torch.split(d, [N, N]) for d in out.deepstack_features]
    for j, layer in enumerate(deep):                                     # the adapter's own bookkeeping
        assert torch.equal(p.vision.deepstack_embeds[j], torch.cat([layer[b][kept[b]] for b in range(2)]))
    enc = BaseModelOutputWithDeepstackFeatures(
        pooler_output=[feats[b][kept[b]] for b in range(2)],
        deepstack_features=[[layer[b][kept[b]] for b in range(2)] for layer in deep])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=p.attention_mask, position_ids=p.position_ids,
                    mm_encoder_outputs={"image": enc}).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # without the DeepStack features the logits differ: they are really added
    enc.deepstack_features = [[torch.zeros_like(x) for x in layer] for layer in enc.deepstack_features]
    with torch.no_grad():
        off = model(input_ids=ids, attention_mask=p.attention_mask, position_ids=p.position_ids,
                    mm_encoder_outputs={"image": enc}).logits
    assert not torch.allclose(got, off, atol=1e-4)


@pytest.mark.parametrize("budget", [dict(keep=6), dict(ratio=1 / 3)], ids=["keep", "ratio"])
def test_reduced_positions_are_the_kept_tokens_original_positions(model, budget):
    grids = [(1, 8, 12), (1, 8, 8)]                                  # 24 and 16 merged tokens
    batch = _batch(grids, [40, 36])
    with tokenreduce.patched(model, None) as h, torch.no_grad():
        model(**batch)
    full_pos = h.last.position_ids
    ref, _ = model.model.get_rope_index(batch["input_ids"], image_grid_thw=batch["image_grid_thw"],
                                        attention_mask=batch["attention_mask"],
                                        mm_token_type_ids=batch["mm_token_type_ids"])
    assert torch.equal(full_pos, ref)                                # Qwen3-VL's own M-RoPE positions
    with tokenreduce.patched(model, "divprune", **budget) as h, torch.no_grad():
        model(**batch)
    p, info = h.last, h.last.vision
    assert info.tokens_out == ([6, 6] if "keep" in budget else [8, 5])
    live = p.attention_mask.bool()
    gathered = full_pos.gather(2, info.kept_positions[None].expand(3, -1, -1))
    assert torch.equal(p.position_ids[:, live], gathered[:, live])
    for b, (t, hh, w) in enumerate(grids):
        first = int((batch["input_ids"][b] == 300).nonzero()[0])
        base = full_pos[:, b, first]
        kept = info.kept_positions[b][p.is_img[b]] - first
        expect = torch.stack([base[0].expand_as(kept), base[1] + kept // (w // 2), base[2] + kept % (w // 2)])
        assert torch.equal(p.position_ids[:, b][:, p.is_img[b]], expect)
    torch.testing.assert_close(p.next_position, full_pos.amax(dim=(0, 2)) + 1)


def test_tower_statistics_equal_eager_on_the_same_frames(model):
    visual = model.model.visual
    grids = [(1, 8, 12), (1, 4, 4)]
    px = torch.randn(sum(t * h * w for t, h, w in grids), PATCH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = visual(px, grid_thw=torch.tensor(grids)).pooler_output
    feats, eager = eager_statistics(visual, grids, px)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-4)
    qwen_vision.install(visual)
    try:
        layout = qwen_vision.WindowLayout.build(torch.tensor(grids), visual.config).to("cpu")
        rec = attention.ScoreRecorder()
        for layer in range(len(visual.blocks)):
            rec.request("vision", layer, ["received", "keys", "values"])
        with torch.no_grad(), attention.recording(rec):
            out = visual(px, grid_thw=torch.tensor(grids), **qwen_vision.vision_kwargs(layout)).pooler_output
    finally:
        visual.set_attn_implementation("sdpa")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert rec.calls["fused"] == len(visual.blocks) and not rec.fallbacks
    for layer, (received, keys, values) in eager.items():
        torch.testing.assert_close(rec.get("received", "vision", layer)[0], received, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(rec.get("keys", "vision", layer)[0], keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rec.get("values", "vision", layer)[0], values, atol=1e-5, rtol=1e-4)


def test_refusals_name_method_and_model_before_any_forward(model, monkeypatch):
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"tokenreduce\.patch: cannot run vflowopt on Qwen3VLForConditionalGeneration: "
                                         r"vflowopt needs .*flattened patches"):
        tokenreduce.patch(model, "vflowopt", keep=8)
    with pytest.raises(NotImplementedError, match=r"cannot run tome on Qwen3VLForConditionalGeneration"):
        tokenreduce.patch(model, "tome", keep=8)
    for meth in (methods.build("fastv", keep=6, layer=1), TopQueryLLM(keep=5, at=0)):
        with pytest.raises(NotImplementedError, match=r"cannot run .* on Qwen3VLForConditionalGeneration: .* is an "
                                                      r"LLM-stage method reducing after model layer [01]; .*DeepStack"):
            tokenreduce.patch(model, meth)
    with pytest.raises(NotImplementedError, match=r"fastv is an LLM-stage method reducing after model layer 0"):
        vlm.VLMRunner(model, methods.build("fastv", keep=6, layer=1))
    model.set_attn_implementation("sdpa")
    assert not calls and "forward" not in vars(model)
    assert not getattr(model, "_tokenreduce_patch", None)

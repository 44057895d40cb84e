"""VLMs: LLaVA-1.5 and Qwen2-VL (tiny configs): full path equals the model, PROJECTOR and
LLM-stage reductions, positions (M-RoPE), masks, batch > 1 with padding / mixed sizes, generate."""
import pytest
import torch

from tokenreduce.models import presets, vlm

from _vlm_inputs import llava  # noqa: F401  (fixture)
from _methods import EveryOtherLLM, TopClsProjector, TopNormProjector, TopQueryLLM


def test_llava_full_path_equals_model_and_generate(llava):
    m, ids, am, px = llava
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am, pixel_values=px).logits[:, -1]
        ref_gen = m.generate(input_ids=ids, attention_mask=am, pixel_values=px, max_new_tokens=3, do_sample=False)
    r = vlm.VLMRunner(m, None)
    torch.testing.assert_close(r.next_token_logits(ids, am, px), ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(r.generate(ids, am, px, max_new_tokens=3), ref_gen[:, -3:])


def test_llava_projector_reduction(llava):
    m, ids, am, px = llava
    r = vlm.VLMRunner(m, TopClsProjector(keep=6))
    logits = r.next_token_logits(ids, am, px)
    p = r.last
    assert p.inputs_embeds.shape[1] == 26 - 16 + 6 and p.n_img == 6
    assert (p.is_img.sum(1) == 6).all() and p.attention_mask[1, :3].sum() == 0
    # equal to the model fed the reduced features directly
    with torch.no_grad():
        out = m(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask).logits[:, -1]
    torch.testing.assert_close(logits, out)
    assert r.generate(ids, am, px, max_new_tokens=3).shape == (2, 3)


def test_llava_llm_stage_keep_all_is_identity_and_reduced_generate(llava):
    m, ids, am, px = llava
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am, pixel_values=px).logits[:, -1]
        ref_gen = m.generate(input_ids=ids, attention_mask=am, pixel_values=px, max_new_tokens=3, do_sample=False)
    r = vlm.VLMRunner(m, TopQueryLLM(keep=16, at=1))
    torch.testing.assert_close(r.next_token_logits(ids, am, px), ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(r.generate(ids, am, px, max_new_tokens=3), ref_gen[:, -3:])
    r = vlm.VLMRunner(m, TopQueryLLM(keep=5, at=1))
    r.next_token_logits(ids, am, px)
    assert r.llm_reducer.steps[0]["tokens_out"] == 5
    assert r.llm_reducer.rec.calls["fused"] == 1 and not r.llm_reducer.rec.fallbacks


def test_llm_stage_decode_step_matches_recompute(llava):
    """After the reduction, a cached decoding step equals recomputing the whole sequence
    (prompt + the generated token) with the same reduction: positions, masks and KV cache agree."""
    m, ids, am, px = llava
    r = vlm.VLMRunner(m, EveryOtherLLM(keep=8))
    p = r.prepare(ids, am, px)
    from transformers import DynamicCache
    with torch.no_grad():
        with r.llm_reducer.active(p.is_img, p.n_img):
            cache = DynamicCache(config=m.config.get_text_config())
            out = m(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, past_key_values=cache,
                    use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            am2 = torch.cat([p.attention_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            step = m(inputs_embeds=m.get_input_embeddings()(tok[:, None]), attention_mask=am2,
                     past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        assert cache.layers[0].keys.shape[2] == 27 and cache.layers[3].keys.shape[2] == 27 - 8
        emb2 = torch.cat([p.inputs_embeds, m.get_input_embeddings()(tok[:, None])], 1)
        is_img2 = torch.cat([p.is_img, torch.zeros(2, 1, dtype=torch.bool)], 1)
        with r.llm_reducer.active(is_img2, p.n_img):
            full = m(inputs_embeds=emb2, attention_mask=am2, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def qwen():
    return presets.build("tiny-qwen2-vl")


def _qwen_sample(g, h, w, L):
    n = (h // 2) * (w // 2)
    ids = torch.randint(1, 290, (L,), generator=g)
    ids[L - n - 4] = 302
    ids[L - n - 3:L - 3] = 300
    ids[L - 3] = 303
    return ids, torch.randn(h * w, 3 * 2 * 14 * 14, generator=g)


def test_qwen2vl_full_path_projector_positions_and_generate(qwen):
    m = qwen
    g = torch.Generator().manual_seed(0)
    (i0, p0), (i1, p1) = _qwen_sample(g, 8, 8, 26), _qwen_sample(g, 8, 8, 23)
    ids = torch.stack([i0, torch.cat([torch.zeros(3, dtype=torch.long), i1])])
    am = torch.ones(2, 26, dtype=torch.long)
    am[1, :3] = 0
    px, thw = torch.cat([p0, p1]), torch.tensor([[1, 8, 8], [1, 8, 8]])
    mm = (ids == 300).int()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am, pixel_values=px, image_grid_thw=thw, mm_token_type_ids=mm).logits[:, -1]
        ref_gen = m.generate(input_ids=ids, attention_mask=am, pixel_values=px, image_grid_thw=thw,
                             mm_token_type_ids=mm, max_new_tokens=3, do_sample=False)[:, -3:]
    r = vlm.VLMRunner(m, None)
    torch.testing.assert_close(r.next_token_logits(ids, am, px, image_grid_thw=thw), ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(r.generate(ids, am, px, image_grid_thw=thw, max_new_tokens=3), ref_gen)
    full_pos = r.last.position_ids
    r = vlm.VLMRunner(m, TopNormProjector(keep=5))
    r.next_token_logits(ids, am, px, image_grid_thw=thw)
    p = r.last
    assert p.inputs_embeds.shape[1] == 26 - 16 + 5
    # kept image tokens carry their original (t, h, w) positions; text after the image keeps its own
    img_full = ids == 300
    for b in range(2):
        kept = p.position_ids[:, b][:, p.is_img[b]]
        allp = full_pos[:, b][:, img_full[b]]
        assert all(any(torch.equal(kept[:, j], allp[:, i]) for i in range(allp.shape[1])) for j in range(5))
        torch.testing.assert_close(p.position_ids[:, b, -3:], full_pos[:, b, -3:])
    torch.testing.assert_close(p.next_position, full_pos.amax(dim=(0, 2)) + 1)
    assert r.generate(ids, am, px, image_grid_thw=thw, max_new_tokens=3).shape == (2, 3)
    # LLM stage keeping everything is the full model
    r = vlm.VLMRunner(m, TopQueryLLM(keep=16, at=1))
    torch.testing.assert_close(r.next_token_logits(ids, am, px, image_grid_thw=thw), ref, atol=1e-5, rtol=1e-4)
    r = vlm.VLMRunner(m, TopQueryLLM(keep=4, at=1))
    assert r.generate(ids, am, px, image_grid_thw=thw, max_new_tokens=3).shape == (2, 3)


def test_qwen2vl_batch_of_different_grids_matches_single_runs(qwen):
    m = qwen
    g = torch.Generator().manual_seed(1)
    (i0, p0), (i1, p1) = _qwen_sample(g, 8, 8, 26), _qwen_sample(g, 4, 8, 18)
    ids = torch.stack([i0, torch.cat([torch.zeros(8, dtype=torch.long), i1])])
    am = (torch.arange(26)[None] >= torch.tensor([[0], [8]])).long()
    px, thw = torch.cat([p0, p1]), torch.tensor([[1, 8, 8], [1, 4, 8]])
    r = vlm.VLMRunner(m, TopNormProjector(keep=5))
    lg = r.next_token_logits(ids, am, px, image_grid_thw=thw)
    assert (r.last.is_img.sum(1) == 5).all()
    l0 = vlm.VLMRunner(m, TopNormProjector(keep=5)).next_token_logits(i0[None], torch.ones(1, 26, dtype=torch.long), p0,
                                                                      image_grid_thw=thw[:1])
    l1 = vlm.VLMRunner(m, TopNormProjector(keep=5)).next_token_logits(i1[None], torch.ones(1, 18, dtype=torch.long), p1,
                                                                      image_grid_thw=thw[1:])
    torch.testing.assert_close(lg, torch.cat([l0, l1]), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="same image-token count"):
        vlm.VLMRunner(m, TopQueryLLM(keep=4, at=1)).next_token_logits(ids, am, px, image_grid_thw=thw)


def test_llava_next_anyres_full_llm_and_projector():
    m = presets.build("tiny-llava-next")
    g = torch.Generator().manual_seed(0)
    B = 2
    sizes = torch.tensor([[56, 112], [56, 112]])           # base image + 1 x 2 tiles
    px = torch.randn(B, 3, 3, 56, 56, generator=g)
    with torch.no_grad():
        f = m.model.get_image_features(pixel_values=px, image_sizes=sizes, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    f = f.pooler_output if hasattr(f, "pooler_output") else f
    n = f[0].shape[0]                                        # packed tokens incl. newline tokens
    L = n + 10
    ids = torch.randint(1, 290, (B, L), generator=g)
    ids[:, 4:4 + n] = 300
    am = torch.ones(B, L, dtype=torch.long)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am, pixel_values=px, image_sizes=sizes).logits[:, -1]
    torch.testing.assert_close(vlm.VLMRunner(m, None).next_token_logits(ids, am, px, image_sizes=sizes), ref,
                               atol=1e-5, rtol=1e-4)
    r = vlm.VLMRunner(m, TopQueryLLM(keep=n, at=1))
    torch.testing.assert_close(r.next_token_logits(ids, am, px, image_sizes=sizes), ref, atol=1e-5, rtol=1e-4)
    r = vlm.VLMRunner(m, TopQueryLLM(keep=8, at=1))
    assert r.generate(ids, am, px, image_sizes=sizes, max_new_tokens=3).shape == (2, 3)
    r = vlm.VLMRunner(m, TopNormProjector(keep=8))
    assert r.generate(ids, am, px, image_sizes=sizes, max_new_tokens=3).shape == (2, 3)
    assert r.last.inputs_embeds.shape[1] == L - n + 8

"""`tokenreduce.patch`: HF's own ``generate`` on a patched model equals tokenreduce's runner
algorithm (prepare + ``generate`` on the reduced embeddings / `greedy_generate` for M-RoPE)
token for token, for every architecture x stage; the unreduced patch equals the unpatched
model; refusals before any forward; patch twice / unpatch twice; vision encoders."""
import contextlib

import pytest
import torch

import tokenreduce
from tokenreduce import methods
from tokenreduce.models import presets, vlm

from _vlm_inputs import vlm_inputs
from _methods import EveryOtherLLM, TopClsProjector, TopClsVit, TopNormProjector, TopQueryLLM

ARCHS = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]
NEW = 4


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    m = presets.build(request.param)
    batch, n = vlm_inputs(request.param, m)
    return request.param, m, batch, n


def _split(batch):
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    return batch["input_ids"], batch["attention_mask"], batch["pixel_values"], extra


def runner_reference(m, meth, batch, new=NEW):
    """tokenreduce's own path (before `patch`): the adapter's prepared inputs, then
    ``generate`` on ``inputs_embeds`` (LLaVA) or the M-RoPE greedy loop (Qwen2-VL), with the
    LLM-stage hooks active for the whole request."""
    ids, am, px, extra = _split(batch)
    r = vlm.VLMRunner(m, meth)
    p = r.prepare(ids, am, px, **extra)
    ctx = r.llm_reducer.active(p.is_img, p.n_img, p.grid) if r.llm_reducer is not None else contextlib.nullcontext()
    with ctx, torch.no_grad():
        if p.position_ids is None:
            out = m.generate(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
        else:
            out = vlm.greedy_generate(m, p.inputs_embeds, p.attention_mask, new, position_ids=p.position_ids,
                                      next_position=p.next_position)
    m.set_attn_implementation("sdpa")
    return out


def patched_generate(m, meth, batch, new=NEW, **gen):
    with tokenreduce.patched(m, meth) as h:
        out = m.generate(**batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **gen)
    return out[:, -new:], h


def _methods_for(name):
    ms = [TopNormProjector(keep=5), TopQueryLLM(keep=5, at=1), EveryOtherLLM(keep=8)]
    if name != "tiny-qwen2-vl":   # a CLIP tower with [CLS]: VIT and tower-statistics PROJECTOR methods
        ms += [TopClsProjector(keep=6), TopClsVit(keep=6, at=1)]
    return ms


def test_every_stage_equals_the_runner_token_for_token(arch):
    name, m, batch, n = arch
    for meth in _methods_for(name):
        ref = runner_reference(m, meth, batch)
        got, h = patched_generate(m, meth, batch)
        assert torch.equal(got, ref), (name, meth.name)
        st = h.stats[-1]
        assert len(h.stats) == 1 and st.stage == meth.stage.value and st.method == meth.name
        assert st.tokens_in == [n, n]
        assert st.steps and st.steps[-1]["stage"] == meth.stage.value
        if meth.stage.value == "llm":
            assert st.tokens_out == [st.steps[-1]["tokens_out"]] * 2
        assert m.config._attn_implementation == "sdpa"          # restored by unpatch


def test_unreduced_patch_equals_unpatched_generate(arch):
    name, m, batch, n = arch
    with torch.no_grad():
        ref = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    for meth in (None, "none", TopNormProjector(keep=n), TopQueryLLM(keep=n, at=1)):
        got, h = patched_generate(m, meth, batch)
        assert torch.equal(got, ref[:, -NEW:]), (name, meth)
        assert h.stats[-1].tokens_out == [n, n]
    # a registered method at its full budget
    got, _ = patched_generate(m, methods.build("divprune", keep=n), batch)
    assert torch.equal(got, ref[:, -NEW:])


def test_forward_and_stats_are_lazy_and_per_call(arch):
    name, m, batch, n = arch
    h = tokenreduce.patch(m, TopNormProjector(keep=5))
    try:
        with torch.no_grad():
            out = m(**batch)
            m(**batch)
        L = batch["input_ids"].shape[1]
        assert out.logits.shape[1] == L - n + 5           # the shortened sequence
        assert len(h.stats) == 2 and h.stats[0].tokens_out == [5, 5]
        assert h.last.inputs_embeds.shape[1] == L - n + 5 and (h.last.is_img.sum(1) == 5).all()
        assert h.stats[0].as_dict()["tokens_in"] == [n, n]
    finally:
        tokenreduce.unpatch(m)
    assert "forward" not in vars(m)


def test_patch_twice_is_an_error_and_unpatch_twice_a_noop():
    m = presets.build("tiny-llava")
    h = tokenreduce.patch(m, "divprune", keep=4)
    with pytest.raises(RuntimeError, match=r"tokenreduce\.patch: LlavaForConditionalGeneration is already patched "
                                           r"\(method divprune\)"):
        tokenreduce.patch(m, "random", keep=4)
    assert tokenreduce.unpatch(m) is h and not h.active
    assert tokenreduce.unpatch(m) is None                  # not patched: nothing happens
    assert tokenreduce.unpatch(torch.nn.Linear(2, 2)) is None
    tokenreduce.patch(m, "random", keep=4)                 # patching again after unpatch is fine
    tokenreduce.unpatch(m)


def test_refusals_before_any_forward(monkeypatch):
    with pytest.raises(TypeError, match=r"tokenreduce\.patch: unsupported model Linear; supported: "
                                        r"LlavaForConditionalGeneration"):
        tokenreduce.patch(torch.nn.Linear(2, 2), "divprune", keep=4)
    q = presets.build("tiny-qwen2-vl")
    calls = []
    monkeypatch.setattr(type(q), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"tokenreduce\.patch: cannot run vflowopt on Qwen2VLForConditionalGeneration: "
                                         r"vflowopt needs "):
        tokenreduce.patch(q, "vflowopt", keep=8)
    with pytest.raises(NotImplementedError, match=r"cannot run tome on Qwen2VLForConditionalGeneration"):
        tokenreduce.patch(q, "tome", keep=8)
    assert not calls and "forward" not in vars(q)
    enc = presets.build("tiny-siglip")
    with pytest.raises(ValueError, match=r"cannot run fastv on SiglipVisionModel: it is a llm-stage method"):
        tokenreduce.patch(enc, "fastv", keep=4)
    with pytest.raises(ValueError, match=r"cannot run visionzip on SiglipVisionModel: visionzip needs cls_attn, but "
                                         r"siglip has no \[CLS\] token"):
        tokenreduce.patch(enc, "visionzip", keep=4)
    nxt = presets.build("tiny-llava-next")
    with pytest.raises(ValueError, match=r"cannot run feather on LlavaNextForConditionalGeneration: feather needs grid"):
        tokenreduce.patch(nxt, "feather", ratio=0.5)
    with pytest.raises(ValueError, match=r"tokenreduce\.patch: .*already built"):
        tokenreduce.patch(nxt, TopNormProjector(keep=4), keep=3)
    with pytest.raises(ValueError, match=r"tokenreduce\.patch: method None / 'none' keeps every token"):
        tokenreduce.patch(nxt, None, keep=3)
    for model in (q, enc, nxt):
        assert not hasattr(model, "_tokenreduce_patch") or not model._tokenreduce_patch.active


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip", "tiny-dinov2"])
def test_vision_encoder_returns_reduced_features_with_unmerge_map(name):
    from tokenreduce.models import vit
    m = presets.build(name)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(pixel_values=px)
    with tokenreduce.patched(m, None):
        same = m(pixel_values=px)
    torch.testing.assert_close(same.last_hidden_state, full.last_hidden_state, atol=1e-5, rtol=1e-4)
    meth = methods.build("tome", keep=8) if name == "tiny-siglip" else TopClsVit(keep=5, at=1)
    ref = vit.run_vision(vit.prepare(m), px, meth)
    m.set_attn_implementation("sdpa")
    with tokenreduce.patched(m, meth) as h:
        out = m(px)
        tup = m(pixel_values=px, return_dict=False)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)
    c = int(name != "tiny-siglip")
    K = out.last_hidden_state.shape[1] - c
    assert K == (8 if name == "tiny-siglip" else 5) and torch.equal(tup[0], out.last_hidden_state)
    assert out.source.shape == (2, 16) and torch.equal(out.source, ref.tracker.source)
    assert ((out.source >= -1) & (out.source < K)).all()
    back = out.unmerge(out.last_hidden_state[:, c:])
    assert back.shape == (2, 16, out.last_hidden_state.shape[-1])
    assert h.stats[0].tokens_in == [16, 16] and h.stats[0].tokens_out == [K, K] and h.stats[0].stage == meth.stage.value
    assert m.config._attn_implementation == "sdpa"


def tiny_qwen25_vl():
    """A tiny Qwen2.5-VL (windowed vision tower with one full-attention block), random weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig(
        image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], hidden_act="silu"),
        text_config=dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=320, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def test_qwen25_vl_projector_and_llm_stage_equal_the_runner():
    from _vlm_inputs import qwen_inputs
    m = tiny_qwen25_vl()
    batch, n = qwen_inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    got, h = patched_generate(m, None, batch)
    assert torch.equal(got, ref[:, -NEW:]) and h.kind == "qwen2-vl"
    for meth in (TopNormProjector(keep=5), TopQueryLLM(keep=5, at=1)):
        got, h = patched_generate(m, meth, batch)
        assert torch.equal(got, runner_reference(m, meth, batch)), meth.name
        assert h.stats[-1].tokens_out == [5, 5]


def test_import_stays_light_and_patch_is_exported():
    import subprocess
    import sys
    code = ("import sys, tokenreduce; assert 'transformers' not in sys.modules; "
            "from tokenreduce import patch, unpatch, patched; assert callable(patch) and 'transformers' in sys.modules; "
            "assert {'patch', 'unpatch', 'patched'} <= set(dir(tokenreduce))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scores_come_from_the_fused_attention():
    """Statistics are recorded by the fused op (no eager attention, no output_attentions)."""
    m = presets.build("tiny-llava")
    batch, _ = vlm_inputs("tiny-llava", m)
    with tokenreduce.patched(m, TopQueryLLM(keep=5, at=1)) as h:
        assert m.model.language_model.config._attn_implementation == "tokenreduce"   # only where scores are read
        assert m.model.vision_tower.config._attn_implementation == "sdpa"
        m.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert h.reducer.rec.calls["fused"] == 1 and not h.reducer.rec.fallbacks and not h.stats[-1].fallbacks
    with tokenreduce.patched(m, TopClsProjector(keep=5)) as h:
        assert m.model.vision_tower.config._attn_implementation == "tokenreduce"
        assert m.model.language_model.config._attn_implementation == "sdpa"
        m.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
    assert h.last.vision.recorder.calls["fused"] >= 1 and not h.last.vision.recorder.fallbacks
    assert {m.config._attn_implementation, m.model.vision_tower.config._attn_implementation,
            m.model.language_model.config._attn_implementation} == {"sdpa"}

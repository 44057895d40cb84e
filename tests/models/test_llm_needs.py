"""LLM-stage needs: LOOKAHEAD statistics (query_attn, visual_attn, query_attn_norope, keys) equal
an eager computation of the next layer; layer plans map long schedules onto short models; padding
slots of a PROJECTOR reduction are masked; Context.heads / proportional_attention."""
import pytest
import torch

from tokenreduce.methods import Method, Need, Reduction, Stage, keep_indices
from tokenreduce.models import presets, stages, vit, vlm

from _vlm_inputs import llava, qwen_inputs  # noqa: F401  (llava: fixture)


class KeepAllLookahead(Method):
    """Keeps every image token after layer 1 and stores what it was given (lookahead to 2)."""
    name = "test-keepall-lookahead"
    stage = Stage.LLM
    needs = frozenset({Need.FEATURES, Need.LOOKAHEAD, Need.QUERY_ATTN, Need.VISUAL_ATTN,
                       Need.QUERY_ATTN_NOROPE, Need.KEYS})

    def reduce_layers(self, L):
        return [1]

    def attention_layers(self, L):
        return [2]

    def reduce(self, ctx):
        self.seen = ctx
        B, n, _ = ctx.x.shape
        return keep_indices(ctx, torch.arange(n).expand(B, n))


def test_lookahead_statistics_equal_eager_next_layer(llava):
    m, ids, am, px = llava
    meth = KeepAllLookahead(keep=16)
    r = vlm.VLMRunner(m, meth)
    r.next_token_logits(ids, am, px)
    ctx = meth.seen
    assert not r.llm_reducer.rec.fallbacks and r.llm_reducer.rec.calls["fused"] >= 3
    p = r.last
    img = p.is_img
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, output_attentions=True,
                    output_hidden_states=True, use_cache=False)
    finally:
        m.set_attn_implementation("tokenreduce")
    att = out.attentions[2]                                    # [B, H, L, L]
    lm = m.model.language_model
    for b in range(2):
        pos = img[b].nonzero()[:, 0]
        q_exp = att[b, :, -1][:, pos].mean(0)
        torch.testing.assert_close(ctx.query_attn[2][b], q_exp, atol=1e-5, rtol=1e-4)
        v_exp = att[b][:, pos][:, :, pos].mean((0, 1))
        torch.testing.assert_close(ctx.visual_attn[2][b], v_exp, atol=1e-5, rtol=1e-4)
    # no-RoPE last-token attention, softmax over the image keys only; keys after RoPE (head mean)
    layer = lm.layers[2]
    hs = out.hidden_states[2]
    x = layer.input_layernorm(hs)
    a = layer.self_attn
    B, L, _ = x.shape
    hd = a.head_dim
    q = a.q_proj(x).view(B, L, -1, hd).transpose(1, 2)
    k = a.k_proj(x).view(B, L, -1, hd).transpose(1, 2)
    rep = q.shape[1] // k.shape[1]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    cos, sin = lm.rotary_emb(hs, torch.arange(L)[None].expand(B, L))
    _, k_rope = apply_rotary_pos_emb(q, k, cos, sin)
    for b in range(2):
        pos = img[b].nonzero()[:, 0]
        kk = k[b][:, pos].repeat_interleave(rep, 0)            # [H, n, hd]
        s = torch.softmax((q[b, :, -1:] @ kk.transpose(-1, -2)) * a.scaling, -1)[:, 0].mean(0)
        torch.testing.assert_close(ctx.query_attn_norope[2][b], s, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ctx.keys[b], k_rope[b][:, pos].mean(0), atol=1e-5, rtol=1e-4)


def test_layer_plan_maps_long_schedules_onto_short_models():
    from tokenreduce import methods
    pd = methods.build("pdrop")
    plan = stages.plan_layers(pd, 4, default_nominal=32, reduce_top=2)
    assert plan.Ln == 32 and [a for _, a in plan.reduce] == [0, 1, 2] and [n for n, _ in plan.reduce] == [7, 15, 23]
    plan = stages.plan_layers(pd, 3, default_nominal=32, reduce_top=1)
    assert plan.reduce_at() == {0: [7, 15], 1: [23]}
    plan = stages.plan_layers(pd, 32, reduce_top=30)
    assert not plan.mapped and [a for _, a in plan.reduce] == [7, 15, 23]
    hp = methods.build("hiprune", keep=8)
    plan = stages.plan_layers(hp, 4, default_nominal=24)
    assert plan.Ln == 24 and [(l, a) for l, _, a in plan.attention] == [(8, 0), (-2, 2)]


def test_pdrop_stages_on_a_three_layer_llm_and_generate():
    from tokenreduce import methods
    m = presets.build("tiny-qwen2-vl")
    batch, n = qwen_inputs(torch.Generator().manual_seed(0))
    r = vlm.VLMRunner(m, methods.build("pdrop", keep=4))
    r.next_token_logits(**batch)
    steps = r.llm_reducer.steps
    assert [s["layer"] for s in steps] == [0, 0, 1] and [s["method_layer"] for s in steps] == [7, 15, 23]
    assert steps[-1]["tokens_out"] == 4
    assert r.generate(max_new_tokens=2, **batch).shape == (2, 2)


class PadProjector(Method):
    """Keeps image tokens 0..3 and returns two padding slots (size 0) after them."""
    name = "test-pad-proj"
    stage = Stage.PROJECTOR
    needs = frozenset({Need.FEATURES})

    def keep_tokens(self, n):
        return 6

    def reduce(self, ctx):
        from tokenreduce.methods.helpers import padded_selection
        B = ctx.x.shape[0]
        idx = torch.arange(6).expand(B, 6)
        return padded_selection(ctx, idx, idx < 4)


def test_padding_slots_are_masked_in_the_llm(llava):
    m, ids, am, px = llava
    r = vlm.VLMRunner(m, PadProjector(keep=6))
    lg = r.next_token_logits(ids, am, px)
    p = r.last
    assert p.n_img == 6
    pos = [p.is_img[b].nonzero()[:, 0] for b in range(2)]
    for b in range(2):
        assert p.attention_mask[b, pos[b][:4]].tolist() == [1] * 4 and p.attention_mask[b, pos[b][4:]].tolist() == [0, 0]
    # the same as feeding only the 4 real tokens (masked slots change nothing but RoPE distance)
    emb = p.inputs_embeds.clone()
    emb[:, pos[0][4:]] = 123.0      # garbage in masked slots does not leak
    with torch.no_grad():
        out = m(inputs_embeds=emb, attention_mask=p.attention_mask).logits[:, -1]
    torch.testing.assert_close(lg, out, atol=1e-5, rtol=1e-4)


def test_padding_bias_and_proportional_attention_default():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    b = vit.padding_bias(s, True)
    assert b[0, 0] == 0 and torch.isclose(b[0, 1], torch.log(torch.tensor(2.0))) and b[0, 2] == float("-inf")
    assert vit.padding_bias(s, False).tolist() == [[0.0, 0.0, float("-inf")]]
    assert Method.proportional_attention is True


def test_llm_path_never_gathers_a_pruning_reductions_tokens(monkeypatch):
    """The LLM path gathers the next sequence from the hidden states itself: a pruning
    method's Reduction (lazy there: Context.lazy_tokens) is never gathered nor scattered back,
    and the logits equal those of the path that materialises and scatters the tokens."""
    from tokenreduce import methods
    from tokenreduce.methods import helpers
    m = presets.build("tiny-qwen2-vl")
    batch, _ = qwen_inputs(torch.Generator().manual_seed(0))
    calls = []
    real = helpers.gather_rows
    monkeypatch.setattr(helpers, "gather_rows", lambda x, i: calls.append(1) or real(x, i))
    lazy = vlm.VLMRunner(m, methods.build("pdrop", keep=4)).next_token_logits(**batch)
    assert not calls
    monkeypatch.setattr(Reduction, "kept_rows", property(lambda self: False))   # scatter path
    eager = vlm.VLMRunner(m, methods.build("pdrop", keep=4)).next_token_logits(**batch)
    assert calls and torch.equal(lazy, eager)

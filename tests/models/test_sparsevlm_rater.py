"""Need.RATER_ATTN (SparseVLM) in LLaVA-1.5 equals the authors' computation on the eager attention
weights: raters from the LLM input (select_raters), then the layer's head-mean attention of the
rater rows to the image tokens, mean over raters; computed by the fused op, no fallback."""
import torch

from tokenreduce import methods
from tokenreduce.models import vlm
from tokenreduce.testing.authors.sparsevlm import select_raters

from _vlm_inputs import llava  # noqa: F401  (fixture)


def test_rater_attention_equals_eager(llava):
    m, ids, am, px = llava
    meth = methods.build("sparsevlm", counts=(9, 4, 2))
    seen = []
    orig = meth.reduce
    meth.reduce = lambda ctx: (seen.append((ctx.layer, ctx.x.shape[1], ctx.rater_attn[ctx.layer].clone())),
                               orig(ctx))[1]
    r = vlm.VLMRunner(m, meth, nominal_layers=32)
    r.next_token_logits(ids, am, px)
    assert not r.llm_reducer.rec.fallbacks and r.llm_reducer.rec.calls["fused"] > 0
    layer, n, got = seen[0]
    assert (layer, n) == (2, 16)
    p = r.last
    first = r.llm_reducer.plan.reduce[0][1]                 # model layer of the first reduction
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m.model.language_model(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask,
                                         output_attentions=True)
    finally:
        m.set_attn_implementation("sdpa")
    w = out.attentions[first]                               # [B, H, L, L]
    for b in range(2):
        start = int(p.is_img[b].float().argmax())
        valid = int(p.attention_mask[b].sum())
        pad = p.inputs_embeds.shape[1] - valid              # left padding
        h0 = p.inputs_embeds[b:b + 1, pad:]
        raters = select_raters(h0, start - pad, 16)
        rows = raters[1] + start + 16
        ref = w[b, :, rows][:, :, start:start + 16].mean(0).mean(0)
        torch.testing.assert_close(got[b], ref.float(), rtol=1e-4, atol=1e-6)

"""VisionZip in LLaVA-1.5 as the authors' code runs it (issue 14): ``keep=K`` gives the LLM K
tokens, the first the projected [CLS] of the feature layer (``encode_images_visionzip`` puts
[CLS] + dominant + contextual through ``mm_projector``), the rest the image tokens."""
import torch

from tokenreduce import methods
from tokenreduce.models import vlm

from _vlm_inputs import llava  # noqa: F401  (fixture)


def test_llava_receives_cls_and_keep_tokens(llava):
    m, ids, am, px = llava
    meth = methods.build("visionzip", keep=9)
    r = vlm.VLMRunner(m, meth)
    r.next_token_logits(ids, am, px)
    p = r.last
    assert p.n_img == 9 == meth.keep_tokens(16) + 1 and (p.is_img.sum(1) == 9).all()
    with torch.no_grad():
        hs = m.model.vision_tower(px, output_hidden_states=True).hidden_states[m.config.vision_feature_layer]
        cls = m.model.multi_modal_projector(hs[:, :1])                  # [B, 1, D_llm]
    first = p.is_img.float().argmax(1)                                  # first image position per row
    got = p.inputs_embeds[torch.arange(2), first]
    torch.testing.assert_close(got, cls[:, 0].to(got.dtype), rtol=1e-4, atol=1e-5)
    # the other methods keep LLaVA's "default" select ([CLS] dropped)
    assert not methods.build("fastervlm", keep=8).projects_cls

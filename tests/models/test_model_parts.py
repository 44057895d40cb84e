"""`model_parts` finds every tiny preset's pieces through its adapter (no probing in the
profiler), `VLMRunner` picks the adapter for the model class, and the adapters' one
image-feature insertion cuts, scatters and masks as documented."""
import pytest
import torch

from tokenreduce.models import presets, vlm
from tokenreduce.models.adapters import (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, adapter_class,
                                         model_parts)

VISION = {"tiny-clip": ("clip", True), "tiny-siglip": ("siglip", False), "tiny-dinov2": ("dinov2", True)}
VLMS = {"tiny-llava": ("llava", LlavaAdapter), "tiny-llava-next": ("llava-next", LlavaNextAdapter),
        "tiny-qwen2-vl": ("qwen2-vl", Qwen2VLAdapter), "tiny-qwen2.5-vl": ("qwen2-vl", Qwen2VLAdapter)}


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_encoder_parts(name):
    m = presets.build(name)
    p = model_parts(m)
    kind, has_cls = VISION[name]
    assert (p.kind, p.has_cls) == (kind, has_cls)
    assert len(p.vision_layers) == p.vision_config.num_hidden_layers
    assert p.patch == p.vision_config.patch_size
    assert p.lm is None and p.projector is None and p.lm_head is None and tuple(p.lm_layers) == ()
    assert adapter_class(m) is None


@pytest.mark.parametrize("name", sorted(VLMS))
def test_vlm_parts(name):
    m = presets.build(name)
    kind, cls = VLMS[name]
    assert adapter_class(m) is cls
    p = model_parts(m)
    assert p.kind == kind
    assert p.lm is m.model.language_model and list(p.lm_layers) == list(m.model.language_model.layers)
    assert len(p.lm_layers) == m.config.get_text_config().num_hidden_layers
    assert p.lm_head is m.lm_head and p.text_config is m.config.get_text_config()
    vc = m.config.vision_config
    assert len(p.vision_layers) == (vc.depth if kind == "qwen2-vl" else vc.num_hidden_layers)
    if kind == "qwen2-vl":
        assert p.projector is m.model.visual.merger and not p.has_cls
    else:
        assert p.projector is m.model.multi_modal_projector and p.has_cls
    r = vlm.VLMRunner(m, None)
    assert r.kind == kind and isinstance(r.adapter, cls) and r.lm is p.lm


def test_unsupported_model():
    with pytest.raises(TypeError, match="tokenreduce.models.vlm: unsupported model Linear"):
        vlm.VLMRunner(torch.nn.Linear(2, 2), None)
    with pytest.raises(TypeError, match="tokenreduce.models.vit: unsupported vision encoder Linear"):
        model_parts(torch.nn.Linear(2, 2))


def test_insert_image_features():
    m = presets.build("tiny-llava")
    a = LlavaAdapter(m)
    ids = torch.tensor([[1, 300, 300, 300, 2], [300, 300, 300, 3, 4]])
    am = torch.ones_like(ids)
    feats = torch.randn(2, 2, m.config.get_text_config().hidden_size)
    size = torch.tensor([[1.0, 0.0], [2.0, 1.0]])         # row 0's second slot is padding
    emb, mask, is_img = a.insert_image_features(ids, am, ids == 300, 3, feats, size)
    assert emb.shape == (2, 4, feats.shape[-1])
    assert is_img.tolist() == [[False, True, True, False], [True, True, False, False]]
    assert mask.tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]
    torch.testing.assert_close(emb[is_img].view(2, 2, -1), feats)
    cut = torch.tensor([[1, 300, 300, 2], [300, 300, 3, 4]])
    torch.testing.assert_close(emb[~is_img], m.get_input_embeddings()(cut)[~is_img])
    full, mask_full, _ = a.insert_image_features(ids, am, ids == 300, 3, torch.zeros(2, 3, feats.shape[-1]))
    assert full.shape[1] == 5 and mask_full.tolist() == am.tolist()
    with pytest.raises(ValueError, match="tokenreduce.models.vlm: 4 image features for 3 image tokens"):
        a.insert_image_features(ids, am, ids == 300, 3, torch.zeros(2, 4, feats.shape[-1]))

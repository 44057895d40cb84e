"""TCA: the condensation against the authors' block (Jo-wang/TCA, re-implemented in
tokenreduce.testing.authors.tca), the reservoir against their runner's dict of lists, the
anchors inside a tiny CLIP model, state / reset semantics, batches, bad input."""
import os
import sys

import pytest
import torch

from tokenreduce import methods
from tokenreduce.methods import Context
from tokenreduce.methods.tca import TCAReservoir, budget_plan, rate_plan
from tokenreduce.models import vit
from tokenreduce.testing.authors import tca as authors


def _inputs(B, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g), torch.softmax(torch.randn(B, N, generator=g) * 2, -1)


@pytest.mark.parametrize("B,N,D,rate", [(1, 197, 32, 0.1), (3, 197, 64, 0.2), (2, 50, 16, 0.3), (2, 17, 8, 0.1)])
def test_condensation_matches_the_authors(B, N, D, rate):
    x, a = _inputs(B, N, D, seed=N)
    ours = authors.condense_ours(x, a, rate)
    want = authors.condense_authors(x, a, rate)
    assert ours.shape == want.shape
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_batch_rows_are_independent():
    x, a = _inputs(3, 197, 32, seed=1)
    full = authors.condense_ours(x, a, 0.1)
    for b in range(3):
        torch.testing.assert_close(full[b:b + 1], authors.condense_ours(x[b:b + 1], a[b:b + 1], 0.1))


def test_reduction_bookkeeping():
    x, a = _inputs(2, 197, 32, seed=2)
    m = methods.build("tca")
    red = m(Context(x=x, has_cls=True, cls_attn={3: a}, layer=3, num_layers=12))
    k, s, f, c = rate_plan(196, 0.1, 4)
    assert red.tokens.shape == (2, 1 + k + c + 1, 32)
    assert (red.source >= 0).all()                           # condensation drops nothing
    assert torch.allclose(red.size.sum(1), torch.full((2,), 197.0))
    assert (red.size[:, 1:1 + k] == 1).all() and (red.size[:, -1] == f).all()
    assert (red.index[:, -1] == -1).all() and (red.index[:, 0] == 0).all()
    torch.testing.assert_close(red.tokens[:, 0], x[:, 0])


@pytest.mark.parametrize("n,t", [(576, 300), (16, 13), (11, 9), (20, 1), (20, 2), (30, 5), (8, 8)])
def test_budget_plan_gives_exactly_t(n, t):
    k, s, f, c = budget_plan(n, t, 4)
    assert k + s + f == n and k >= 0
    assert k + (c if s else 0) + (1 if f else 0) == min(t, n)


def test_keep_budget_schedule():
    m = methods.build("tca", keep=64)
    x, _ = _inputs(2, 577, 16, seed=3)
    state = {}
    for layer in m.reduce_layers(24):
        _, a = _inputs(2, x.shape[1], 1, seed=layer)
        x = m(Context(x=x, has_cls=True, cls_attn={layer: a}, layer=layer, num_layers=24, state=state)).tokens
    assert x.shape[1] == 65 and m.keep_tokens(576) == 64


# -- the reservoir ---------------------------------------------------------------------------------

def _stream(T, C, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    preds = torch.randint(0, C, (T,), generator=g)
    preds[:2 * C] = torch.arange(C).repeat(2)         # every class twice early: anchors activate
    perm = torch.randperm(T, generator=g)
    return preds[perm], torch.rand(T, generator=g), torch.randn(T, L, D, generator=g)


@pytest.mark.parametrize("batch", [1, 4])
def test_reservoir_matches_the_authors_runner(batch):
    C, L, D, T = 3, 12, 8, 24
    preds, ents, cls = _stream(T, C, L, D)
    ours = TCAReservoir(C, L, D)
    theirs = authors.ReservoirAuthors(C, L)
    for t0 in range(0, T, batch):
        got = ours.update(preds[t0:t0 + batch], ents[t0:t0 + batch], cls[t0:t0 + batch])
        for j, t in enumerate(range(t0, t0 + batch)):
            theirs.update(int(preds[t]), float(ents[t]), cls[t])
            torch.testing.assert_close(got[j:j + 1], theirs.logits(cls[t]), rtol=1e-4, atol=1e-5)
        assert bool(ours.active) == (theirs.cls_token_cache is not None)
        if theirs.cls_token_cache is not None:
            torch.testing.assert_close(ours.anchors, theirs.cls_token_cache, rtol=1e-5, atol=1e-5)
    assert (ours.valid.sum(1) <= 3).all() and bool(ours.active)


def test_reservoir_reset_and_determinism():
    C, L, D = 2, 4, 8
    preds, ents, cls = _stream(10, C, L, D, seed=5)
    r = TCAReservoir(C, L, D)
    a = r.update(preds, ents, cls)
    assert bool(r.active) and r.valid.any()
    r.reset()
    assert not bool(r.active) and not r.valid.any() and (r.anchors == 0).all()
    assert (r.logits(cls[:2]) == 0).all()                    # an empty reservoir corrects nothing
    torch.testing.assert_close(r.update(preds, ents, cls), a)


def test_reservoir_bad_input():
    with pytest.raises(ValueError, match=r"^tokenreduce\.methods\.tca: reservoir size must be an int >= 1"):
        TCAReservoir(3, 12, 8, size=0)
    r = TCAReservoir(3, 12, 8)
    with pytest.raises(ValueError, match=r"cls_layers must be \[B, 12, 8\]"):
        r.update(torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(1, 11, 8))


# -- inside a CLIP model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPModel
    cfg = CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1),
                     vision_config=dict(hidden_size=32, num_hidden_layers=12, num_attention_heads=4,
                                        intermediate_size=64, image_size=56, patch_size=7),
                     projection_dim=16)
    torch.manual_seed(0)
    return CLIPModel(cfg).eval()


def _classifier(model, C=2, **opts):
    from tokenreduce.models.tca_clip import TCAClassifier, class_embeddings
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 100, (C * 2, 5), generator=g)
    W = class_embeddings(model, ids, torch.ones_like(ids), 2)
    assert W.shape == (C, 16)
    return TCAClassifier(model, W, methods.build("tca", **opts))


def test_inactive_anchor_is_a_masked_key(tiny_clip):
    """Before the reservoir's anchors are active the inserted anchor is padding: the encoder's
    output equals TCA without a reservoir."""
    clf = _classifier(tiny_clip, rate=0.2)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    out = clf(px)
    assert not bool(clf.reservoir.active)
    plain = vit.run_vision(vit.prepare(tiny_clip), px, methods.build("tca", rate=0.2))
    torch.testing.assert_close(out.vision.pooled, plain.pooled, rtol=1e-5, atol=1e-5)
    assert [s["tokens_out"] - s["tokens_in"] for s in out.vision.steps][::2] == [1, 1, 1]   # anchor in


def test_classifier_state_reset_batch(tiny_clip):
    clf = _classifier(tiny_clip, rate=0.2)
    g = torch.Generator().manual_seed(3)
    frames = [torch.randn(2, 3, 56, 56, generator=g) for _ in range(6)]
    # force both classes twice so that the anchors activate, then check they change the encoder
    clf.reservoir.update(torch.tensor([0, 1, 0, 1]), torch.rand(4), torch.randn(4, 12, 32))
    assert bool(clf.reservoir.active)
    with_anchor = clf(frames[0])
    plain = vit.run_vision(tiny_clip, frames[0], methods.build("tca", rate=0.2))
    assert not torch.allclose(with_anchor.vision.pooled, plain.pooled)
    assert with_anchor.logits.shape == (2, 2) and torch.isfinite(with_anchor.logits).all()
    assert (with_anchor.logits >= with_anchor.clip_logits).all()   # the correction only adds
    # deterministic, reset to a fresh state
    clf.reset()
    a = [clf(f).logits for f in frames]
    clf.reset()
    b = [clf(f).logits for f in frames]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    # a batch of two = the same samples one by one when the anchors do not change inside it
    clf.reset()
    both = clf(frames[1])
    clf.reset()
    one = clf(frames[1][:1])
    torch.testing.assert_close(both.logits[:1], one.logits, rtol=1e-5, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match=r"^tokenreduce\.methods\.tca: rate must be in \(0, 1\)"):
        methods.build("tca", rate=1.5)
    with pytest.raises(ValueError, match="give keep/ratio or rate, not both"):
        methods.build("tca", keep=4, rate=0.1)
    with pytest.raises(ValueError, match="layers must be increasing ints >= 1"):
        methods.build("tca", layers=(6, 3))
    with pytest.raises(ValueError, match="centers must be an int >= 1"):
        methods.build("tca", centers=0)
    m = methods.build("tca")
    x, a = _inputs(2, 17, 8)
    with pytest.raises(ValueError, match=r"needs a \[CLS\] token"):
        m(Context(x=x, cls_attn={3: a}, layer=3))
    with pytest.raises(ValueError, match="called after layer 4"):
        m(Context(x=x, has_cls=True, cls_attn={4: a}, layer=4))
    with pytest.raises(ValueError, match=r"needs ctx\.cls_attn\[3\]"):
        m(Context(x=x, has_cls=True, layer=3))
    with pytest.raises(ValueError, match="leaves no kept token"):
        methods.build("tca", rate=0.6)(Context(x=x, has_cls=True, cls_attn={3: a}, layer=3))
    with pytest.raises(TypeError, match="method must be a TCA"):
        from tokenreduce.models.tca_clip import TCAClassifier
        TCAClassifier(None, torch.zeros(2, 4), methods.build("tome", r=2))


def _authors_block(layer, h, anchor, rate):
    """ResidualAttentionBlock_Ours with a cls_token_cache on one transformers CLIP layer: the
    anchor prepended to the block's attention (its row dropped), condensation, then the MLP."""
    at = layer.self_attn
    seq = torch.cat([anchor.unsqueeze(1), h], 1)
    z = layer.layer_norm1(seq)
    B, N, D = z.shape
    H = at.num_heads
    q, k, v = (p(z).view(B, N, H, D // H).transpose(1, 2) for p in (at.q_proj, at.k_proj, at.v_proj))
    w = torch.softmax(q @ k.transpose(-1, -2) * at.scale, -1)
    out = at.out_proj((w @ v).transpose(1, 2).reshape(B, N, D))
    x1 = h + out[:, 1:]
    cls_attn = w[:, :, 1, 1:].mean(1)
    c = authors.condense_authors(x1, cls_attn, rate)
    return c + layer.mlp(layer.layer_norm2(c))


def test_anchor_block_matches_the_authors(tiny_clip):
    """With active anchors, the tokens kept at a drop layer equal the authors' block (anchor as an
    extra key / value of the block's attention); merged / fused tokens differ by design (they are
    condensed after the MLP here, before it there)."""
    m = methods.build("tca", rate=0.2)
    m.reservoir = TCAReservoir(2, 12, 32)
    g = torch.Generator().manual_seed(4)
    m.reservoir.anchors = torch.randn(2, 12, 32, generator=g)
    m.reservoir.active = torch.ones((), dtype=torch.bool)
    layers = vit.vision_parts(tiny_clip).layers
    seen = {}
    hooks = [layers[i].register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0].clone()))
             for i in (3, 4)]
    try:
        px = torch.randn(2, 3, 56, 56, generator=g)
        vit.run_vision(vit.prepare(tiny_clip), px, m)
    finally:
        for h in hooks:
            h.remove()
    x3 = seen[3]                                   # [CLS], anchor, patches: the input of drop layer 3
    cache = m.reservoir.anchors[:, 2]               # the authors' cls_token_cache[:, i - 1, :]
    best = torch.argmax(torch.nn.functional.cosine_similarity(cache.unsqueeze(1), x3[:, :1].transpose(0, 1), dim=2), 0)
    torch.testing.assert_close(x3[:, 1], cache[best])
    h = torch.cat([x3[:, :1], x3[:, 2:]], 1)
    want = _authors_block(layers[3], h, x3[:, 1], 0.2)
    k = rate_plan(64, 0.2, 4)[0]
    got = seen[4]
    assert got.shape[1] == want.shape[1]
    torch.testing.assert_close(got[:, :1 + k], want[:, :1 + k], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[:, 1 + k:], want[:, 1 + k:])


def test_anchor_path_and_reservoir_have_no_host_traffic():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from host_traffic import DEVICE, no_host_traffic
    m = methods.build("tca", keep=64)
    m.reservoir = TCAReservoir(3, 12, 32, device=DEVICE)
    x = torch.randn(2, 197, 32, device=DEVICE)
    a = torch.rand(2, 198, device=DEVICE)
    state = {}
    with no_host_traffic():
        red = m(Context(x=x, has_cls=True, layer=2, num_layers=12, state=state))            # anchor in
        red = m(Context(x=red.tokens, has_cls=True, cls_attn={3: a}, layer=3, num_layers=12, state=state,
                        size=red.size))
        logits = m.reservoir.update(torch.zeros(2, dtype=torch.long, device=DEVICE), torch.rand(2, device=DEVICE),
                                    torch.randn(2, 12, 32, device=DEVICE))
    assert red.tokens.shape[1] < 197 and logits.shape == (2, 3)

"""Every registered method (`tokenreduce.methods.available()`, read at collection time, so new
methods are covered without editing this file) runs inside every tiny architecture its stage
applies to, through its declarations only (stage, needs, reduce_layers, attention_layers,
keep_tokens): batch 2, output shapes / kept counts, finite outputs, generate for VLMs, and the
attention statistics come from the fused op (the ScoreRecorder shows no fallback).

Combinations a model cannot serve (a [CLS] statistic on SigLIP or Qwen2-VL, vision-tower
statistics of Qwen2-VL, a patch grid in LLaVA-NeXT's packed LLM tokens) must fail with a clear
error naming the reason: that is asserted, not skipped."""
import pytest
import torch

from tokenreduce import methods
from tokenreduce.methods.base import Need, Stage
from tokenreduce.models import presets, vit, vlm

VISION = ["tiny-clip", "tiny-siglip", "tiny-dinov2"]
VLMS = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"]
ARCH = {Stage.VIT: VISION + ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"],
        Stage.PROJECTOR: VISION + VLMS,
        Stage.LLM: VLMS}
STATS = {Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.KEYS, Need.QUERY_ATTN, Need.VISUAL_ATTN,
         Need.QUERY_ATTN_NOROPE}
SCORES = {Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.QUERY_ATTN, Need.VISUAL_ATTN, Need.QUERY_ATTN_NOROPE}
N_IMG = 16          # every tiny image is a 4 x 4 patch grid
KEEP = 9            # a square (pooling to a 3 x 3 grid)

CASES = [pytest.param(name, arch, id=f"{name}-{arch}") for name in methods.available()
         for arch in ARCH[methods.get(name).stage]]


def build_method(name):
    """The method with a budget of KEEP of 16 (keep=, else ratio=, else its default budget)."""
    for kw in ({"keep": KEEP}, {"ratio": KEEP / N_IMG}, {}):
        try:
            return methods.build(name, **kw)
        except (TypeError, ValueError):
            continue
    pytest.fail(f"{name}: cannot be built with keep={KEEP}, ratio={KEEP / N_IMG} or its default budget")


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = presets.build(name)
        return cache[name]
    return get


def _expected_error(meth, arch):
    """(exception type, regex) when ``arch`` cannot serve ``meth``; None when it must run."""
    needs = meth.needs
    if arch == "tiny-siglip" and Need.CLS_ATTN in needs:
        return ValueError, r"no \[CLS\]"
    if arch == "tiny-qwen2-vl" and meth.stage == Stage.VIT:
        return NotImplementedError, "windowed vision tower"
    if arch == "tiny-qwen2-vl" and meth.stage == Stage.PROJECTOR:
        if Need.CLS_ATTN in needs:
            return ValueError, r"no \[CLS\]"
        if needs & {Need.ATTN_RECEIVED, Need.VALUES, Need.KEYS}:
            return ValueError, "not collected"
    if arch == "tiny-llava-next" and meth.stage == Stage.LLM and Need.GRID in needs:
        return ValueError, "no single patch grid"
    if arch in VISION and needs & {Need.TEXT, Need.QUERY_ATTN, Need.QUERY_ATTN_NOROPE}:
        return ValueError, "has no text"
    return None


def _check_fused(rec, meth):
    assert not rec.fallbacks, f"eager / sdpa fallbacks: {dict(rec.fallbacks)}"
    if meth.needs & SCORES:     # keys / values alone are read off the projections, no probabilities
        assert rec.calls["fused"] > 0, "no statistic came from the fused op"


# -- inputs of the tiny VLMs (batch 2, left padding in row 1) ----------------------------------

def _llava_inputs(g):
    B, L = 2, 26
    px = torch.randn(B, 3, 56, 56, generator=g)
    ids = torch.randint(1, 290, (B, L), generator=g)
    ids[:, 5:21] = 300
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :3] = 0
    ids[1, :3] = 0
    return dict(input_ids=ids, attention_mask=am, pixel_values=px), N_IMG


def _next_inputs(m, g):
    B = 2
    sizes = torch.tensor([[56, 112], [56, 112]])
    px = torch.randn(B, 3, 3, 56, 56, generator=g)
    with torch.no_grad():
        f = m.model.get_image_features(pixel_values=px, image_sizes=sizes, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    f = f.pooler_output if hasattr(f, "pooler_output") else f
    n = f[0].shape[0]
    ids = torch.randint(1, 290, (B, n + 10), generator=g)
    ids[:, 4:4 + n] = 300
    am = torch.ones(B, n + 10, dtype=torch.long)
    am[1, :2] = 0
    return dict(input_ids=ids, attention_mask=am, pixel_values=px, image_sizes=sizes), n


def _qwen_inputs(g):
    def one(L):
        ids = torch.randint(1, 290, (L,), generator=g)
        ids[L - N_IMG - 4] = 302
        ids[L - N_IMG - 3:L - 3] = 300
        ids[L - 3] = 303
        return ids, torch.randn(64, 3 * 2 * 14 * 14, generator=g)
    (i0, p0), (i1, p1) = one(26), one(23)
    ids = torch.stack([i0, torch.cat([torch.zeros(3, dtype=torch.long), i1])])
    am = torch.ones(2, 26, dtype=torch.long)
    am[1, :3] = 0
    return dict(input_ids=ids, attention_mask=am, pixel_values=torch.cat([p0, p1]),
                image_grid_thw=torch.tensor([[1, 8, 8], [1, 8, 8]])), N_IMG


def _vlm_inputs(arch, m):
    g = torch.Generator().manual_seed(0)
    if arch == "tiny-llava":
        return _llava_inputs(g)
    if arch == "tiny-llava-next":
        return _next_inputs(m, g)
    return _qwen_inputs(g)


@pytest.mark.parametrize("name,arch", CASES)
def test_method_runs_in_architecture(models, name, arch):
    meth = build_method(name)
    err = _expected_error(meth, arch)
    m = models(arch)
    torch.manual_seed(0)
    if arch in VISION:
        vit.prepare(m)
        px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
        if err is not None:
            with pytest.raises(err[0], match=err[1]):
                vit.run_vision(m, px, meth)
            return
        out = vit.run_vision(m, px, meth)
        c = int(vit.vision_parts(m).has_cls)
        assert out.last_hidden_state.shape == (2, c + meth.keep_tokens(N_IMG), m.config.hidden_size)
        assert torch.isfinite(out.last_hidden_state).all()
        assert out.tracker.source.shape == (2, N_IMG) and out.steps
        _check_fused(out.recorder, meth)
        return

    if err is not None:
        with pytest.raises(err[0], match=err[1]):
            r = vlm.VLMRunner(m, meth)
            batch, _ = _vlm_inputs(arch, m)
            r.next_token_logits(**batch)
        return
    r = vlm.VLMRunner(m, meth)
    batch, n = _vlm_inputs(arch, m)
    logits = r.next_token_logits(**batch)
    assert logits.shape == (2, m.config.get_text_config().vocab_size) and torch.isfinite(logits).all()
    p = r.last
    if meth.stage == Stage.LLM:
        steps = r.llm_reducer.steps
        assert steps and steps[-1]["tokens_out"] == meth.keep_tokens(n)
        assert p.n_img == n
        _check_fused(r.llm_reducer.rec, meth)
    else:
        per_tile = arch == "tiny-llava-next" and (meth.stage == Stage.VIT or meth.needs & (
            STATS | {Need.GRID, Need.PIXELS}))
        expect = 3 * meth.keep_tokens(N_IMG) if per_tile else meth.keep_tokens(n)
        assert p.n_img == expect and (p.is_img.sum(1) == expect).all()
        if p.vision is not None:
            _check_fused(p.vision.recorder, meth)
    ids = r.generate(max_new_tokens=2, **batch)
    assert ids.shape == (2, 2)

"""Every registered method (`tokenreduce.methods.available()`, read at collection time, so new
methods are covered without editing this file) runs inside every tiny architecture its stage
applies to, through its declarations only (stage, needs, reduce_layers, attention_layers,
keep_tokens): batch 2, output shapes / kept counts, finite outputs, generate for VLMs, and the
attention statistics come from the fused op (the ScoreRecorder shows no fallback).

Combinations a model cannot serve (a [CLS] statistic on SigLIP, pixels or a VIT stage in
Qwen2-VL / Qwen2.5-VL, a patch grid in LLaVA-NeXT's packed LLM tokens) must fail with a clear
error naming the reason: that is asserted, not skipped. Qwen's vision-tower statistics come
from `tokenreduce.models.qwen_vision` (the mean attention received stands in for [CLS])."""
import pytest
import torch

from tokenreduce import methods
from tokenreduce.methods.base import Need, Stage
from tokenreduce.models import presets, vit, vlm

from _vlm_inputs import N_IMG, models, vlm_inputs  # noqa: F401 (models: a fixture)

VISION = ["tiny-clip", "tiny-siglip", "tiny-dinov2"]
QWEN = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
VLMS = ["tiny-llava", "tiny-llava-next"] + QWEN
ARCH = {Stage.VIT: VISION + ["tiny-llava", "tiny-llava-next"] + QWEN,
        Stage.PROJECTOR: VISION + VLMS,
        Stage.LLM: VLMS}
STATS = {Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.VALUES, Need.KEYS, Need.QUERY_ATTN, Need.VISUAL_ATTN,
         Need.QUERY_ATTN_NOROPE}
SCORES = {Need.CLS_ATTN, Need.ATTN_RECEIVED, Need.QUERY_ATTN, Need.VISUAL_ATTN, Need.QUERY_ATTN_NOROPE}
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


def _expected_error(meth, arch):
    """(exception type, regex) when ``arch`` cannot serve ``meth``; None when it must run."""
    needs = meth.needs
    if arch == "tiny-siglip" and Need.CLS_ATTN in needs:
        return ValueError, r"no \[CLS\]"
    if arch in QWEN and meth.stage == Stage.VIT:
        return NotImplementedError, "windowed vision tower"
    if arch in QWEN and meth.stage == Stage.PROJECTOR and Need.PIXELS in needs:
        return ValueError, "flattened patches"
    if arch == "tiny-llava-next" and meth.stage == Stage.LLM and Need.GRID in needs:
        return ValueError, "no single patch grid"
    if arch in VISION and needs & {Need.TEXT, Need.QUERY_ATTN, Need.QUERY_ATTN_NOROPE}:
        return ValueError, "has no text"
    return None


def _check_fused(rec, meth):
    assert not rec.fallbacks, f"eager / sdpa fallbacks: {dict(rec.fallbacks)}"
    if meth.needs & SCORES:     # keys / values alone are read off the projections, no probabilities
        assert rec.calls["fused"] > 0, "no statistic came from the fused op"


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
            batch, _ = vlm_inputs(arch, m)
            r.next_token_logits(**batch)
        return
    r = vlm.VLMRunner(m, meth)
    batch, n = vlm_inputs(arch, m)
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
        # [CLS] goes on into the projector (VisionZip); on Qwen (no [CLS]) the same count
        # is all image tokens (the authors' dominant - 1 is not applied there)
        cls = int(meth.projects_cls)
        expect = 3 * (meth.keep_tokens(N_IMG) + cls) if per_tile else meth.keep_tokens(n) + cls
        assert p.n_img == expect and (p.is_img.sum(1) == expect).all()
        if p.vision is not None:
            _check_fused(p.vision.recorder, meth)
    ids = r.generate(max_new_tokens=2, **batch)
    assert ids.shape == (2, 2)

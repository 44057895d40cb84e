"""FastV's FLOPs formula, decode steps and KV-cache bytes against hand computations."""
import pytest

from tokenreduce.profile import flops as FL
from tokenreduce.profile.runner import stage_times


def test_layer_flops_by_hand():
    # n=3, d=4, m=8: 4*3*16 + 2*9*4 + 2*3*4*8 = 192 + 72 + 192
    assert FL.layer_flops(3, 4, 8) == 456
    # n=2: 4*2*16 + 2*4*4 + 2*2*4*8 = 128 + 32 + 128
    assert FL.layer_flops(2, 4, 8) == 288
    assert FL.stack_flops([3, 2], 4, 8, batch=2) == 2 * (456 + 288)
    # LLaVA-1.5-7B, 32 layers at n=576+40 tokens: FastV's Table-1-style count, ~ 8.7 TFLOPs-equivalent
    n, d, m = 616, 4096, 11008
    assert FL.stack_flops([n] * 32, d, m) == 32 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    with pytest.raises(ValueError, match="flops"):
        FL.layer_flops(-1, 4, 8)


def test_decode_and_kv_by_hand():
    # one query with 3 cached tokens (+ itself): 4*16 + 2*4*4 + 2*4*8 = 64 + 32 + 64
    assert FL.decode_step_flops([3], 4, 8) == 160
    assert FL.decode_step_flops([3, 3], 4, 8, batch=2) == 640
    # 2 layers holding 3 and 2 tokens, 2 kv heads of 4, fp16, batch 3: 2*3*(3+2)*2*4*2
    assert FL.kv_cache_bytes([3, 2], 2, 4, 2, batch=3) == 480


def test_dims_from_configs():
    from tokenreduce.models import presets as P
    v = FL.vision_dims(P.config("tiny-dinov2"))
    assert (v.d, v.m) == (64, 256)
    v = FL.vision_dims(P.config("clip-vit-l-14-336"))
    assert (v.d, v.m) == (1024, 4096)
    t = FL.text_dims(P.config("llava-1.5-7b").text_config)
    assert (t.d, t.m, t.kv_heads, t.head_dim) == (4096, 11008, 32, 128)
    q = P.config("qwen2-vl-2b")
    assert (FL.vision_dims(q.vision_config).d, FL.vision_dims(q.vision_config).m) == (1280, 5120)
    t = FL.text_dims(q.text_config)
    assert (t.d, t.kv_heads, t.head_dim) == (1536, 2, 128)


def test_stage_times_from_marks():
    marks = [("start", 0.0), ("red>", 1.0), ("red<", 1.5), ("projector>", 4.0), ("projector<", 5.0),
             ("lm>", 6.0), ("red>", 7.0), ("red<", 7.25), ("lm<", 10.0), ("lm>", 10.5), ("lm<", 12.0),
             ("lm>", 12.5), ("lm<", 14.0), ("end", 14.5)]
    s = stage_times(marks)
    assert s["vision"] == pytest.approx(3.5)          # 0..4 minus the 0.5 reduction inside it
    assert s["projector"] == pytest.approx(2.0)       # 4..6
    assert s["prefill"] == pytest.approx(3.75)        # 6..10 minus 0.25
    assert s["reduction"] == pytest.approx(0.75)
    assert s["decode_per_token"] == pytest.approx(2.0)  # (14 - 10) / 2 steps
    assert s["total"] == pytest.approx(14.5)
    enc = stage_times([("start", 0.0), ("red>", 2.0), ("red<", 3.0), ("end", 5.0)])
    assert enc["vision"] == pytest.approx(4.0) and enc["reduction"] == pytest.approx(1.0)
    assert enc["prefill"] is None and enc["decode_per_token"] is None

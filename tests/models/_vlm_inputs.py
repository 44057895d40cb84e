"""Inputs of the tiny VLMs (batch 2, left padding in row 1), shared by the model tests;
each builder returns (batch kwargs, image tokens per sample). `llava` is a module-scoped
fixture and `models` a module-scoped cache of tiny presets (a test module imports them by name)."""
import pytest
import torch

from tokenreduce.models import presets

N_IMG = 16          # every tiny image is a 4 x 4 patch grid


def llava_inputs(g):
    """LLaVA-1.5: 26 tokens, the image at 5:21, left padding of 3 in row 1."""
    B, L = 2, 26
    px = torch.randn(B, 3, 56, 56, generator=g)
    ids = torch.randint(1, 290, (B, L), generator=g)
    ids[:, 5:21] = 300
    am = torch.ones(B, L, dtype=torch.long)
    am[1, :3] = 0
    ids[1, :3] = 0
    return dict(input_ids=ids, attention_mask=am, pixel_values=px), N_IMG


def next_inputs(m, g):
    """LLaVA-NeXT: one 56 x 112 image per sample (3 tiles: base image + 2 crops), as many image tokens as the
    model's packed features; left padding of 2 in row 1."""
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


def qwen_inputs(g):
    """Qwen2-VL: an 8 x 8 patch grid (16 merged tokens) per sample, rows of 26 and 23 tokens (the
    second left-padded)."""
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


def vlm_inputs(arch, m):
    """The inputs of tiny preset ``arch`` (seed 0) -> (batch kwargs, image tokens per sample)."""
    g = torch.Generator().manual_seed(0)
    if arch == "tiny-llava":
        return llava_inputs(g)
    if arch == "tiny-llava-next":
        return next_inputs(m, g)
    return qwen_inputs(g)


@pytest.fixture(scope="module")
def llava():
    """tiny-llava and its inputs: 16 image tokens (4 x 4 patches) at 5:21, left padding in row 1."""
    batch, _ = llava_inputs(torch.Generator().manual_seed(0))
    return presets.build("tiny-llava"), batch["input_ids"], batch["attention_mask"], batch["pixel_values"]


@pytest.fixture(scope="module")
def models():
    """``models(name)``: the tiny preset ``name``, built once per test module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = presets.build(name)
        return cache[name]
    return get

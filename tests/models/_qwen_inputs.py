"""Inputs and an eager oracle for the tiny Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL),
shared by test_qwen_vision.py and test_qwen3_vl.py."""
import torch

from tokenreduce.models import attention

EAGER = "tokenreduce_test_eager"
CHUNKS = []             # (layer, probabilities, keys, values) per attention segment, filled by _eager


def pixels(grids, patch, seed=0):
    """Flattened patches ``[sum t*h*w, patch]`` for images of (t, h, w) patch grids."""
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, patch, generator=torch.Generator().manual_seed(seed))


def prompt_batch(grids, lengths, patch, seed=0, token_types=False):
    """One image per row (grid ``grids[i]``, t*(h/2)*(w/2) image tokens 300 between 302 and 303),
    rows of ``lengths[i]`` tokens, left-padded; with ``token_types`` also the processor's
    ``mm_token_type_ids`` (Qwen3-VL)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    rows, mask = [], []
    for (t, h, w), n_row in zip(grids, lengths):
        n = t * (h // 2) * (w // 2)
        ids = torch.randint(1, 290, (n_row,), generator=g)
        ids[n_row - n - 4] = 302
        ids[n_row - n - 3:n_row - 3] = 300
        ids[n_row - 3] = 303
        rows.append(torch.cat([torch.zeros(L - n_row, dtype=torch.long), ids]))
        mask.append((torch.arange(L) >= L - n_row).long())
    ids = torch.stack(rows)
    batch = dict(input_ids=ids, attention_mask=torch.stack(mask), pixel_values=pixels(grids, patch, seed),
                 image_grid_thw=torch.tensor(grids))
    if token_types:
        batch["mm_token_type_ids"] = (ids == 300).int()
    return batch


def _eager(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain softmax attention on one segment (transformers splits by the true cu_seqlens)."""
    p = torch.softmax((q @ k.transpose(-1, -2)) * scaling, dim=-1)
    CHUNKS.append((module._tokenreduce_layer, p, k, v))
    return (p @ v).transpose(1, 2).contiguous(), None


def eager_statistics(visual, grids, px):
    """(tower output, {layer: (received, keys, values)}) in original patch order from explicit
    probabilities over transformers' own segments (window order undone with transformers'
    window index)."""
    from transformers import AttentionInterface, vision_utils
    AttentionInterface.register(EAGER, _eager)
    old = visual.config._attn_implementation
    visual.set_attn_implementation(EAGER)
    attention.tag_layers(visual.blocks, "vision")
    CHUNKS.clear()
    g = torch.tensor(grids)
    with torch.no_grad():
        feats = visual(px, grid_thw=g).pooler_output
    visual.set_attn_implementation(old)
    perm = torch.arange(px.shape[0])
    if getattr(visual.config, "fullatt_block_indexes", None) is not None:
        index, _ = vision_utils.get_vision_window_index(g, visual.config.spatial_merge_size,
                                                        visual.config.window_size, visual.config.patch_size)
        perm = (index[:, None] * 4 + torch.arange(4)).reshape(-1)
    inv = torch.argsort(perm)
    frame = torch.cat([torch.full((h * w,), float(h * w)) for t, h, w in grids for _ in range(t)])[perm]
    out = {}
    for layer in range(len(visual.blocks)):
        parts = [(p, k, v) for l, p, k, v in CHUNKS if l == layer]
        rec = torch.cat([p[0].mean(0).sum(0) for p, _, _ in parts]) / frame
        keys = torch.cat([k[0].mean(0) for _, k, _ in parts])
        vals = torch.cat([v[0].transpose(0, 1).reshape(v.shape[2], -1) for _, _, v in parts])
        out[layer] = (rec[inv], keys[inv], vals[inv])
    return feats, out

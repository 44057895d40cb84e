"""The vLLM-free half of the Qwen2.5-VL plugin (`tokenreduce.vllm.qwen_reduce`; runs in the main
environment too): the placeholder count fixed at preprocessing equals what transformers +
tokenreduce.patch keeps, the kept tokens' order and M-RoPE channels, the refused methods."""
import pytest
import torch

pytest.importorskip("transformers")

from tokenreduce.models import presets  # noqa: E402
from tokenreduce.vllm.config import method_of_spec  # noqa: E402
from tokenreduce.vllm.qwen_reduce import check_method, kept_order, kept_tokens, merged_positions  # noqa: E402


@pytest.mark.parametrize("spec", [{"method": "visionzip", "keep": 6}, {"method": "hiprune", "ratio": 0.25},
                                  {"method": "divprune", "ratio": 0.5}], ids=lambda s: s["method"])
def test_kept_tokens_per_grid_equal_the_patched_transformers_model(spec):
    import tokenreduce
    model = presets.build("tiny-qwen2.5-vl").eval()
    cfg = model.config
    cfg.tokenreduce = dict(spec)
    ids = cfg.image_token_id
    for h, w in [(8, 8), (8, 12), (12, 4)]:          # patches; merged grid (h / 2, w / 2)
        n = h * w // 4
        row = torch.tensor([[5, cfg.vision_start_token_id] + [ids] * n + [cfg.vision_end_token_id, 7]])
        px = torch.randn(h * w, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(h * w))
        with tokenreduce.patched(model, method_of_spec(spec)) as handle, torch.no_grad():
            model(input_ids=row, attention_mask=torch.ones_like(row), pixel_values=px,
                  image_grid_thw=torch.tensor([[1, h, w]]), mm_token_type_ids=(row == ids).int())
        (want,) = handle.stats[-1].tokens_out
        assert kept_tokens(cfg, (1, h // 2, w // 2)) == int(want) < n
    del cfg.tokenreduce
    assert kept_tokens(cfg, (1, 4, 4)) is None


def test_kept_order_places_synthesised_tokens_first_free_then_sorts():
    # 6 merged tokens; output slots: kept 4, a synthesised token, kept 1, another synthesised
    perm, where = kept_order(torch.tensor([4, -1, 1, -1]), 6)
    # the synthesised tokens take the first unused positions 0 and 2, in output order
    assert where.tolist() == [0, 1, 2, 4] and perm.tolist() == [1, 2, 3, 0]


def test_merged_positions_are_grid_coordinates_and_the_text_offset():
    pos = merged_positions(torch.tensor([0, 5, 11]), (1, 3, 4))
    assert pos.tolist() == [[0, 0, 0, 4], [0, 1, 1, 4], [0, 2, 3, 4]]


def test_vit_and_pixel_methods_are_refused():
    with pytest.raises(NotImplementedError, match="projector methods only"):
        check_method(method_of_spec({"method": "tome", "options": {"r": 4}}))
    with pytest.raises(NotImplementedError, match="flattened patches"):
        check_method(method_of_spec({"method": "vflowopt", "keep": 8}))

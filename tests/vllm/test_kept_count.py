"""The placeholder count the plugin puts in the prompt (a shape-only run of the tower on the meta
device) equals the features the reduction really returns, for every method the plugin accepts,
including ToMe / Turbo whose count depends on the tower's depth (runs without vLLM too)."""
import pytest
import torch

from tokenreduce.methods import available, get
from tokenreduce.methods.base import Stage
from tokenreduce.vllm.config import REFUSED_NEEDS, method_of_spec
from tokenreduce.vllm.tower import kept_count

ACCEPTED = [n for n in available() if get(n).stage != Stage.LLM and not set(REFUSED_NEEDS) & get(n).needs]


@pytest.fixture(scope="module")
def llava(tiny_llava):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(tiny_llava, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ACCEPTED)
def test_meta_count_equals_the_real_reduction(llava, name):
    from tokenreduce.models.adapters.llava import LlavaAdapter
    method = method_of_spec({"method": name, "keep": 64})
    cfg = llava.config
    want = kept_count(cfg.vision_config, method, cfg.vision_feature_layer, cfg.vision_feature_select_strategy)
    adapter = LlavaAdapter(llava, method)
    with torch.no_grad():
        feats, _ = adapter.project(adapter.run_tower(torch.randn(2, 3, 336, 336), None))
    assert feats.shape[1] == want
    if name in ("tome", "turbo"):
        assert want > 64          # 3 tower layers: fewer merges than the nominal 24-layer schedule

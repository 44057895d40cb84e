"""The plugin inside vLLM's LLM(): reduced generation equals transformers with the same
reduction token for token (greedy), prompts shrink from N to K placeholders per image, the
statistics come from the fused op, and without a tokenreduce entry the model is plain vLLM."""
import gc

import numpy as np
import pytest

pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed (tools/vllm_venv.sh makes .venv-vllm)")

import _vllm_run as vllm_run  # noqa: E402
from _vllm_reference import patched_generate, reference_generate  # noqa: E402

NEW_TOKENS = 8
N_IMG = 576     # CLIP 336/14
VISIONZIP = {"method": "visionzip", "keep": 64}


def images(seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
            ((300, 400), (500, 200), (336, 336), (120, 640))]


def batch(imgs):
    """Prompts with 0, 1 and 2 images of different sizes."""
    return [{"prompt": "USER: <image> describe the image ASSISTANT:", "images": [imgs[0]]},
            {"prompt": "USER: hello say something ASSISTANT:", "images": []},
            {"prompt": "USER: <image> compare <image> ASSISTANT:", "images": [imgs[1], imgs[2]]},
            {"prompt": "USER: what is in this picture ? <image> ASSISTANT:", "images": [imgs[3]]}]


def make_llm(path, spec=None):
    return vllm_run.make_llm(path, spec)


def run(llm, prompts):
    return vllm_run.run(llm, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def reduced(tiny_llava):
    llm = make_llm(tiny_llava, VISIONZIP)
    yield llm
    del llm
    gc.collect()


def test_reduced_generation_equals_transformers(tiny_llava, reduced):
    prompts = batch(images(0))
    outs = run(reduced, prompts)
    want = reference_generate(tiny_llava, prompts, VISIONZIP, NEW_TOKENS)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == want
    assert len({tuple(g) for g in got}) > 1       # outputs depend on the prompt / image


def test_reduced_generation_equals_transformers_with_tokenreduce_patch(tiny_llava, reduced):
    """The plugin against the user-facing transformers path: tokenreduce.patch + HF generate
    (prompts with 0 or 1 image: the patched LLaVA reduces each prompt's one image)."""
    prompts = [p for p in batch(images(5)) if len(p["images"]) <= 1]
    got = [list(o.outputs[0].token_ids) for o in run(reduced, prompts)]
    assert got == patched_generate(tiny_llava, prompts, VISIONZIP, NEW_TOKENS)


def test_prompt_tokens_drop_from_n_to_k_per_image(tiny_llava, reduced):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llava)
    prompts = batch(images(1))
    for p, o in zip(prompts, run(reduced, prompts)):
        text_tokens = len(tok(p["prompt"], add_special_tokens=False)["input_ids"]) - len(p["images"])
        assert len(o.prompt_token_ids) == text_tokens + 64 * len(p["images"])
        # unreduced it would be text_tokens + N_IMG per image
        assert o.prompt_token_ids.count(tok.convert_tokens_to_ids("<image>")) == 64 * len(p["images"])


def test_statistics_come_from_the_fused_op(reduced, monkeypatch):
    calls = vllm_run.record_fused_calls(monkeypatch)
    run(reduced, batch(images(2))[:1])      # a new image: not in vLLM's encoder / processor caches
    assert calls and calls[0] == [0]         # VisionZip's [CLS] row, from the fused op


def test_visionzip_keeps_image_dependent_tokens(tiny_llava, reduced):
    """Which tokens are kept depends on the image: two images give different kept sets (through
    the reference, which the generation test ties to the plugin)."""
    import torch
    from tokenreduce.models.adapters.llava import LlavaAdapter
    from tokenreduce.vllm.config import method_of_spec
    from _vllm_reference import load
    model, proc = load(tiny_llava)
    adapter = LlavaAdapter(model, method_of_spec(VISIONZIP))
    px = proc.image_processor(images(3)[:2], return_tensors="pt")["pixel_values"]
    vis = adapter.run_tower(px, None)
    idx = vis.reduction.index
    # [CLS] + 53 dominant + 10 contextual = 64 (the authors' budget, issue 14)
    assert idx.shape == (2, 64) and not torch.equal(idx[0], idx[1])


def test_unreduced_equals_plain_vllm_and_transformers(tiny_llava, reduced):
    prompts = batch(images(4))
    # first: deleting a second in-process LLM tears down vLLM's (global) parallel state
    reduced_tokens = [list(o.outputs[0].token_ids) for o in run(reduced, prompts)]
    llm = make_llm(tiny_llava)
    got = [list(o.outputs[0].token_ids) for o in run(llm, prompts)]
    lens = [len(o.prompt_token_ids) for o in run(llm, prompts)]
    del llm
    gc.collect()
    assert got == reference_generate(tiny_llava, prompts, None, NEW_TOKENS)
    # plain vLLM: the plugin not loaded at all (VLLM_PLUGINS names none), in a fresh process
    plain, plain_lens = vllm_run.plain_vllm("test_plugin", tiny_llava, 4, timeout=300)
    assert got == plain and lens == plain_lens
    assert lens[0] > N_IMG
    assert reduced_tokens[1] == got[1] and reduced_tokens != got   # text-only equal; images reduced

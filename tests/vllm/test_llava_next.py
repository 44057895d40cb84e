"""The plugin's LLaVA-NeXT (anyres) inside vLLM's LLM(): reduced generation equals transformers +
tokenreduce.patch with the same method token for token (greedy) for a per-tile PROJECTOR method
(VisionZip), a ViT-stage method (ToMe) and a packed PROJECTOR method (DivPrune); one generate call
serves prompts with 0, 1 and 2 images of different sizes and tile counts; prompts hold K
placeholders per image; what the transformers path refuses is refused with the same reason;
without a tokenreduce entry the model is plain vLLM."""
import gc

import numpy as np
import pytest

pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed (tools/vllm_venv.sh makes .venv-vllm)")

import _vllm_run as vllm_run  # noqa: E402
from _llava_next_reference import patched_batch_error, patched_generate, reference_generate  # noqa: E402

NEW_TOKENS = 6
VISIONZIP = {"method": "visionzip", "keep": 16}      # per tile: 16 of 65 ([CLS] counted), 2 / 3 / 5 tiles
TOME = {"method": "tome", "keep": 16}                # ViT stage, per tile: merges after layers 0 and 1 -> 20
DIVPRUNE = {"method": "divprune", "keep": 48}        # packed: 48 of the image's unpadded tokens + newlines
K_TILE = {"visionzip": 16, "tome": 20}
SIZES = ((300, 400), (80, 90), (100, 300), (100, 300), (400, 150))   # tiles 5, 2, 3, 3, 3


def images(seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def batch(imgs):
    """Prompts with 0, 1 and 2 images of different sizes and tile counts (the 2-image prompt's
    images share a size: transformers reduces a prompt's images together)."""
    return [{"prompt": "USER: <image> describe the image ASSISTANT:", "images": [imgs[0]]},
            {"prompt": "USER: hello say something ASSISTANT:", "images": []},
            {"prompt": "USER: <image> compare <image> ASSISTANT:", "images": [imgs[2], imgs[3]]},
            {"prompt": "USER: what is in this picture ? <image> ASSISTANT:", "images": [imgs[1]]},
            {"prompt": "USER: <image> what is this ? ASSISTANT:", "images": [imgs[4]]}]


def one_image(prompts):
    return [p for p in prompts if len(p["images"]) <= 1]


def make_llm(path, spec=None):
    return vllm_run.make_llm(path, spec)


def run(llm, prompts):
    return vllm_run.run(llm, prompts, NEW_TOKENS)


def tokens(outs):
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def tiny_llava_next(tmp_path_factory):
    """A random LLaVA-NeXT (CLIP 112/14 tiles, 4 grid pinpoints) saved in vLLM's weight names."""
    from _llava_next_model import save_llava_next
    return save_llava_next(tmp_path_factory.mktemp("models") / "tiny-llava-next")


@pytest.fixture(scope="module")
def llms(tiny_llava_next):
    """One LLM per method, built on first use and kept to the module's end (deleting an in-process
    LLM tears down vLLM's global parallel state under the others)."""
    made = {}

    def get(name, spec):
        if name not in made:
            made[name] = make_llm(tiny_llava_next, spec)
        return made[name]
    yield get
    made.clear()
    gc.collect()


@pytest.mark.parametrize("spec", [VISIONZIP, TOME, DIVPRUNE], ids=lambda s: s["method"])
def test_reduced_generation_equals_transformers_with_tokenreduce_patch(tiny_llava_next, llms, spec):
    """One generate call with every prompt (0, 1, 2 images; 2, 3, 5 tiles): the prompts with at most
    one image equal tokenreduce.patch + HF generate; all of them (the 2-image prompt too) equal the
    piece-by-piece reference."""
    prompts = batch(images(0))
    got = tokens(run(llms(spec["method"], spec), prompts))
    keep = [i for i, p in enumerate(prompts) if len(p["images"]) <= 1]
    assert [got[i] for i in keep] == patched_generate(tiny_llava_next, one_image(prompts), spec, NEW_TOKENS)
    assert got == reference_generate(tiny_llava_next, prompts, spec, NEW_TOKENS)
    assert len({tuple(g) for g in got}) > 2       # outputs depend on the prompt / image


def test_prompt_tokens_drop_to_k_per_image(tiny_llava_next, llms):
    from transformers import AutoConfig, AutoTokenizer
    from tokenreduce.vllm.llava_next import num_tiles
    tok = AutoTokenizer.from_pretrained(tiny_llava_next)
    image_id = tok.convert_tokens_to_ids("<image>")
    cfg = AutoConfig.from_pretrained(tiny_llava_next)
    prompts = batch(images(1))
    for spec in (VISIONZIP, TOME, DIVPRUNE):
        for p, o in zip(prompts, run(llms(spec["method"], spec), prompts)):
            text_tokens = len(tok(p["prompt"], add_special_tokens=False)["input_ids"]) - len(p["images"])
            if spec is DIVPRUNE:
                k = [48] * len(p["images"])
            else:
                k = [num_tiles(cfg, im.height, im.width) * K_TILE[spec["method"]] for im in p["images"]]
            assert len(o.prompt_token_ids) == text_tokens + sum(k)
            assert o.prompt_token_ids.count(image_id) == sum(k)


def test_statistics_come_from_the_fused_op(llms, monkeypatch):
    calls = vllm_run.record_fused_calls(monkeypatch)
    run(llms("visionzip", VISIONZIP), batch(images(2))[:1])     # a new image: not in vLLM's caches
    assert calls and calls[0] == [0]         # VisionZip's [CLS] row, from the fused op


@pytest.mark.parametrize("spec", [VISIONZIP, DIVPRUNE], ids=lambda s: s["method"])
def test_refused_with_the_transformers_reason(tiny_llava_next, llms, spec):
    """Images that tokenreduce.patch refuses to reduce together (different tile counts per tile;
    different packed counts) are refused in one vLLM prompt with the same reason."""
    imgs = images(3)
    a, b = imgs[0], imgs[1]                  # 5 and 2 tiles; 268 and 136 packed tokens
    hf = patched_batch_error(tiny_llava_next, [{"prompt": "USER: <image> describe ASSISTANT:", "images": [a]},
                                               {"prompt": "USER: <image> describe ASSISTANT:", "images": [b]}], spec)
    reason = ("images with different tile counts [5, 2]: batch equal tile counts for a per-tile method"
              if spec is VISIONZIP else "images with different tile counts: the PROJECTOR budget is applied per "
              "image, got feature counts [136, 268]; they must be equal per batch here (batch equal tile counts")
    assert hf.startswith("tokenreduce.models.vlm: " + reason)
    with pytest.raises(ValueError) as e:
        run(llms(spec["method"], spec), [{"prompt": "USER: <image> compare <image> ASSISTANT:", "images": [a, b]}])
    assert str(e.value).startswith("tokenreduce.vllm: " + reason)
    # the LLM still serves the next request
    assert len(run(llms(spec["method"], spec), batch(imgs)[:2])) == 2


def test_unreduced_equals_plain_vllm_and_transformers(tiny_llava_next, llms):
    prompts = batch(images(4))
    reduced = tokens(run(llms("visionzip", VISIONZIP), prompts))
    outs = run(llms("none", None), prompts)
    got, lens = tokens(outs), [len(o.prompt_token_ids) for o in outs]
    assert got == reference_generate(tiny_llava_next, prompts, None, NEW_TOKENS)
    assert [got[i] for i, p in enumerate(prompts) if len(p["images"]) <= 1] == \
        patched_generate(tiny_llava_next, one_image(prompts), None, NEW_TOKENS)
    # plain vLLM: the plugin not loaded at all (VLLM_PLUGINS names none), in a fresh process
    plain, plain_lens = vllm_run.plain_vllm("test_llava_next", tiny_llava_next, 4, timeout=300)
    assert got == plain and lens == plain_lens
    # unreduced: the processor's N per image (base 64 + unpadded crops + newline tokens)
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(tiny_llava_next)
    want = [proc(images=p["images"] or None, text=p["prompt"], return_tensors="pt")["input_ids"].shape[1]
            for p in one_image(prompts)]
    assert [lens[i] for i, p in enumerate(prompts) if len(p["images"]) <= 1] == want
    assert lens[0] > 5 * 16 + 5
    assert reduced[1] == got[1] and reduced != got   # text-only equal; images reduced

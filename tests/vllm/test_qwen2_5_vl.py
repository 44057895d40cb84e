"""The plugin on Qwen2.5-VL inside vLLM's LLM(): reduced generation equals transformers +
tokenreduce.patch with the same method token for token (greedy), for VisionZip (keep=K),
HiPrune (ratio=r, attention received) and VTC-CLS (full and window blocks); prompts hold K placeholders per image instead of N; the
M-RoPE positions of the kept tokens are the transformers path's; statistics come from the
fused op; without a tokenreduce entry the model is plain vLLM."""
import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed (tools/vllm_venv.sh makes .venv-vllm)")

import _vllm_run as vllm_run  # noqa: E402

from _qwen2_5_vl_model import IDS, IMAGE_PAD, PROMPT_IMAGE, VISION_END, VISION_START, save_qwen2_5_vl  # noqa: E402

NEW_TOKENS = 6
VISIONZIP = {"method": "visionzip", "keep": 8}
HIPRUNE = {"method": "hiprune", "ratio": 0.25}
VTC_CLS = {"method": "vtc-cls", "keep": 8}      # reads a full-attention block and a window block
SIZES = ((120, 200), (224, 112), (90, 90), (160, 160))     # (h, w) px: different grids


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return save_qwen2_5_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2.5-vl")


def images(seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def batch(imgs):
    """Prompts with 1, 0, 2 and 1 images of different sizes."""
    return [{"prompt": f"user: {PROMPT_IMAGE} describe the image assistant:", "images": [imgs[0]]},
            {"prompt": "user: hello say something assistant:", "images": []},
            {"prompt": f"user: {PROMPT_IMAGE} compare {PROMPT_IMAGE} assistant:", "images": [imgs[1], imgs[2]]},
            {"prompt": f"user: what is in this picture ? {PROMPT_IMAGE} assistant:", "images": [imgs[3]]}]


def make_llm(path, spec=None):
    return vllm_run.make_llm(path, spec, limit_mm={"image": 2, "video": 0})


def run(llm, prompts):
    return vllm_run.run(llm, prompts, NEW_TOKENS)


_HF = {}


def hf(path):
    """(transformers model float32, processor), cached per path."""
    if path not in _HF:
        import torch
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        _HF[path] = (model, AutoProcessor.from_pretrained(path))
    return _HF[path]


def hf_inputs(proc, p):
    return proc(text=[p["prompt"]], images=list(p["images"]) or None, return_tensors="pt")


def hf_generate(path, prompts, spec):
    """Greedy new tokens per prompt of transformers' generate, with ``tokenreduce.patch`` and
    the spec's method (None: plain transformers), on the processor's unreduced prompt."""
    import torch
    import tokenreduce
    from tokenreduce.vllm.config import method_of_spec
    model, proc = hf(path)
    out = []
    for p in prompts:
        b = hf_inputs(proc, p)
        kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        with torch.no_grad():
            if spec is None:
                gen = model.generate(**b, **kw)
            else:
                with tokenreduce.patched(model, method_of_spec(spec)):
                    gen = model.generate(**b, **kw)
        out.append(gen[0, b["input_ids"].shape[1]:].tolist())
    return out


def hf_reduced_image(path, spec, img):
    """One image reduced by transformers + tokenreduce.patch (a one-image prompt): (its kept
    features ``[K, D]`` in sequence order, their (t, h, w) from the image's start ``[3, K]``,
    ``max(t, h, w)`` of its merged grid)."""
    import torch
    import tokenreduce
    from tokenreduce.vllm.config import method_of_spec
    model, proc = hf(path)
    b = hf_inputs(proc, {"prompt": f"user: {PROMPT_IMAGE} assistant:", "images": [img]})
    with tokenreduce.patched(model, method_of_spec(spec)) as h, torch.no_grad():
        model(**b)
    p = h.last
    img_at = p.is_img[0]
    pos = p.position_ids[:, 0]
    start = pos[0, img_at.nonzero()[0, 0] - 1] + 1                  # after <|vision_start|>
    t, gh, gw = (int(v) for v in b["image_grid_thw"][0])
    return p.inputs_embeds[0, img_at], pos[:, img_at] - start, max(t, gh // 2, gw // 2)


def hf_reference_generate(path, p, spec):
    """Greedy new tokens of a prompt with several images, from transformers' own pieces: each
    image reduced on its own by tokenreduce.patch (`hf_reduced_image`; the patched Qwen2.5-VL
    reduces one image per prompt), placed at the prompt's K placeholders with its kept
    positions (text after an image at its start + max(t, h, w), as ``get_rope_index``), then
    the language model decoding greedily with 3D positions."""
    import torch
    model, proc = hf(path)
    tok = proc.tokenizer
    parts = [hf_reduced_image(path, spec, im) for im in p["images"]]
    chunks = p["prompt"].split(PROMPT_IMAGE)
    ids, embeds, pos, nxt = [], [], [], 0
    emb_of = model.get_input_embeddings()
    for i, text in enumerate(chunks):
        words = tok(text, add_special_tokens=False)["input_ids"] if text.strip() else []
        if i > 0:
            words = [IDS[VISION_END]] + words
        if i < len(chunks) - 1:
            words = words + [IDS[VISION_START]]
        ids += words
        embeds.append(emb_of(torch.tensor(words)))
        pos.append(torch.arange(nxt, nxt + len(words)).expand(3, -1))
        nxt += len(words)
        if i < len(parts):
            feats, where, span = parts[i]
            ids += [IDS[IMAGE_PAD]] * feats.shape[0]
            embeds.append(feats)
            pos.append(where + nxt)
            nxt += span
    emb = torch.cat(embeds)[None]
    position_ids = torch.cat(pos, dim=1)[:, None]
    lm, out = model.model.language_model, []
    with torch.no_grad():
        o = lm(inputs_embeds=emb, position_ids=position_ids, use_cache=True)
        for step in range(NEW_TOKENS):
            nt = int(model.lm_head(o.last_hidden_state[:, -1]).argmax(-1))
            out.append(nt)
            q = torch.full((3, 1, 1), int(position_ids.max()) + 1 + step)
            o = lm(inputs_embeds=emb_of(torch.tensor([[nt]])), position_ids=q, past_key_values=o.past_key_values,
                   use_cache=True)
    return ids, out


def merged_tokens(path, img):
    """N: the merged tokens of an image (its unreduced placeholders)."""
    _, proc = hf(path)
    t, h, w = (int(v) for v in proc.image_processor([img], return_tensors="pt")["image_grid_thw"][0])
    return t * h * w // 4


def hf_kept(path, spec, img):
    """K: the tokens transformers + tokenreduce.patch keeps of an image (its handle's stats)."""
    import torch
    import tokenreduce
    from tokenreduce.vllm.config import method_of_spec
    model, proc = hf(path)
    p = {"prompt": f"user: {PROMPT_IMAGE} assistant:", "images": [img]}
    with tokenreduce.patched(model, method_of_spec(spec)) as h, torch.no_grad():
        model(**hf_inputs(proc, p))
    (k,) = h.stats[-1].tokens_out
    return int(k)


def _owned_llm(path, spec):
    """A module fixture's LLM with ``spec``, freed after the module."""
    llm = make_llm(path, spec)
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def visionzip(tiny_qwen):
    yield from _owned_llm(tiny_qwen, VISIONZIP)


@pytest.fixture(scope="module")
def hiprune(tiny_qwen):
    yield from _owned_llm(tiny_qwen, HIPRUNE)


@pytest.fixture(scope="module")
def vtccls(tiny_qwen):
    yield from _owned_llm(tiny_qwen, VTC_CLS)


def test_visionzip_equals_transformers_with_tokenreduce_patch(tiny_qwen, visionzip):
    """One generate call over prompts with 0, 1 and 2 images of different sizes; the prompts
    with at most one image against transformers + tokenreduce.patch, the two-image prompt (the
    patched Qwen2.5-VL reduces one image per prompt) against itself alone and against
    transformers' pieces (`hf_reference_generate`)."""
    prompts = batch(images(0))
    got = [list(o.outputs[0].token_ids) for o in run(visionzip, prompts)]
    one = [i for i, p in enumerate(prompts) if len(p["images"]) <= 1]
    assert [got[i] for i in one] == hf_generate(tiny_qwen, [prompts[i] for i in one], VISIONZIP)
    alone = [list(o.outputs[0].token_ids) for o in run(visionzip, prompts[2:3])]
    assert alone == [got[2]]
    # the two-image prompt against transformers' pieces (which give the patched path's tokens on
    # a one-image prompt)
    ids, want = hf_reference_generate(tiny_qwen, prompts[2], VISIONZIP)
    assert got[2] == want and len(ids) == len(run(visionzip, prompts[2:3])[0].prompt_token_ids)
    assert hf_reference_generate(tiny_qwen, prompts[0], VISIONZIP)[1] == got[0]
    assert len({tuple(g) for g in got}) > 1       # outputs depend on the prompt / image


def test_hiprune_ratio_equals_transformers_with_tokenreduce_patch(tiny_qwen, hiprune):
    """A ratio budget (round(r * N) of each image's N merged tokens) and a method reading the
    attention received (the fused op inside vLLM's windowed tower)."""
    prompts = [p for p in batch(images(1)) if len(p["images"]) <= 1]
    got = [list(o.outputs[0].token_ids) for o in run(hiprune, prompts)]
    assert got == hf_generate(tiny_qwen, prompts, HIPRUNE)


@pytest.mark.parametrize("which", ["visionzip", "hiprune"])
def test_prompt_tokens_drop_from_n_to_k_per_image(tiny_qwen, visionzip, hiprune, which):
    llm, spec = (visionzip, VISIONZIP) if which == "visionzip" else (hiprune, HIPRUNE)
    _, proc = hf(tiny_qwen)
    prompts = batch(images(2))
    ks = set()
    for p, o in zip(prompts, run(llm, prompts)):
        n = [merged_tokens(tiny_qwen, im) for im in p["images"]]
        k = [hf_kept(tiny_qwen, spec, im) for im in p["images"]]
        ks.update(k)
        unreduced = hf_inputs(proc, p)["input_ids"].shape[1]
        assert len(o.prompt_token_ids) == unreduced - sum(n) + sum(k)
        assert o.prompt_token_ids.count(IDS[IMAGE_PAD]) == sum(k)
        assert all(b < a for a, b in zip(n, k))
    # keep=8: 8 of every image; ratio=0.25: a quarter of each image's own count
    assert ks == {8} if which == "visionzip" else len(ks) > 1


def test_kept_tokens_keep_their_original_mrope_positions(tiny_qwen, visionzip):
    """The positions the LLM runs with (prompt and first decode step) equal the transformers
    path's: the kept tokens' original (t, h, w), the text after the image unshifted."""
    import torch
    import tokenreduce
    from tokenreduce.vllm.config import method_of_spec
    from tokenreduce.vllm.qwen2_5_vl import ReducedQwen2_5_VLForConditionalGeneration as Model
    seen = []
    real = Model.forward

    def recording(self, input_ids, positions, *a, **k):
        seen.append(positions.clone())
        return real(self, input_ids, positions, *a, **k)
    p = {"prompt": f"user: {PROMPT_IMAGE} describe the image assistant:", "images": [images(3)[1]]}
    Model.forward = recording
    try:
        out = run(visionzip, [p])[0]
    finally:
        Model.forward = real
    L = len(out.prompt_token_ids)
    prefill = seen[0]                                              # one request: one prefill step
    model, proc = hf(tiny_qwen)
    with tokenreduce.patched(model, method_of_spec(VISIONZIP)) as h, torch.no_grad():
        model(**hf_inputs(proc, p))
    want = h.last.position_ids[:, 0]                               # [3, L'] the reduced prompt
    assert want.shape[-1] == L and prefill.shape[-1] == L
    assert torch.equal(prefill[:, :L].cpu(), want.cpu())
    nxt = [s for s in seen if s.shape[-1] == 1][0]
    assert torch.equal(nxt.cpu().flatten(), h.last.next_position.cpu().expand(3))
    # an image of 8 x 4 merged tokens: the kept positions are a subset of its grid
    img = torch.tensor(out.prompt_token_ids) == IDS[IMAGE_PAD]
    kept = want[:, img]
    assert kept.shape[1] == 8 and len({tuple(c) for c in kept.T.tolist()}) == 8
    # not the provisional positions vLLM computed from the prompt (the first 8 of the grid):
    # the runner rewrote them from the embeddings' position channels
    grid = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(8), torch.arange(4), indexing="ij")).reshape(3, -1)
    first = want[:, img.nonzero()[0, 0] - 1] + 1                  # after <|vision_start|>
    assert not torch.equal(kept, grid[:, :8] + first[:, None])


def test_statistics_come_from_the_fused_op(visionzip, hiprune, monkeypatch):
    import tokenreduce.ops as ops
    calls = []
    real = ops.attention_with_scores

    def counting(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)
    monkeypatch.setattr(ops, "attention_with_scores", counting)
    run(visionzip, batch(images(4))[:1])      # new images: not in vLLM's encoder / processor caches
    assert calls                               # VisionZip's attention (the [CLS] substitute)
    calls.clear()
    run(hiprune, batch(images(5))[:1])
    assert calls


def test_full_and_window_block_statistics_equal_transformers(tiny_qwen, vtccls, monkeypatch):
    """VTC-CLS reads the [CLS] substitute of a full-attention block (1) and of a window block
    (2): both from the fused op (one segment per frame / one per window), equal to transformers."""
    import tokenreduce.ops as ops
    segments = []
    real = ops.attention_with_scores

    def counting(*a, **k):
        segments.append(a[0].shape[0])
        return real(*a, **k)
    monkeypatch.setattr(ops, "attention_with_scores", counting)
    prompts = batch(images(8))[:2]                # one image of 4 x 7 merged tokens, and text only
    got = [list(o.outputs[0].token_ids) for o in run(vtccls, prompts)]
    monkeypatch.undo()
    # one fused call per block read: the full block over 1 frame, the window block over 2 windows
    assert sorted(segments) == [1, 2]
    assert got == hf_generate(tiny_qwen, prompts, VTC_CLS)


def test_unreduced_equals_plain_vllm_and_transformers(tiny_qwen, visionzip):
    prompts = batch(images(6))
    reduced = [list(o.outputs[0].token_ids) for o in run(visionzip, prompts)]
    llm = make_llm(tiny_qwen)
    outs = run(llm, prompts)
    got = [list(o.outputs[0].token_ids) for o in outs]
    lens = [len(o.prompt_token_ids) for o in outs]
    del llm
    gc.collect()
    one = [i for i, p in enumerate(prompts) if len(p["images"]) <= 1]
    assert [got[i] for i in one] == hf_generate(tiny_qwen, [prompts[i] for i in one], None)
    # plain vLLM: the plugin not loaded at all (VLLM_PLUGINS names none), in a fresh process
    plain, plain_lens = vllm_run.plain_vllm("test_qwen2_5_vl", tiny_qwen, 6, timeout=400)
    assert got == plain and lens == plain_lens
    assert reduced[1] == got[1] and reduced != got   # text-only equal; images reduced


TP_SCRIPT = """
import json, sys
sys.path.insert(0, {here!r})
import test_qwen2_5_vl as t
from vllm import LLM
if __name__ == "__main__":
    llm = LLM({path!r}, tensor_parallel_size=2, distributed_executor_backend="mp", max_model_len=2048,
              enforce_eager=True, seed=0, dtype="float32", limit_mm_per_prompt={{"image": 2, "video": 0}},
              hf_overrides={{"tokenreduce": {spec!r}}})
    outs = t.run(llm, t.batch(t.images(7)))
    print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


@pytest.mark.skipif(os.environ.get("TOKENREDUCE_VLLM_QWEN_TP") != "1",
                    reason="~2.5 min (two worker processes): TOKENREDUCE_VLLM_QWEN_TP=1 runs it; the same "
                           "combination runs in CI for LLaVA (test_tp.py)")
def test_tensor_parallel_2_equals_transformers(tiny_qwen):
    """tensor_parallel_size=2 on the CPU (two worker processes): the vision tower's heads are
    sharded, the statistics of each rank's heads combined (`combine_head_shards`)."""
    from test_tp import core_sets
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_CPU_OMP_THREADS_BIND"] = core_sets()
    script = os.path.join(os.path.dirname(tiny_qwen), "run_qwen_tp2.py")
    with open(script, "w") as f:
        f.write(TP_SCRIPT.format(here=os.path.dirname(os.path.abspath(__file__)), path=tiny_qwen, spec=HIPRUNE))
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=480)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, res.stderr[-4000:]
    got = json.loads(line[0][7:])
    prompts = batch(images(7))
    one = [i for i, p in enumerate(prompts) if len(p["images"]) <= 1]
    assert [got[i] for i in one] == hf_generate(tiny_qwen, [prompts[i] for i in one], HIPRUNE)

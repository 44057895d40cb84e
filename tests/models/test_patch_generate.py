"""HF ``generate`` in full on a patched model: sampling with a seed, beam search, streaming,
left-padded batches of 3 (Qwen2-VL: images of different sizes), a chat template through a
processor, ``return_dict_in_generate``, ``use_cache=False``; every run is traced at the
language model and its ids / masks / positions / cache lengths are checked consistent."""
import contextlib

import pytest
import torch

import tokenreduce
from tokenreduce.models import presets, vlm
from tokenreduce.models.patching.vlm import generate_positions

from _methods import EveryOtherLLM, TopClsProjector, TopNormProjector, TopQueryLLM
from _tiny_processor import tiny_llava_processor
from _vlm_inputs import vlm_inputs

NEW = 4


@pytest.fixture(scope="module")
def llava():
    m = presets.build("tiny-llava")
    return m, vlm_inputs("tiny-llava", m)[0]


@pytest.fixture(scope="module")
def qwen():
    return presets.build("tiny-qwen2-vl")


@contextlib.contextmanager
def trace_lm(m):
    """Record every call of the language model: (sequence length, mask, positions, cache length)."""
    calls = []

    def hook(module, args, kwargs):
        emb, cache = kwargs.get("inputs_embeds"), kwargs.get("cache", kwargs.get("past_key_values"))
        am, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
        calls.append(dict(L=emb.shape[1], mask=None if am is None else am.clone(),
                          pos=None if pos is None else pos.clone(),
                          cache=cache.get_seq_length() if cache is not None else 0))
    h = m.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        h.remove()


def check_consistent(calls, p, steps, mrope=False):
    """The prefill saw the prepared (reduced) inputs; decoding step k saw one token, a cache of
    ``L' + k - 1``, a mask of ``L' + k`` columns starting with the prefill's, and the next
    position (M-RoPE: on all three rows)."""
    pre = calls[0]
    Lp = p.inputs_embeds.shape[1]
    assert pre["L"] == Lp and pre["cache"] == 0 and torch.equal(pre["mask"], p.attention_mask)
    if mrope:
        assert torch.equal(pre["pos"], p.position_ids)
        nxt = p.next_position
    else:
        gp = generate_positions(p.attention_mask)
        assert torch.equal(pre["pos"], gp)
        nxt = gp[:, -1] + 1
    assert len(calls) == steps
    for k, c in enumerate(calls[1:], start=1):
        assert c["L"] == 1 and c["cache"] == Lp + k - 1
        assert c["mask"].shape[1] == Lp + k and torch.equal(c["mask"][:, :Lp], p.attention_mask)
        want = (nxt + k - 1)[:, None]
        assert torch.equal(c["pos"], want[None].expand(3, -1, -1) if mrope else want)


def test_sampling_with_a_seed_equals_the_runner_path_and_is_consistent(llava):
    m, batch = llava
    meth = TopClsProjector(keep=6)
    outs = []
    for _ in range(2):
        with tokenreduce.patched(m, meth) as h, trace_lm(m) as calls:
            torch.manual_seed(0)
            outs.append(m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_p=0.9,
                                   pad_token_id=0)[:, -NEW:])
        check_consistent(calls, h.last, NEW)
    assert torch.equal(outs[0], outs[1])
    r = vlm.VLMRunner(m, meth)
    p = r.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    torch.manual_seed(0)
    with torch.no_grad():
        ref = m.generate(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=True, top_p=0.9, pad_token_id=0)
    m.set_attn_implementation("sdpa")
    assert torch.equal(outs[0], ref)


@pytest.mark.parametrize("meth", [TopNormProjector(keep=5), EveryOtherLLM(keep=8)], ids=lambda m: m.name)
def test_beam_search_equals_the_runner_path(llava, meth):
    m, batch = llava
    with tokenreduce.patched(m, meth) as h:
        got = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3, do_sample=False,
                         pad_token_id=0)[:, -NEW:]
    assert len(h.stats[-1].tokens_in) == 6                   # 2 samples x 3 beams
    r = vlm.VLMRunner(m, meth)
    p = r.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    ctx = r.llm_reducer.active(p.is_img.repeat_interleave(3, 0), p.n_img) if r.llm_reducer else contextlib.nullcontext()
    with ctx, torch.no_grad():
        ref = m.generate(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, max_new_tokens=NEW,
                         min_new_tokens=NEW, num_beams=3, do_sample=False, pad_token_id=0)
    m.set_attn_implementation("sdpa")
    assert torch.equal(got, ref)


def _qwen_batch_of_3(seed=0):
    """Three samples, images of 8x8 / 4x8 / 8x4 patches (16 / 8 / 8 merged tokens), left-padded."""
    g = torch.Generator().manual_seed(seed)
    rows, pxs, thw = [], [], []
    for (h, w), L in zip([(8, 8), (4, 8), (8, 4)], [26, 19, 15]):
        n = (h // 2) * (w // 2)
        ids = torch.randint(6, 290, (L,), generator=g)
        ids[L - n - 4] = 302
        ids[L - n - 3:L - 3] = 300
        ids[L - 3] = 303
        rows.append(ids)
        pxs.append(torch.randn(h * w, 3 * 2 * 14 * 14, generator=g))
        thw.append([1, h, w])
    Lmax = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.zeros(Lmax - len(r), dtype=torch.long), r]) for r in rows])
    am = torch.stack([(torch.arange(Lmax) >= Lmax - len(r)).long() for r in rows])
    return dict(input_ids=ids, attention_mask=am, pixel_values=torch.cat(pxs), image_grid_thw=torch.tensor(thw),
                mm_token_type_ids=(ids == 300).int()), rows, pxs, thw


def test_qwen_left_padded_batch_of_3_different_sizes_greedy_beams_sampling(qwen):
    m = qwen
    batch, rows, pxs, thw = _qwen_batch_of_3()
    meth = TopNormProjector(keep=4)
    with tokenreduce.patched(m, meth) as h, trace_lm(m) as calls:
        got = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[:, -NEW:]
    check_consistent(calls, h.last, NEW, mrope=True)
    assert h.stats[-1].tokens_in == [16, 8, 8] and h.stats[-1].tokens_out == [4, 4, 4]
    # each sample alone gives the same tokens
    for i in range(3):
        one = dict(input_ids=rows[i][None], attention_mask=torch.ones(1, len(rows[i]), dtype=torch.long),
                   pixel_values=pxs[i], image_grid_thw=torch.tensor([thw[i]]),
                   mm_token_type_ids=(rows[i][None] == 300).int())
        with tokenreduce.patched(m, meth):
            alone = m.generate(**one, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[:, -NEW:]
        assert torch.equal(alone, got[i:i + 1]), i
    # beams: the packed pixels of each image are repeated per beam
    with tokenreduce.patched(m, meth) as h:
        beams = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=2, do_sample=False)
    assert beams.shape == (3, batch["input_ids"].shape[1] + NEW) and h.stats[-1].tokens_in == [16, 16, 8, 8, 8, 8]
    with tokenreduce.patched(m, meth), trace_lm(m) as calls:
        torch.manual_seed(0)
        m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=5)
    assert len(calls) == NEW
    # the LLM stage needs one image-token count per sample: refused for different sizes
    with tokenreduce.patched(m, TopQueryLLM(keep=4, at=1)), \
            pytest.raises(ValueError, match="same image-token count"):
        m.generate(**batch, max_new_tokens=2)


def test_qwen_reduced_positions_are_the_kept_tokens_original_positions(qwen):
    batch, *_ = _qwen_batch_of_3(1)
    with tokenreduce.patched(qwen, None) as h:
        with torch.no_grad():
            qwen(**batch)
    full = h.last
    with tokenreduce.patched(qwen, TopNormProjector(keep=3)) as h:
        with torch.no_grad():
            qwen(**batch)
    p = h.last
    for b in range(3):
        kept = p.position_ids[:, b][:, p.is_img[b]]
        allp = full.position_ids[:, b][:, full.is_img[b]]
        assert kept.shape[1] == 3
        assert all(any(torch.equal(kept[:, j], allp[:, i]) for i in range(allp.shape[1])) for j in range(3))
        torch.testing.assert_close(p.position_ids[:, b, -3:], full.position_ids[:, b, -3:])


@pytest.mark.parametrize("method,kw", [("visionzip", dict(keep=6)), ("fastv", dict(keep=6, layer=1)),
                                       (TopClsProjector(keep=5), {})], ids=["visionzip", "fastv", "topcls"])
def test_chat_template_batch_of_3_streaming(llava, capsys, method, kw):
    """The processor's chat template, three left-padded prompts of different lengths, streamed."""
    import numpy as np
    from PIL import Image
    from transformers import TextStreamer
    m, _ = llava
    proc = tiny_llava_processor()
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((rng.random((64 + 8 * i, 80, 3)) * 255).astype("uint8")) for i in range(3)]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": " ".join(
                                                                        f"t{10 + j}" for j in range(i + 1))}]}],
                                      add_generation_prompt=True) for i in range(3)]
    batch = proc(images=imgs, text=texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any()       # left padding
    with tokenreduce.patched(m, method, **kw) as h, trace_lm(m) as calls:
        out = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    check_consistent(calls, h.last, NEW)
    st = h.stats[-1]
    assert st.tokens_in == [16, 16, 16] and st.tokens_out == [kw.get("keep", 5)] * 3
    assert not st.fallbacks
    assert m.config._attn_implementation == "sdpa"
    # streaming one prompt prints the same new tokens
    one = proc(images=imgs[:1], text=texts[:1], return_tensors="pt")
    capsys.readouterr()
    with tokenreduce.patched(m, method, **kw):
        ids = m.generate(**one, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         streamer=TextStreamer(proc.tokenizer, skip_prompt=True))
    printed = capsys.readouterr().out.split()
    assert printed == proc.tokenizer.decode(ids[0, -NEW:]).split()
    assert out.shape == (3, batch["input_ids"].shape[1] + NEW)


@pytest.mark.parametrize("meth", [TopNormProjector(keep=5), EveryOtherLLM(keep=8)], ids=lambda m: m.name)
def test_return_dict_in_generate_and_use_cache_false(llava, qwen, meth):
    for m, batch in ((llava[0], llava[1]), (qwen, vlm_inputs("tiny-qwen2-vl", qwen)[0])):
        with tokenreduce.patched(m, meth) as h:
            ref = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
            res = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, output_scores=True)
            n0 = len(h.stats)
            nocache = m.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                 use_cache=False)
        assert torch.equal(res.sequences, ref) and len(res.scores) == NEW
        assert torch.equal(nocache, ref)
        assert len(h.stats) - n0 == NEW                      # every step without a cache is a (reduced) prefill

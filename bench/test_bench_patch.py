"""HF ``generate`` with and without `tokenreduce.patch`, on LLaVA-1.5-7B's architecture with
4 LLM layers and random weights (CPU, float32, about 6 GB), or on tiny-llava with ``--quick``.

    pytest bench/test_bench_patch.py -q -p no:randomly           # the 7B architecture (once)
    pytest bench/test_bench_patch.py -q --quick                  # tiny-llava (CI smoke run)
    TOKENREDUCE_BENCH_PATCH_ROUNDS=2 pytest bench/test_bench_patch.py ...   # fewer timed rounds

Variants, timed in alternating rounds (same run, medians):

* ``hf``: the unpatched model, ``model.generate(input_ids, pixel_values, ...)``;
* ``patched``: the same call on the model patched with VisionZip (576 -> 64; quick: 16 -> 4);
* ``runner``: tokenreduce's former runner path for the same method (the adapter's prepared
  inputs, then ``generate(inputs_embeds=...)``), the path `patch` must be no slower than.

Per call, hooks on the language model split the time: ``prefill`` (call start to the end of
the first LLM call: vision tower, reduction, LLM prefill), ``llm_prefill`` (the first LLM call)
and ``decode_per_token`` (the later LLM calls, per generated token). The ratios hf / patched
are printed beside the analytic LLM FLOPs ratio (`tokenreduce.profile.flops`) and stored in
the benchmark's ``extra_info``. No speed target is asserted (random weights, a shared CPU).
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Dict, List

import pytest
import torch

import tokenreduce
from tokenreduce import measure, methods
from tokenreduce.models import presets, vlm
from tokenreduce.profile import flops

PHASES = ("prefill", "llm_prefill", "decode_per_token")


def _setup(quick: bool):
    if quick:
        name, layers, keep, new, rounds = "tiny-llava", None, 4, 4, 3
    else:
        name, layers, keep, new = "llava-1.5-7b", 4, 64, 8
        rounds = int(os.environ.get("TOKENREDUCE_BENCH_PATCH_ROUNDS", "3"))   # ~1-3 min a round on 2 cores
    m = presets.build(name, layers=layers)
    cfg = m.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    n_img = side * side
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor([1]), torch.randint(10, 290, (12,), generator=g),
                     torch.full((n_img,), cfg.image_token_id), torch.randint(10, 290, (20,), generator=g)])[None]
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                 pixel_values=torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size,
                                          generator=g))
    return m, batch, n_img, keep, new, rounds


class LMClock:
    """perf_counter marks around every language-model call."""

    def __init__(self, lm):
        self.marks: List[tuple] = []
        self.hs = [lm.register_forward_pre_hook(lambda *a: self.marks.append((">", time.perf_counter()))),
                   lm.register_forward_hook(lambda *a: self.marks.append(("<", time.perf_counter())))]

    def split(self, t0: float) -> Dict[str, float]:
        starts = [t for k, t in self.marks if k == ">"]
        ends = [t for k, t in self.marks if k == "<"]
        dec = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else float("nan")
        return {"prefill": ends[0] - t0, "llm_prefill": ends[0] - starts[0], "decode_per_token": dec}

    def remove(self):
        for h in self.hs:
            h.remove()


def test_generate_patched_vs_unpatched(benchmark, quick, speed_log, bench_threads):
    m, batch, n_img, keep, new, rounds = _setup(quick)
    lm = m.model.language_model
    method = methods.build("visionzip", keep=keep)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def hf():
        return m.generate(**batch, **gen)

    def patched():
        with tokenreduce.patched(m, method):
            return m.generate(**batch, **gen)

    def runner():
        r = vlm.VLMRunner(m, method)
        p = r.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        out = m.generate(inputs_embeds=p.inputs_embeds, attention_mask=p.attention_mask, **gen)
        m.set_attn_implementation("sdpa")
        return out

    fns = {"hf": hf, "patched": patched, "runner": runner}
    times: Dict[str, Dict[str, List[float]]] = {k: {p: [] for p in PHASES} for k in fns}

    def one_round():
        for name, fn in fns.items():
            clock = LMClock(lm)
            t0 = time.perf_counter()
            with torch.inference_mode():
                fn()
            clock.remove()
            for p, v in clock.split(t0).items():
                times[name][p].append(v)

    with measure.threads(bench_threads):
        one_round()                                     # warm-up (allocator, first-call costs)
        for v in times.values():
            for p in PHASES:
                v[p].clear()
        benchmark.group = "patch: HF generate, LLaVA-1.5 " + ("tiny" if quick else "7B arch, 4 LLM layers")
        benchmark.name = "one round (hf + patched + runner)"
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)

    med = {k: {p: statistics.median(v[p]) for p in PHASES} for k, v in times.items()}
    t = flops.text_dims(m.config.get_text_config())
    L = batch["input_ids"].shape[1]
    Lr = L - n_img + keep
    layers = [L] * len(lm.layers)
    red = [Lr] * len(lm.layers)
    fl_prefill = flops.stack_flops(layers, t.d, t.m) / flops.stack_flops(red, t.d, t.m)
    fl_decode = flops.decode_step_flops(layers, t.d, t.m) / flops.decode_step_flops(red, t.d, t.m)
    info = {"quick": quick, "image_tokens": n_img, "keep": keep, "new_tokens": new, "threads": bench_threads,
            "llm_flops_ratio_prefill": fl_prefill, "llm_flops_ratio_decode": fl_decode}
    for p in PHASES:
        info[f"{p}_ms"] = {k: 1e3 * v[p] for k, v in med.items()}
        info[f"{p}_ratio_hf_over_patched"] = med["hf"][p] / med["patched"][p]
        info[f"{p}_ratio_runner_over_patched"] = med["runner"][p] / med["patched"][p]
    benchmark.extra_info.update(info)
    speed_log.append(f"patch visionzip {n_img}->{keep}: LLM FLOPs {fl_prefill:.2f}x fewer (prefill), "
                     f"{fl_decode:.2f}x (decode)")
    for p in PHASES:
        ms = " / ".join(f"{k} {1e3 * v[p]:.1f} ms" for k, v in med.items())
        speed_log.append(f"  {p:17s} {ms}; hf/patched {info[f'{p}_ratio_hf_over_patched']:.2f}x, "
                         f"runner/patched {info[f'{p}_ratio_runner_over_patched']:.2f}x")
    assert len(times["patched"]["prefill"]) == rounds

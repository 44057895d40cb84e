"""vLLM's side of the plugin tests, shared by test_plugin / test_llava_next / test_qwen2_5_vl:
prompts ``{"prompt", "images"}`` to vLLM inputs, an in-process LLM (the plugin spec in
``hf_overrides``), greedy generation, and the same run in a fresh process without the plugin
(plain vLLM: ``VLLM_PLUGINS`` names none)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


def vllm_inputs(prompts: List[Dict]) -> List[Dict]:
    return [{"prompt": p["prompt"], **({"multi_modal_data": {"image": p["images"] if len(p["images"]) > 1
                                                             else p["images"][0]}} if p["images"] else {})}
            for p in prompts]


def make_llm(path: str, spec: Optional[Dict] = None, limit_mm: Optional[Dict[str, int]] = None):
    """vLLM's LLM on the tiny checkpoint at ``path``, in-process, float32; ``spec`` is the
    tokenreduce entry of ``hf_overrides`` (None: the model as vLLM runs it)."""
    from vllm import LLM
    kw = {"hf_overrides": {"tokenreduce": spec}} if spec is not None else {}
    return LLM(path, distributed_executor_backend="uni", max_model_len=2048, enforce_eager=True, seed=0,
               dtype="float32", limit_mm_per_prompt=limit_mm or {"image": 2}, **kw)


def run(llm, prompts: List[Dict], new_tokens: int):
    """Greedy, exactly ``new_tokens`` tokens per prompt -> vLLM's RequestOutputs."""
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return llm.generate(vllm_inputs(prompts), sp, use_tqdm=False)


def plain_vllm(module: str, path: str, image_seed: int, timeout: float) -> Tuple[List[List[int]], List[int]]:
    """In a fresh process without the plugin: ``module``'s ``make_llm(path)`` and
    ``run(llm, batch(images(image_seed)))`` -> (generated ids per prompt, prompt lengths)."""
    script = (f"import json, sys; sys.path.insert(0, {HERE!r}); import {module} as t\n"
              f"llm = t.make_llm({path!r}); outs = t.run(llm, t.batch(t.images({image_seed})))\n"
              "print('RESULT', json.dumps([[list(o.outputs[0].token_ids) for o in outs], "
              "[len(o.prompt_token_ids) for o in outs]]))")
    env = {**os.environ, "VLLM_PLUGINS": ""}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, res.stderr[-3000:]
    plain, lens = json.loads(line[0][7:])
    return plain, lens


def record_fused_calls(monkeypatch) -> List:
    """Count `tokenreduce.ops.attention_with_scores` calls from now on: the returned list gets
    each call's ``score_rows``."""
    import tokenreduce.ops as ops
    calls: List = []
    real = ops.attention_with_scores

    def counting(*a, **k):
        calls.append(k.get("score_rows"))
        return real(*a, **k)
    monkeypatch.setattr(ops, "attention_with_scores", counting)
    return calls

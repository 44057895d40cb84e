"""tensor_parallel_size=2 in vLLM on the CPU (two worker processes, one core set each): the
tower's heads are sharded, the statistics combined across the ranks (`combine_head_shards`),
and the reduced generation still equals transformers' (one process, every head) token for token."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed (tools/vllm_venv.sh makes .venv-vllm)")

from _vllm_reference import reference_generate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = """
import json, sys
sys.path.insert(0, {here!r})
import test_plugin as t
from vllm import LLM
if __name__ == "__main__":
    kw = {{"hf_overrides": {{"tokenreduce": t.VISIONZIP}}}}
    llm = LLM({path!r}, tensor_parallel_size=2, distributed_executor_backend="mp", max_model_len=2048,
              enforce_eager=True, seed=0, dtype="float32", limit_mm_per_prompt={{"image": 2}}, **kw)
    outs = t.run(llm, t.batch(t.images(0)))
    print("RESULT", json.dumps([[list(o.outputs[0].token_ids) for o in outs], [len(o.prompt_token_ids) for o in outs]]))
"""


def core_sets():
    """VLLM_CPU_OMP_THREADS_BIND for two ranks: the allowed cores split in halves ("0|1" on 2)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("tensor parallel on the CPU needs 2 cores (one per rank)")
    half = len(cores) // 2
    return "|".join(",".join(map(str, c)) for c in (cores[:half], cores[half:2 * half]))


def test_tensor_parallel_2_equals_transformers(tiny_llava):
    import test_plugin as t
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["VLLM_CPU_OMP_THREADS_BIND"] = core_sets()
    script = os.path.join(os.path.dirname(tiny_llava), "tp2.py")
    with open(script, "w") as f:
        f.write(SCRIPT.format(here=HERE, path=tiny_llava))
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=480)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, res.stderr[-4000:]
    got, lens = json.loads(line[0][7:])
    prompts = t.batch(t.images(0))
    assert got == reference_generate(tiny_llava, prompts, t.VISIONZIP, t.NEW_TOKENS)
    assert lens[0] < 100 and lens[2] < 200          # K = 64 placeholders per image, not 576

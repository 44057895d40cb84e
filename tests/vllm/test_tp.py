"""vLLM runs in a fresh process: tensor_parallel_size=2 on the CPU (two worker processes, one core
set each; the tower's heads are sharded and the statistics combined across the ranks by
`combine_head_shards`), and a ViT-stage method (ToMe, merging between the tower's blocks). Both
equal transformers (one process, every head) token for token."""
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
    llm = LLM({path!r}, tensor_parallel_size={tp}, distributed_executor_backend={backend!r}, max_model_len=2048,
              enforce_eager=True, seed=0, dtype="float32", limit_mm_per_prompt={{"image": 2}},
              hf_overrides={{"tokenreduce": {spec!r}}})
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


def generate_in_subprocess(path, spec, tp):
    env = dict(os.environ)
    if tp > 1:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        env["VLLM_CPU_OMP_THREADS_BIND"] = core_sets()
    script = os.path.join(os.path.dirname(path), f"run_{spec['method']}_tp{tp}.py")
    with open(script, "w") as f:
        f.write(SCRIPT.format(here=HERE, path=path, tp=tp, backend="mp" if tp > 1 else "uni", spec=spec))
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=480)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, res.stderr[-4000:]
    return json.loads(line[0][7:])


def test_tensor_parallel_2_equals_transformers(tiny_llava):
    import test_plugin as t
    got, lens = generate_in_subprocess(tiny_llava, t.VISIONZIP, tp=2)
    assert got == reference_generate(tiny_llava, t.batch(t.images(0)), t.VISIONZIP, t.NEW_TOKENS)
    assert lens[0] < 100 and lens[2] < 200          # K = 64 placeholders per image, not 576


def test_vit_stage_tome_equals_transformers(tiny_llava):
    import test_plugin as t
    from tokenreduce.vllm.config import method_of_spec
    from tokenreduce.vllm.tower import kept_count
    from _vllm_reference import load
    spec = {"method": "tome", "keep": 64}
    cfg = load(tiny_llava)[0].config
    k = kept_count(cfg.vision_config, method_of_spec(spec), cfg.vision_feature_layer,
                   cfg.vision_feature_select_strategy)
    got, lens = generate_in_subprocess(tiny_llava, spec, tp=1)
    assert got == reference_generate(tiny_llava, t.batch(t.images(0)), spec, t.NEW_TOKENS)
    assert lens[1] == 5 and lens[0] == k + 5 and lens[2] == 2 * k + 3 and 64 < k < 576

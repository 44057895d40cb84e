"""tests/vllm: the vLLM plugin and `tokenreduce serve`, in .venv-vllm (tools/vllm_venv.sh;
run with tools/vllm_tests.sh). A module that needs vLLM starts with
``pytest.importorskip("vllm.entrypoints")``, so the main suite (no vLLM) skips it with that reason
(not ``"vllm"``: pytest puts tests/ on sys.path, where this folder is a namespace package ``vllm``).

vLLM runs in-process and single-rank for speed (``LLM()`` takes 6-7 s instead of 45-65 s in its
default multi-process mode) and OpenMP threads sleep instead of spin-waiting (~14 ms per kernel
otherwise); the KV cache is kept small (shared 23 GiB machine)."""
import os

import pytest

FAST_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "KMP_BLOCKTIME": "0", "OMP_WAIT_POLICY": "PASSIVE",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
            "TOKENIZERS_PARALLELISM": "false"}
for _k, _v in FAST_ENV.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A random LLaVA-1.5 (CLIP 336/14: 576 image tokens) saved in vLLM's weight names."""
    pytest.importorskip("transformers")
    from tokenreduce.testing.tiny_vlm import save_llava
    return save_llava(tmp_path_factory.mktemp("models") / "tiny-llava")

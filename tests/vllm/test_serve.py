"""`tokenreduce serve` as a subprocess, queried by the real openai client (chat completion with
an image as a data URL); a bad method or budget refuses to start with one line; SIGINT (Ctrl-C)
and SIGTERM shut the server down cleanly."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm.entrypoints", reason="vLLM is not installed (tools/vllm_venv.sh makes .venv-vllm)")
openai = pytest.importorskip("openai")

from tokenreduce.vllm.client import free_port, image_data_url, wait_healthy  # noqa: E402

STARTUP_S = 240


def serve_cmd(*args):
    return [sys.executable, "-m", "tokenreduce", "serve", *args]


def start(path, port, *args):
    cmd = serve_cmd(path, "--port", str(port), "--distributed-executor-backend", "uni", "--enforce-eager",
                    "--dtype", "float32", "--max-model-len", "2048", "--limit-mm-per-prompt", '{"image": 2}',
                    *args)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_ready(proc, port):
    try:
        wait_healthy(proc, port, STARTUP_S)
    except RuntimeError as e:
        log = proc.stdout.read()[-4000:] if proc.poll() is not None else ""
        raise AssertionError(f"{e}\n{log}")


def stop(proc, sig):
    """``sig`` to the server's process group (what Ctrl-C in a terminal does), then the exit status
    and the log; every process of the group (API server, engine core) must be gone."""
    os.killpg(proc.pid, sig)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("server did not stop within 90 s")
    for _ in range(30):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("processes of the server were left running")
    return rc, proc.stdout.read()


def data_url(seed):
    return image_data_url(seed)


def chat(client, model, seed):
    return client.chat.completions.create(
        model=model, max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "describe the image"},
                                               {"type": "image_url", "image_url": {"url": data_url(seed)}}]}])


def test_serve_answers_the_openai_client_with_k_image_tokens_and_stops_on_ctrl_c(tiny_llava):
    port = free_port()
    proc = start(tiny_llava, port, "--method", "visionzip", "--keep", "64")
    try:
        wait_ready(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        r = chat(client, tiny_llava, 0)
        assert r.choices[0].message.content is not None and r.usage.completion_tokens == 4
        # "user: <image> describe the image assistant:" (+ a newline token or not): 64 image tokens, not 576
        assert 64 < r.usage.prompt_tokens < 64 + 12
    finally:
        rc, log = stop(proc, signal.SIGINT)
    assert rc == 0, log[-3000:]
    with pytest.raises(OSError):        # the port is free: nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def test_serve_unreduced_and_sigterm(tiny_llava):
    port = free_port()
    proc = start(tiny_llava, port)
    try:
        wait_ready(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert chat(client, tiny_llava, 1).usage.prompt_tokens > 576
    finally:
        rc, log = stop(proc, signal.SIGTERM)
    assert rc == 0, log[-3000:]

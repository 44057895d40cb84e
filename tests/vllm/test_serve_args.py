"""`tokenreduce serve` before vLLM starts (runs in the main suite too): a bad method or budget
refuses with one line, without vLLM it says how to install it, and the vLLM command line it
would exec (loopback, the tokenreduce entry merged into --hf-overrides, vLLM's options passed on)."""
import json
import subprocess
import sys
import time

import pytest

from tokenreduce.vllm import serve


def run_serve(*args):
    return subprocess.run([sys.executable, "-m", "tokenreduce", "serve", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--method", "nope", "--keep", "64"], "tokenreduce serve: tokenreduce.vllm: unknown method 'nope'"),
    (["--method", "visionzip", "--keep", "0"], "tokenreduce serve: tokenreduce.methods.visionzip: keep must be"),
    (["--method", "visionzip", "--ratio", "1.5"], "tokenreduce serve: tokenreduce.methods.visionzip: ratio must be"),
    (["--method", "fastv", "--keep", "64"], "tokenreduce serve: tokenreduce.vllm: fastv runs inside the LLM"),
    (["--method", "visionzip", "--keep", "64", "--opt", "nope=1"],
     "tokenreduce serve: tokenreduce.methods.visionzip: unknown option(s) ['nope']"),
    (["--keep", "64"], "tokenreduce serve: tokenreduce.vllm: --keep / --ratio / --opt need --method"),
])
def test_bad_method_or_budget_refuses_to_start_with_one_line(args, message, capsys, monkeypatch):
    monkeypatch.setattr(serve.os, "execv", lambda *a: pytest.fail("vLLM was started"))
    assert serve.main(["some/model", *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert out == ""


def test_the_command_refuses_before_vllm_is_imported():
    t0 = time.time()
    res = run_serve("some/model", "--method", "nope", "--keep", "64")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("tokenreduce serve: tokenreduce.vllm: unknown method 'nope'; known: ")
    assert time.time() - t0 < 60


def test_without_vllm_it_says_how_to_install_it():
    import importlib.util
    spec = importlib.util.find_spec("vllm")
    if spec is not None and spec.origin is not None:
        pytest.skip("vLLM is installed here")
    res = run_serve("some/model", "--method", "visionzip", "--keep", "64")
    assert res.returncode == 1
    assert res.stderr.strip() == f"tokenreduce serve: {serve.INSTALL_HINT}"
    assert "tools/vllm_venv.sh" in serve.INSTALL_HINT


def test_the_vllm_command_line():
    args, rest, spec = serve.parse(["m", "--method", "visionzip", "--keep", "64", "--opt", "layer=-2",
                                    "--max-model-len", "4096", "--hf-overrides", '{"foo": 1}'])
    assert spec == {"method": "visionzip", "keep": 64, "layer": -2}
    cmd = serve.vllm_command(args, rest, spec)
    assert cmd[:3] == [sys.executable, "-c", serve.SERVER]
    assert cmd[cmd.index("--model") + 1] == "m" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert json.loads(cmd[cmd.index("--hf-overrides") + 1]) == {"foo": 1, "tokenreduce": spec}
    assert cmd[-2:] == ["--max-model-len", "4096"]
    args, rest, spec = serve.parse(["m"])
    assert spec is None and "--hf-overrides" not in serve.vllm_command(args, rest, spec)

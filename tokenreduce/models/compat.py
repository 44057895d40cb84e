"""What differs between the transformers releases the models layer supports (5.17 to 5.24).

transformers 5.17 (the GPU machine's) and 5.24 (the CPU venv's) name and call DINOv2 differently:

| | 5.17 | 5.24 |
|---|---|---|
| `Dinov2Layer.forward` | ``(hidden_states)`` | ``(hidden_states, attention_mask=None, **kwargs)`` |
| attention weights | ``attention.attention.query/key/value``, ``attention.output.dense`` | ``attention.q_proj/k_proj/v_proj/o_proj`` |

The rest of the package speaks the 5.24 names; these helpers bridge to whatever is installed:

* `run_layer(layer, h)`: one encoder block on ``h`` ``[B, N, D]`` without an attention mask.
* `attention_projections(attention)`: ``(q, k, v, o)`` `nn.Linear` of a DINOv2 ``layer.attention``.
* `dinov2_state_dict(sd, model)`: a state dict in 5.24 names renamed to ``model``'s names.
* `construct(cls, config, device, dtype)`: a model built directly on ``device`` in ``dtype``
  (random init there; no float32 CPU copy first: a 7B model in bf16 on the GPU in seconds).
"""
from __future__ import annotations

import inspect
from typing import Dict, Tuple

import torch
from torch import Tensor, nn

__all__ = ["run_layer", "attention_projections", "dinov2_state_dict", "construct", "DINOV2_517_NAMES"]

# 5.24 attention name -> 5.17 name, inside each ``encoder.layer.<i>.``
DINOV2_517_NAMES = {"attention.q_proj.": "attention.attention.query.",
                    "attention.k_proj.": "attention.attention.key.",
                    "attention.v_proj.": "attention.attention.value.",
                    "attention.o_proj.": "attention.output.dense."}

_TAKES_MASK: Dict[type, bool] = {}


def _takes_mask(layer: nn.Module) -> bool:
    """Whether ``layer.forward`` has a second positional parameter (the attention mask)."""
    t = type(layer)
    if t not in _TAKES_MASK:
        params = list(inspect.signature(layer.forward).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        _TAKES_MASK[t] = len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
    return _TAKES_MASK[t]


def run_layer(layer: nn.Module, h: Tensor) -> Tensor:
    """One vision encoder block on ``h`` ``[B, N, D]``, no attention mask -> ``[B, N, D]``."""
    out = layer(h, None) if _takes_mask(layer) else layer(h)
    return out[0] if isinstance(out, tuple) else out


def attention_projections(attention: nn.Module) -> Tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """``(q, k, v, o)`` projections of a DINOv2 ``layer.attention`` of either release."""
    if hasattr(attention, "q_proj"):
        return attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
    inner = attention.attention
    return inner.query, inner.key, inner.value, attention.output.dense


def dinov2_state_dict(sd: Dict[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """``sd`` (5.24 attention names) renamed to the names of ``model`` (a `Dinov2Model`)."""
    names = model.state_dict().keys()
    if not any(".attention.attention.query." in k for k in names):
        return sd
    out = {}
    for k, v in sd.items():
        for new, old in DINOV2_517_NAMES.items():
            if new in k:
                k = k.replace(new, old)
                break
        out[k] = v
    return out


def construct(cls, config, device, dtype: torch.dtype) -> nn.Module:
    """``cls(config)`` with every parameter and buffer created on ``device`` in ``dtype``
    (floating dtypes; the default dtype is set for the construction only), then cast to
    ``dtype`` as `presets.build` does for CPU models."""
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype)

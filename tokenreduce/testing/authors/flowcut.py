"""FlowCut as the authors run it (TungChintao/FlowCut flowcut/modeling_clip_flowcut.py and
utils_flowcut.py): in every CLIP layer eager attention, [CLS] attention (head mean), [CLS]-value
softmax attention (head mean), L1 norm of the head-mean value; score accumulated 0.5/0.5; when
the remaining-layer count rpl is even, prune to max(n - adaptive_prune_ratio, target) by top-k
of the accumulated score (sorted, [CLS] kept). The layer inputs are simulated: per layer q/k/v
of the original tokens, gathered to the tokens still alive."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from tokenreduce import ops
from tokenreduce.methods import Context, build

from . import MethodBenchCase
from ..synthetic import vit_layers_qkv


def flowcut_entry_target(target_num: int, select_feature: str = "patch", anyres: bool = False) -> int:
    """The authors' entry ``flowcut(model, target_num)`` (flowcut/main.py): the ``target`` handed to
    the CLIP encoder, [CLS] included ('patch': + 1, dropped by feature_select afterwards); anyres
    (LLaVA-NeXT): int(target_num / 2) per crop in the ViT, then the LLM prunes to target_num at
    layer 1."""
    if anyres:
        return int(target_num / 2) + 1 if select_feature == "patch" else int(target_num / 2)
    return target_num + 1 if select_feature == "patch" else target_num


def compute_score(cls_attn: Tensor, semantic_attn: Tensor, value: Tensor) -> Tensor:
    rel = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
    sem = semantic_attn / semantic_attn.sum(dim=-1, keepdim=True)
    return (rel + sem) * torch.norm(value, p=1, dim=-1)


def adaptive_prune_ratio(attn: Tensor, rpl: int, target_num: int) -> int:
    N = attn.shape[-1]
    prob = attn / attn.sum(dim=-1, keepdim=True)
    ent = -torch.sum(prob * torch.log(prob), dim=-1)
    ratio = ent / torch.log(torch.tensor(float(N)))
    r = (N - target_num) / rpl ** 0.5 * (1 - ratio ** 2)
    if r.shape[0] > 1:
        r = r.max(0).values
    return int(r.round())


def _gather_heads(t: Tensor, keep: Tensor) -> Tensor:
    return torch.gather(t, 2, keep[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


def flowcut_authors(layers_qkv: Sequence[Tuple[Tensor, Tensor, Tensor]], target: int, select_layer: int,
                    prune_nums: Optional[Sequence[int]] = None, with_output: bool = False) -> List[Tensor]:
    """layers_qkv[l] = (q, k, v) [B, H, 1+N, Dh] of the original tokens; target = tokens kept
    including [CLS] (the authors' ``target``). Returns the kept original image positions
    [B, n_s] (0-based among the image tokens, sorted) after each pruning point.
    ``with_output``: also compute each layer's attention output ``attn @ v`` as the authors'
    eager CLIP layer does (the benchmark: our side's fused op returns it too)."""
    B, H, N0, Dh = layers_qkv[0][0].shape
    keep = torch.arange(N0).expand(B, N0)          # alive tokens, original positions incl. [CLS]
    cum, out, p = None, [], 0
    for idx in range(select_layer):
        rpl = select_layer - idx - 1
        if keep.shape[1] <= target:
            break
        q, k, v = (_gather_heads(t.float(), keep) for t in layers_qkv[idx])
        attn = torch.softmax(q @ k.transpose(-1, -2) * Dh ** -0.5, dim=-1)
        if with_output:
            attn @ v   # the layer output eager attention computes (unused by the scores)
        cls_attention = attn[:, :, 0, 1:].mean(dim=1)
        semantic = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).mean(dim=1)[:, 0]   # [B, N]
        v_metric = v.mean(dim=1)
        scores = compute_score(cls_attention, semantic[:, 1:], v_metric[:, 1:])
        cum = scores.clone() if cum is None else 0.5 * cum + 0.5 * scores
        if rpl % 2 == 0:
            n = keep.shape[1]
            if prune_nums is not None:
                prune_num = prune_nums[p]
            else:
                prune_num = adaptive_prune_ratio(cls_attention, rpl, target - 1) if rpl else n
            p += 1
            target_num = max(n - prune_num, target)
            ki = torch.topk(cum, target_num - 1, dim=1).indices.sort(dim=1).values
            cum = torch.gather(cum, 1, ki)
            keep = torch.cat([keep[:, :1], torch.gather(keep[:, 1:], 1, ki)], dim=1)
            out.append(keep[:, 1:] - 1)
    return out


def flowcut_ours(x: Tensor, layers_qkv, keep: int, num_layers: int, **opts) -> List[Tensor]:
    """The engine's path: fused [CLS]-row scores per layer, values, progressive method calls."""
    m = build("flowcut", keep=keep, heads=layers_qkv[0][0].shape[1], **opts)
    red_layers = m.reduce_layers(num_layers)
    B, N0, D = x.shape
    alive = torch.arange(N0).expand(B, N0)
    state: dict = {}
    out, cls_attn, values = [], {}, {}
    for l in range(red_layers[-1] + 1):
        q, k, v = (_gather_heads(t, alive) for t in layers_qkv[l])
        _, sc = ops.attention_with_scores(q, k, v, score_rows=[0])
        cls_attn[l] = sc
        values[l] = v.transpose(1, 2).reshape(B, alive.shape[1], -1)
        if l in red_layers:
            xc = torch.gather(x, 1, alive.unsqueeze(-1).expand(-1, -1, D))
            red = m(Context(x=xc, has_cls=True, cls_attn=cls_attn, values=values, layer=l,
                            num_layers=num_layers, state=state))
            alive = torch.gather(alive, 1, red.index)
            out.append(alive[:, 1:] - 1)
            cls_attn, values = {}, {}
    return out


def bench_cases(quick: bool):
    N0, D, H, Dh, L = (65, 64, 4, 16, 8) if quick else (577, 1024, 16, 64, 24)
    keep = 16 if quick else 64
    sched = build("flowcut", keep=keep, heads=H).schedule(N0 - 1, L)
    prune = [a - b for a, b in zip([N0 - 1] + sched[:-1], sched)]   # the authors' per-point counts

    def case(B):
        def make():
            return (torch.randn(B, N0, D, generator=torch.Generator().manual_seed(9)),
                    vit_layers_qkv(B, N0, H, Dh, L - 2))

        return MethodBenchCase(
            "flowcut", f"B={B} N={N0} D={D} L={L} keep={keep}", make,
            ours=lambda t: flowcut_ours(t[0], t[1], keep, L),
            authors=lambda t: flowcut_authors(t[1], keep + 1, L - 2, prune, with_output=True))
    return [case(B) for B in (1, 16)]

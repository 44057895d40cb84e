"""DART as ZichenWen1/DART get_retained_image_token does it (LLaVA): L1-norm pivots,
then for each pivot in the iteration order of a Python set, the TOKEN_TOPK least
cosine-similar remaining image tokens. Batch 1 in the authors: looped per sample.
The DART repository itself was not fetchable here (README only: `<bench>.sh R M`); the
entry arithmetic (dart_token_topk) is read from LightCompress's port (llmc
token_reduction dart.py, the same get_retained_image_token)."""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor
from torch.nn.functional import cosine_similarity

from tokenreduce.methods import Context, build

from . import MethodBenchCase


def dart_token_topk(image_token_length: int, reduction_ratio: float, max_num_trunction=None,
                    pivot_image: int = 4, pivot_text: int = 4) -> int:
    """TOKEN_TOPK of get_retained_image_token (the neighbours every pivot selects):
    ceil((MAX_NUM_TRUNCTION or N (1 - reduction_ratio)) // (pivot_image + pivot_text))."""
    total = max_num_trunction if max_num_trunction is not None else image_token_length * (1 - reduction_ratio)
    return math.ceil(total // (pivot_image + pivot_text))


def dart_entry_keep(image_token_length: int, reduction_ratio: float, max_num_trunction=None,
                    pivot_image: int = 4, pivot_text: int = 4) -> int:
    """Image tokens the authors' ``scripts/v1_5/eval/<bench>.sh R M`` hands on: the image pivots
    plus TOKEN_TOPK neighbours for each of the pivot_image + pivot_text pivots (text pivots are
    dropped from the set afterwards, their neighbours stay)."""
    topk = dart_token_topk(image_token_length, reduction_ratio, max_num_trunction, pivot_image, pivot_text)
    return pivot_image + (pivot_image + pivot_text) * topk


def dart_one(states: Tensor, img_k: Tensor, txt_k: Tensor, image_start: int, image_len: int,
             pivot_image: int, pivot_text: int, token_topk: int, order: str = "set") -> List[int]:
    """states ``[S, D]`` of the whole sequence (image tokens at
    ``image_start:image_start + image_len``, text tokens after), the keys of the image
    and of the text tokens. Returns the kept image positions (relative to image_start),
    sorted. ``order="sorted"`` visits the pivots in ascending position instead of the
    set's order."""
    image_indices = (img_k.abs().sum(-1).topk(pivot_image).indices + image_start).tolist()
    query_indices = (txt_k.abs().sum(-1).topk(pivot_text).indices + image_start + image_len).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(image_start, image_start + image_len)) - set(image_indices)
    valid_list = list(valid)
    items = list(indices_set) if order == "set" else sorted(indices_set)
    for item in items:
        vectors = states[valid_list, :]
        cos_sim = -cosine_similarity(states[item, :], vectors, dim=-1)
        top = cos_sim.topk(token_topk).indices
        real = [valid_list[i] for i in top.tolist()]
        indices_set.update(real)
        valid.difference_update(real)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(i - image_start for i in indices_set)


def dart(image_states: Tensor, image_keys: Tensor, text_states: Tensor, text_keys: Tensor,
         pivot_image: int, pivot_text: int, token_topk: int, order: str = "set") -> Tensor:
    """``[B, n, D]`` image and ``[B, T, D]`` text rows -> kept image positions ``[B, K]``."""
    out = []
    for b in range(image_states.shape[0]):
        states = torch.cat([image_states[b], text_states[b]]).float()
        out.append(torch.tensor(dart_one(states, image_keys[b].float(), text_keys[b].float(), 0, image_states.shape[1], pivot_image,
                                         pivot_text, token_topk, order)))
    return torch.stack(out)


def bench_cases(quick: bool):
    n, D, T, topk = (64, 64, 32, 1) if quick else (576, 4096, 32, 15)
    keep = 4 + 8 * topk

    def case(B):
        def make():
            g = torch.Generator().manual_seed(7)
            return (torch.randn(B, n, D, generator=g), torch.randn(B, n, 128, generator=g),
                    torch.randn(B, T, D, generator=g))

        m = build("dart", keep=keep)
        return MethodBenchCase(
            "dart", f"B={B} n={n} D={D} keep={keep}", make,
            ours=lambda t: m(Context(x=t[0], keys=t[1], text=t[2])).tokens,
            authors=lambda t: dart(t[0], t[1], t[2], t[2], 4, 4, topk, order="sorted"))
    return [case(B) for B in ((1, 2) if quick else (1, 16))]

"""Sequence positions of image tokens in a VLM's input (batched, no host sync).

Used by the VLM adapters (cutting a row's image-token run to a reduced count) and by
`tokenreduce.models.llm.LLMReducer` (image / text positions of the current sequence).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["split_positions", "cut_image_tokens", "gather_positions"]


def split_positions(is_img: Tensor, n_img: int) -> Tuple[Tensor, Tensor]:
    """``is_img`` bool ``[B, L]`` with ``n_img`` image tokens per row -> (image positions
    ``[B, n_img]``, other positions ``[B, L - n_img]``), both ascending (stable sort, no sync)."""
    order = torch.sort((~is_img).to(torch.int8), dim=1, stable=True).indices
    return order[:, :n_img], order[:, n_img:]


def cut_image_tokens(is_img: Tensor, n_img: int, keep: int) -> Tensor:
    """Positions ``[B, L - n_img + keep]`` kept when each row's run of ``n_img`` image tokens
    is cut to its first ``keep`` (ascending)."""
    rank = is_img.long().cumsum(1) - 1
    drop = is_img & (rank >= keep)
    L = is_img.shape[1]
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices
    return order[:, :L - n_img + keep]


def gather_positions(t: Tensor, pos: Tensor, dim: int) -> Tensor:
    """Gather ``pos`` ``[B, L']`` along the sequence dim ``dim`` of ``t`` (batch at dim-1,
    broadcast batch of 1 expanded)."""
    B = pos.shape[0]
    shape = list(t.shape)
    bdim = dim - 1
    if shape[bdim] != B:
        shape[bdim] = B
        t = t.expand(*shape)
    idx_shape = [1] * t.dim()
    idx_shape[bdim] = B
    idx_shape[dim] = pos.shape[1]
    idx = pos.view(idx_shape)
    expand = list(t.shape)
    expand[dim] = pos.shape[1]
    return torch.gather(t, dim, idx.expand(expand))

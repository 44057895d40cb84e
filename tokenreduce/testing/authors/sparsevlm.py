"""SparseVLM as Gumpest/SparseVLMs v1.5 does it (batch 1, as the authors run it), from its entry
point ``RETAIN_TOKN=K`` (score.py ``sparse_token_dict[K]``) into
``modelling_sparse_llama.py`` ``LlamaModel.forward``: the raters once from the input embeddings,
then after each layer of ``pruning_loc = [2, 6, 15]`` ``attn_postprocess_topk`` on the layer's
attention weights and the merge of the pruned tokens by ``utils.cluster_and_merge``."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from tokenreduce.methods import Context, build

from . import MethodBenchCase

layer_dict = {2: 0, 6: 1, 15: 2}
sparse_token_dict = {192: [300, 200, 110], 128: [303, 110, 36], 96: [238, 48, 26], 64: [66, 30, 17]}


def select_raters(hidden_states: Tensor, v_token_start: int, image_shape: int):
    """``t_token_idx``: the text tokens after the image above the mean relevance (torch.where)."""
    text_token_start = v_token_start + image_shape
    v_t = hidden_states[:, v_token_start: text_token_start, :]
    t_t = hidden_states[:, text_token_start:, :]
    m_v_t = v_t @ t_t.transpose(1, 2)
    m_v_t = m_v_t.softmax(2).mean(1)
    return torch.where(m_v_t > m_v_t.mean())


def attn_postprocess_topk(self_attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx,
                          retained_tokens):
    self_attn_weights = self_attn_weights.mean(1)
    t_token_idx = t_token_idx[1] + text_token_start
    relation_vis_text = self_attn_weights[:, t_token_idx, v_token_start: v_token_start + v_token_num]
    relation_vis_text = relation_vis_text.mean(1)
    relation_vis = relation_vis_text
    s_flag = True
    sparse_token_list = sparse_token_dict[retained_tokens]
    if v_token_num != 0:
        mask = torch.zeros_like(relation_vis, dtype=bool)
        _, indices = torch.topk(relation_vis, min(sparse_token_list[layer_dict[layer_idx]], v_token_num - 1), dim=1)
        mask[0][indices] = 1
    else:
        mask = torch.ones_like(relation_vis_text, dtype=bool)
        s_flag = False
    return mask, s_flag, relation_vis_text


def index_points(points, idx):
    B = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).view(view_shape).repeat(repeat_shape)
    return points[batch_indices, idx, :]


def cluster_and_merge(x, cluster_num, noise: bool = True):
    """utils.py ``cluster_and_merge`` (einops rearranges written as unsqueeze); ``noise=False``
    leaves out the ``rand * 1e-6`` added to the density (the method's deterministic choice)."""
    B, N, C = x.shape
    x1 = x.unsqueeze(2)
    x2 = x.unsqueeze(1)
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C ** 0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    if noise:
        density = density + torch.rand(density.shape, device=density.device, dtype=density.dtype) * 1e-6
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = index_points(dist_matrix, index_down)
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(B, device=x.device)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num, device=x.device)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    B, N, C = x.shape
    idx_token = torch.arange(N)[None, :].repeat(B, 1).to(x.device)  # noqa: F841 (as the authors)
    token_weight = x.new_ones(B, N, 1)
    idx_batch = torch.arange(B, device=x.device)[:, None]
    idx = idx_cluster + idx_batch * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N), source=source.reshape(B * N, C).type(x.dtype))
    return x_merged.reshape(B, cluster_num, C)


def prune_stage(layer_output: Tensor, attn_weights: Tensor, v_token_start: int, v_token_num: int,
                t_token_idx, layer_idx: int, retained_tokens: int, noise: bool = True) -> Tuple[Tensor, int]:
    """The inference branch of a sparse layer for one sample: ``layer_output`` ``[1, L, D]``,
    ``attn_weights`` ``[1, H, L, L]`` -> (the new hidden states ``[1, L', D]``, new v_token_num)."""
    text_token_start = v_token_start + v_token_num
    pred_score_vis, s_flag, relation_vis_text = attn_postprocess_topk(
        attn_weights, v_token_start, v_token_num, text_token_start, t_token_idx, layer_idx, retained_tokens)
    B, L = layer_output.shape[:2]
    policy = torch.ones(B, L, dtype=layer_output.dtype)
    policy[:, v_token_start:text_token_start] = pred_score_vis.type(dtype=layer_output.dtype)
    total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
    total_sparse_token = layer_output[:, total_sparse_token_idx[0]]
    merge_token_idx_stage1 = torch.where(pred_score_vis == 0)[1]
    merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
    merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
    merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
    merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
    cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
    merge_sparse_token = cluster_and_merge(merge_token_stage2, cluster_num, noise=noise)
    select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)
    select_token = layer_output[:, select_token_idx[0]]
    select_vis_token_num = int(pred_score_vis.sum())
    out = torch.cat((select_token[:, :v_token_start + select_vis_token_num, :], merge_sparse_token,
                     select_token[:, v_token_start + select_vis_token_num:, :]), dim=1)
    return out, select_vis_token_num + cluster_num


def relation_from_weights(attn_weights: Tensor, v_token_start: int, v_token_num: int, t_token_idx) -> Tensor:
    """``relation_vis_text`` ``[1, v]`` as attn_postprocess_topk computes it (what the model hands
    the method as ``ctx.rater_attn``)."""
    return attn_postprocess_topk(attn_weights, v_token_start, v_token_num, v_token_start + v_token_num,
                                 t_token_idx, 2, 64)[2]


def bench_cases(quick: bool) -> List[MethodBenchCase]:
    v0, D, H, pre, txt = (64, 64, 4, 8, 12) if quick else (576, 4096, 8, 35, 60)
    L = pre + v0 + txt

    def make(B):
        g = torch.Generator().manual_seed(9)
        h = torch.randn(B, L, D, generator=g)
        w = torch.softmax(torch.randn(B, H, L, L, generator=g) * 3 +
                          torch.full((L, L), float("-inf")).triu(1), dim=-1)
        raters = [select_raters(h[b:b + 1], pre, v0) for b in range(B)]
        rel = torch.cat([relation_from_weights(w[b:b + 1], pre, v0, raters[b]) for b in range(B)])
        return h, w, raters, rel

    def case(B):
        m = build("sparsevlm", keep=64)

        def authors(t):
            h, w, raters, _ = t
            return [prune_stage(h[b:b + 1], w[b:b + 1], pre, v0, raters[b], 2, 64)[0] for b in range(B)]

        return MethodBenchCase(
            "sparsevlm", f"B={B} L={L} v={v0} D={D} keep=64 (layer 2)", make=lambda: make(B),
            ours=lambda t: m(Context(x=t[0][:, pre:pre + v0], rater_attn={2: t[3]}, layer=2, num_layers=32,
                                     state={})).tokens,
            authors=authors)
    return [case(B) for B in ((1, 4) if quick else (1, 16))]

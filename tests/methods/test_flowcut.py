import os
import sys
import math

import pytest
import torch

from tokenreduce import methods
from tokenreduce.testing.authors.flowcut import adaptive_prune_ratio, flowcut_authors, flowcut_ours
from tokenreduce.testing.synthetic import vit_layers_qkv
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # method_checks, whatever the import mode
from method_checks import LOW, check_errors, overlap


def run_both(B, keep, L, seed, H=4, Dh=16, D=32, N0=577, **opts):
    layers = vit_layers_qkv(B, N0, H, Dh, L - 2, seed=seed)
    x = torch.randn(B, N0, D, generator=torch.Generator().manual_seed(seed + 1))
    m = methods.build("flowcut", keep=keep, heads=H, **opts)
    sched = m.schedule(N0 - 1, L)
    prune = [a - b for a, b in zip([N0 - 1] + sched[:-1], sched)]
    ours = flowcut_ours(x, layers, keep, L, **opts)
    auth = flowcut_authors(layers, keep + 1, L - 2, prune)
    return ours, auth, sched


@pytest.mark.parametrize("B,keep", [(1, 192), (3, 64)])
def test_matches_authors_stage_by_stage(B, keep):
    ours, auth, sched = run_both(B, keep, L=8, seed=B * 10 + keep)
    assert len(ours) == len(auth) == 3 and [o.shape[1] for o in ours] == sched and sched[-1] == keep
    for o, a in zip(ours, auth):
        assert torch.equal(o, a)


def test_clip_l_depth_24_layers():
    ours, auth, sched = run_both(1, 64, L=24, seed=5)
    assert len(ours) == 11 and sched[-1] == 64                     # prune after layers 1, 3, ..., 21
    for o, a in zip(ours, auth):
        assert torch.equal(o, a)


def test_static_schedule_is_the_authors_adaptive_count():
    """With rho set to the measured entropy ratio, the static first count equals the authors'."""
    B, N0, H, Dh, L, keep = 1, 577, 4, 16, 8, 64
    layers = vit_layers_qkv(B, N0, H, Dh, L - 2, seed=9)
    q, k, v = (t.float() for t in layers[1])                       # first prune happens in layer 1
    attn = torch.softmax(q @ k.transpose(-1, -2) * Dh ** -0.5, dim=-1)[:, :, 0, 1:].mean(1)
    p = attn / attn.sum(-1, keepdim=True)
    rho = float(-(p * p.log()).sum() / math.log(N0 - 1))
    authors_prune = adaptive_prune_ratio(attn, L - 2 - 1 - 1, keep)
    m = methods.build("flowcut", keep=keep, heads=H, entropy_ratio=rho)
    assert m.schedule(N0 - 1, L)[0] == N0 - 1 - authors_prune


def test_batch_equals_per_sample():
    B, L = 3, 8
    layers = vit_layers_qkv(B, 577, 4, 16, L - 2, seed=3)
    x = torch.randn(B, 577, 32)
    full = flowcut_ours(x, layers, 64, L)
    for b in range(B):
        one = flowcut_ours(x[b:b + 1], [tuple(t[b:b + 1] for t in lay) for lay in layers], 64, L)
        for o, f in zip(one, full):
            assert torch.equal(o, f[b:b + 1])


@pytest.mark.parametrize("dtype", LOW)
def test_low_precision(dtype):
    L = 8
    layers = vit_layers_qkv(2, 577, 4, 16, L - 2, seed=4)
    x = torch.randn(2, 577, 32)
    ref = flowcut_ours(x, layers, 192, L)
    got = flowcut_ours(x.to(dtype), [tuple(t.to(dtype) for t in lay) for lay in layers], 192, L)
    assert overlap(got[0], ref[0]) >= 0.9


def test_declarations():
    m = methods.build("flowcut", keep=64)
    assert m.reduce_layers(24) == list(range(1, 22, 2)) and m.attention_layers(24) == list(range(22))
    assert m.stage == methods.Stage.VIT and {methods.Need.CLS_ATTN, methods.Need.VALUES} <= m.needs
    s = m.schedule(576, 24)
    assert s[-1] == 64 and all(a >= b for a, b in zip(s, s[1:]))
    with pytest.raises(ValueError, match="flowcut"):
        methods.build("flowcut", keep=64, entropy_ratio=2.0)


def test_errors():
    x = torch.randn(1, 577, 16)
    check_errors("flowcut", lambda: methods.Context(x=x, has_cls=True, layer=1, num_layers=24, state={}))
    m = methods.build("flowcut", keep=64, heads=4)
    with pytest.raises(ValueError, match="flowcut.*CLS"):
        m(methods.Context(x=x, layer=1, num_layers=24))
    with pytest.raises(ValueError, match="flowcut.*layer"):
        m(methods.Context(x=x, has_cls=True, layer=2, num_layers=24, state={}))
    with pytest.raises(ValueError, match=r"flowcut.*cls_attn\[0\]"):
        m(methods.Context(x=x, has_cls=True, layer=1, num_layers=24, state={}))

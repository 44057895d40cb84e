"""kcenter's CPU schedules (csrc/kcenter/kcenter_cpu.cpp): one row per thread, a row split
over the threads (spin barrier per pick), and the kept Gram matrix (cosine, k >= N/3, N >=
128). Each gives the reference's picks, and the sweep schedules agree bit for bit with each
other whatever the batch split or thread count."""
import pytest
import torch

from tokenreduce import measure, ops, reference
from conftest import randn
from test_kcenter import assert_same_kcenter


@pytest.mark.parametrize("first", [0, "isolated"])
@pytest.mark.parametrize("B", [1, 3])
def test_gram_schedule_matches_reference(gen, first, B):
    x = randn(gen, B, 300, 48)  # k = 120 >= N / 3: the Gram schedule
    mask = torch.rand(B, 300, generator=gen) > 0.2
    mask[:, 0] = True
    idx, md = ops.kcenter(x, 120, first=first, mask=mask)
    ridx, rmd = reference.kcenter(x, 120, first=first, mask=mask)
    assert_same_kcenter(x, idx, md, ridx, rmd, "cosine", tie_tol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_split_and_rows_schedules_agree_bitwise(gen, metric):
    x = randn(gen, 4, 258, 256)  # N * D / 2 >= 2^15: B = 1 splits each pick over 2 threads
    x[:, 200] = x[:, 3]  # duplicates across the slices: ties must go to the smaller index
    x[:, 201] = x[:, 130]
    with measure.threads(2):
        full_idx, full_md = ops.kcenter(x, 40, metric=metric)  # rows schedule
        for b in range(x.shape[0]):
            idx, md = ops.kcenter(x[b:b + 1], 40, metric=metric)  # split schedule
            assert torch.equal(idx[0], full_idx[b]) and torch.equal(md[0], full_md[b])
    with measure.threads(1):
        one_idx, one_md = ops.kcenter(x, 40, metric=metric)
    assert torch.equal(one_idx, full_idx) and torch.equal(one_md, full_md)
    ridx, rmd = reference.kcenter(x, 40, metric=metric)
    assert_same_kcenter(x, full_idx, full_md, ridx, rmd, metric, tie_tol=1e-5)


def test_split_schedule_with_mask_and_isolated(gen):
    x = randn(gen, 1, 300, 256)
    mask = torch.rand(1, 300, generator=gen) > 0.5
    with measure.threads(2):
        idx, md = ops.kcenter(x, 30, first="isolated", mask=mask)
    ridx, rmd = reference.kcenter(x, 30, first="isolated", mask=mask)
    assert_same_kcenter(x, idx, md, ridx, rmd, "cosine", tie_tol=1e-5)
    assert bool(mask[0, idx[0]].all())
